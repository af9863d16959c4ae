"""A minimal nanoGPT-style GPT-2 in plain PyTorch: the baseline of bench/bench_step.py.

Independent of this repo's model code on purpose (nothing imported from `model`): nn.LayerNorm,
one fused q/k/v projection, causal F.scaled_dot_product_attention, GELU (tanh) MLP, learned
position embeddings, token embedding tied to the output head, F.cross_entropy.  Init as in
nanoGPT: N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 * n_layer)), zero biases.

`to_ours_state_dict` maps its weights onto `model.GPT` (gpt2 style) parameter names, so the
benchmark can start every model from the same weights and check they compute the same loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PlainConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    block_size: int = 1024
    bias: bool = True
    eps: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, c: PlainConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: PlainConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: PlainConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.eps, bias=c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.eps, bias=c.bias)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    def __init__(self, c: PlainConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.eps, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets=None):
        """idx [B, T] -> logits [B, T, V]; with targets, the mean cross-entropy instead."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def matmul_params(self) -> int:
        """Weights used in matmuls: every nn.Linear weight (the tied token embedding counted once,
        as the output head); biases and LayerNorm weights are elementwise work."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * N (forward 2N + backward 4N of the matmuls) plus the
        attention score and value matmuls 12 * n_layer * n_embd * seq_len (causal masking not
        discounted, as in nanoGPT and the PaLM paper's MFU)."""
        c = self.config
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_embd * seq_len


def to_ours_state_dict(plain: PlainGPT) -> dict[str, torch.Tensor]:
    """The plain model's weights under `model.GPT`'s (gpt2 style) parameter names."""
    sd = {"tok_emb.weight": plain.wte.weight, "pos_emb.weight": plain.wpe.weight,
          "lm_head.weight": plain.wte.weight,
          "final_norm.weight": plain.ln_f.weight, "final_norm.bias": plain.ln_f.bias}
    for i, b in enumerate(plain.h):
        p = f"blocks.{i}."
        for ours, mod in (("attn_norm", b.ln_1), ("mlp_norm", b.ln_2), ("attn.o_proj", b.attn.c_proj),
                          ("mlp.fc", b.mlp.c_fc), ("mlp.proj", b.mlp.c_proj)):
            sd[p + ours + ".weight"] = mod.weight
            sd[p + ours + ".bias"] = mod.bias
        ws = b.attn.c_attn.weight.chunk(3, dim=0)
        bs = b.attn.c_attn.bias.chunk(3, dim=0) if b.attn.c_attn.bias is not None else (None,) * 3
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), ws, bs):
            sd[p + f"attn.{name}.weight"] = w
            sd[p + f"attn.{name}.bias"] = bias
    return {k: v.detach().clone() for k, v in sd.items() if v is not None}
