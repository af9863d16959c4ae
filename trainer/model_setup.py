"""The full single-process model a recipe asks for, and its optimizer parameter groups."""

from __future__ import annotations

from .errors import UsageError
from .schema import Recipe


def padded_vocab(n: int, tp: int) -> int:
    """Round the embedding rows up to a multiple of 64*tp (Megatron's padding): faster matmuls and a
    vocabulary that splits evenly over tensor-parallel ranks."""
    m = 64 * tp
    return ((n + m - 1) // m) * m


def build_model(recipe: Recipe, vocab_size: int):
    from model import GPT, GPTConfig

    m = recipe.model
    if m.init_from:
        from model.hf import load_hf

        model = load_hf(m.init_from, kernels=m.kernels)
        if model.config.vocab_size < vocab_size:
            raise UsageError(f"model.init_from={m.init_from} has {model.config.vocab_size} embedding rows but the "
                             f"tokenizer has {vocab_size} tokens; set data.tokenizer to the model's tokenizer.json")
        return model
    cfg = GPTConfig(
        style=m.style, vocab_size=m.vocab_size or padded_vocab(vocab_size, recipe.parallel.tp),
        n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head, d_model=m.d_model, d_ff=m.d_ff,
        max_seq_len=m.max_seq_len, dropout=m.dropout, bias=m.bias, norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings, init_std=m.init_std,
        kernels=m.kernels,  # activation checkpointing: set by trainer.parallelize
    )
    return GPT(cfg)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norm gains or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
