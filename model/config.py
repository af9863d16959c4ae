"""Architecture hyper-parameters of the one GPT definition.

A plain dataclass so the model package has no dependency on the recipe schema: the trainer's
config schema builds a `GPTConfig` from the validated `model:` section, and `model.hf` builds one
from a Hugging Face `config.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Style = Literal["gpt2", "llama"]
KernelMode = Literal["auto", "fused", "torch"]


@dataclass
class GPTConfig:
    style: Style = "gpt2"
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    # Grouped-query attention (llama style): number of key/value heads; None means n_head.
    n_kv_head: int | None = None
    d_model: int = 768
    # Hidden width of the MLP; None means 4*d_model (gpt2) or the Llama 2/3 rule (llama).
    d_ff: int | None = None
    max_seq_len: int = 1024
    dropout: float = 0.0
    # Biases on linear layers and norms (GPT-2 has them, Llama has none).
    bias: bool | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Tie the output head to the token embedding; None means style default (gpt2: tied, llama: untied).
    tie_embeddings: bool | None = None
    activation_checkpointing: bool = False
    kernels: KernelMode = "torch"
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.bias is None:
            self.bias = self.style == "gpt2"
        if self.tie_embeddings is None:
            self.tie_embeddings = self.style == "gpt2"
        if self.d_ff is None:
            if self.style == "gpt2":
                self.d_ff = 4 * self.d_model
            else:
                # Llama rule: 2/3 of 4d, rounded up to a multiple of 64.
                hidden = int(2 * 4 * self.d_model / 3)
                self.d_ff = 64 * ((hidden + 63) // 64)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)
