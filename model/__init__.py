"""One GPT definition (GPT-2 and Llama styles), its Hugging Face adapter and its kernels."""

from .config import GPTConfig
from .gpt import GPT

__all__ = ["GPT", "GPTConfig"]
