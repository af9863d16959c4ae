"""The GPT as an ONNX decoder with its key/value cache as explicit inputs and outputs.

    inputs   input_ids [B, T] int64, attention_mask [B, P + T] int64 (0 at left padding),
             past_key_values.{i}.key / .value [B, n_kv_head, P, head_dim] float32 for every layer i
    outputs  logits [B, T, V] float32, present.{i}.key / .value [B, n_kv_head, P + T, head_dim]

Batch, T and P are dynamic, P = 0 included (the prefill: past tensors with a zero-length axis), so
one graph serves the prefill and every decode step: the caller feeds `present` back as `past` and
extends the mask by one column per step. These are the names Hugging Face's ONNX decoders use, so
tools written for them read ours. Positions come from the mask (the number of real tokens before
each one), so a left-padded row gets the positions, and the logits, of that row decoded alone.

The graph is traced with `torch.onnx.export(dynamo=True)` from the model itself through a cache
object of `GPT.forward`'s cache protocol (`ConcatKVCache`): nothing of the model is rewritten for
export. The fused kernels are not traceable; the export uses the PyTorch reference ops
(`kernels="torch"`), which compute the same function.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

__all__ = ["ConcatKVCache", "OnnxDecoder", "export_decoder", "input_names", "output_names", "prefill_feeds"]


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(n_layer)
                                              for kv in ("key", "value")]


def output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def prefill_feeds(prompts, n_layer: int, n_kv_head: int, head_dim: int) -> dict:
    """The exported decoder's inputs for a prefill of `prompts` (lists of token ids): rows left-padded
    to the longest, the mask 0 on padding, every past tensor empty (length 0). numpy arrays."""
    import numpy as np

    T = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), T), np.int64)
    mask = np.zeros((len(prompts), T), np.int64)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = p
        mask[r, T - len(p):] = 1
    empty = np.zeros((len(prompts), n_kv_head, 0, head_dim), np.float32)
    return {"input_ids": ids, "attention_mask": mask, **dict.fromkeys(input_names(n_layer)[2:], empty)}


class ConcatKVCache:
    """`GPT.forward`'s cache protocol over given past tensors: each layer attends over past ++ new
    and keeps that as its `present`. `plan` supplies positions and the attention mask from the
    [B, P + T] padding mask, as `model.generate.SlotKVCache` does for its rows."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)
        self.attention_mask = attention_mask

    def plan(self, T: int):
        am = self.attention_mask
        positions = (am.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        k_len = am.shape[1]
        q_idx = torch.arange(T, device=am.device)[:, None] + (k_len - T)
        k_idx = torch.arange(k_len, device=am.device)[None, :]
        mask = (k_idx <= q_idx)[None, None] & am.bool()[:, None, None, :]
        # A padding query would attend to nothing (NaN); let it see itself, as build_attn_mask does.
        return positions, mask | (k_idx == q_idx)[None, None]

    def layer(self, i: int) -> _ConcatLayer:
        return _ConcatLayer(self, i)

    def advance(self, T: int) -> None:
        pass


class _ConcatLayer:
    sdpa_enable_gqa = False  # grouped kv heads are repeated in the graph (an ONNX SDPA has no GQA flag)

    def __init__(self, cache: ConcatKVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k, v):
        pk, pv = self.cache.past[self.index]
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.cache.present[self.index] = (k, v)
        return k, v


class OnnxDecoder(torch.nn.Module):
    """forward(input_ids, attention_mask, past) -> (logits, *present), `past` a tuple of
    2 x n_layer tensors (key, value per layer)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, past):
        n = self.model.config.n_layer
        cache = ConcatKVCache([(past[2 * i], past[2 * i + 1]) for i in range(n)], attention_mask)
        logits = self.model.head(self.model.hidden_states(input_ids, kv_cache=cache)).float()
        return (logits, *[t for kv in cache.present for t in kv])


def export_decoder(model, path: str | Path) -> Path:
    """Trace `model` (a GPT on the CPU with `kernels="torch"`, eval mode) into an ONNX file at `path`."""
    from torch.export import Dim

    if model.config.kernels != "torch":
        raise ValueError("export needs the PyTorch reference ops: build the model with kernels='torch'")
    c = model.config
    n_kv, hd = model.blocks[0].attn.n_kv_head, c.head_dim
    # Example sizes other than 0 and 1, so the tracer does not specialise any dynamic axis on them.
    B, P, T = 2, 3, 4
    past = tuple(torch.zeros(B, n_kv, P, hd) for _ in range(2 * c.n_layer))
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, P + T, dtype=torch.long)
    dyn = Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in past))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter's own chatter is not ours to pass on: torchvision's ops it skips (we use none) and
    # a FutureWarning from torch's pytree internals.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(OnnxDecoder(model).eval(), (ids, mask, past), dynamo=True,
                                    input_names=input_names(c.n_layer), output_names=output_names(c.n_layer),
                                    dynamic_shapes=shapes, verbose=False)
    program.save(str(path))
    return path
