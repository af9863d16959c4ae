"""One GPT definition (GPT-2 and Llama styles), its Hugging Face adapter and its kernels."""

from .config import GPTConfig
from .generate import Completion, DecodeEngine, SamplingParams, StepOutput
from .gpt import GPT

__all__ = ["GPT", "Completion", "DecodeEngine", "GPTConfig", "SamplingParams", "StepOutput"]
