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
object of `GPT.forward`'s cache protocol (`ConcatKVCache`). The fused kernels are not traceable; the
export uses the PyTorch reference ops (`kernels="torch"`), which compute the same function.

Attention (`fused=True`, the default where it applies): while tracing, each block's attention module
is stood in for by `_MHAAttention`, which computes the same function from the same parameters but
as one call of ONNX Runtime's contrib op `com.microsoft.MultiHeadAttention` (causal with
`unidirectional=1`, left padding by `key_padding_mask`, past/present keys and values in and out, the
q/k/v biases as its `bias` input; Llama's rotary embedding applied before it in the graph). ORT's
transformer optimiser does not recognise the traced masked SDPA as attention, so without this each
layer's attention is ~20 small nodes (concat, transposes, matmuls, mask, softmax). MultiHeadAttention
needs as many kv heads as query heads: a model with grouped kv heads (Llama GQA) keeps the traced SDPA
(`fused_attention_applies`). Outside an export the stand-in op runs its PyTorch reference
(`_mha_reference`), so the substituted model can be checked against the original in PyTorch too.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ConcatKVCache", "OnnxDecoder", "export_decoder", "fused_attention_applies", "input_names",
           "output_names", "prefill_feeds"]


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
        self.key_padding_mask = attention_mask.to(torch.int32)  # MultiHeadAttention's mask type, cast once

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


# --------------------------------------------------------------------------------------------------
# ONNX Runtime's MultiHeadAttention as a torch custom op: a PyTorch reference for eager runs and
# tracing, and a translation into the contrib op for torch.onnx.


@torch.library.custom_op("gpt_onnx::mha", mutates_args=())
def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
         key_padding_mask: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
         num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mha_reference(q, k, v, bias, key_padding_mask, past_key, past_value, num_heads)


def _mha_reference(q, k, v, bias, key_padding_mask, past_key, past_value, num_heads: int):
    """MultiHeadAttention(unidirectional=1) in PyTorch. q, k, v [B, T, H*D] (before `bias`, [3*H*D]),
    key_padding_mask [B, P + T] (0 at padding), past [B, H, P, D] -> (out [B, T, H*D], present k, v).
    A padding query sees itself only here (ORT: no key, a uniform average); its output is never read."""
    if bias is not None:
        bq, bk, bv = bias.chunk(3)
        q, k, v = q + bq, k + bk, v + bv
    B, T, _ = q.shape
    D = q.shape[-1] // num_heads

    def heads(x):
        return x.view(B, T, num_heads, D).transpose(1, 2)

    key, value = torch.cat([past_key, heads(k)], dim=2), torch.cat([past_value, heads(v)], dim=2)
    P = past_key.shape[2]
    q_idx = torch.arange(T, device=q.device)[:, None] + P
    k_idx = torch.arange(P + T, device=q.device)[None, :]
    mask = ((k_idx <= q_idx)[None, None] & key_padding_mask.bool()[:, None, None, :]) | (k_idx == q_idx)
    y = F.scaled_dot_product_attention(heads(q), key, value, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, num_heads * D), key, value


@_mha.register_fake
def _(q, k, v, bias, key_padding_mask, past_key, past_value, num_heads):
    B, T, _ = q.shape
    shape = (B, num_heads, past_key.shape[2] + T, q.shape[-1] // num_heads)
    return q.new_empty(q.shape), q.new_empty(shape), q.new_empty(shape)


def _mha_translation():
    """{torch op: onnxscript function} for torch.onnx.export's custom_translation_table. The contrib
    op has no schema in onnx's registry; the exporter needs one to build the node, so it is declared
    here (the inputs used, in ORT's order and names)."""
    import onnxscript
    from onnx.defs import OpSchema

    def param(name, optional=False):
        return OpSchema.FormalParameter(name, "M" if name == "key_padding_mask" else "T",
                                        param_option=OpSchema.FormalParameterOption.Optional if optional
                                        else OpSchema.FormalParameterOption.Single)

    inputs = ["query", "key", "value", "bias", "key_padding_mask", "attention_bias", "past_key", "past_value"]
    schema = OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[param(n, optional=i > 0) for i, n in enumerate(inputs)],
        outputs=[param("output"), param("present_key", True), param("present_value", True)],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "")])
    mha = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def translate(q, k, v, bias, key_padding_mask, past_key, past_value, num_heads: int):
        return mha(q, k, v, bias, key_padding_mask, None, past_key, past_value, num_heads=num_heads,
                   unidirectional=1)

    return {torch.ops.gpt_onnx.mha.default: translate}


def fused_attention_applies(model) -> bool:
    """Whether the export can use MultiHeadAttention: one kv head per query head."""
    attn = model.blocks[0].attn
    return attn.n_kv_head == attn.n_head


class _MHAAttention(torch.nn.Module):
    """`model.gpt.Attention`'s function over its own projections, attention as `gpt_onnx::mha`.
    Only with a `ConcatKVCache` layer (it reads the cache's past and padding mask, writes `present`)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        # q, k and v from one MatMul (one pass over x, one kernel instead of three), then a Split.
        self.register_buffer("qkv_weight", torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                      attn.v_proj.weight]).detach(), persistent=False)

    def forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache=None):
        a = self.attn
        B, T, _ = x.shape
        q, k, v = F.linear(x, self.qkv_weight).split([a.q_proj.out_features, a.k_proj.out_features,
                                                      a.v_proj.out_features], dim=-1)
        bias = None
        if a.q_proj.bias is not None:
            bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        if cos is not None:
            if bias is not None:  # the rotation comes after the bias
                q, k, v = (t + b for t, b in zip((q, k, v), bias.chunk(3)))
                bias = None
            # The reference rope is elementwise over the last dim: in the [B, T, H, D] layout the
            # tables [B, 1, T, D] broadcast as [B, T, 1, D].
            q, k = a.ops.rope(q.view(B, T, a.n_head, a.head_dim), k.view(B, T, a.n_kv_head, a.head_dim),
                              cos.transpose(-3, -2), sin.transpose(-3, -2))
            q, k = q.reshape(B, T, -1), k.reshape(B, T, -1)
        cache = kv_cache.cache
        past_k, past_v = cache.past[kv_cache.index]
        y, present_k, present_v = torch.ops.gpt_onnx.mha(q, k, v, bias, cache.key_padding_mask, past_k, past_v,
                                                         a.n_head)
        cache.present[kv_cache.index] = (present_k, present_v)
        return a.o_proj(y)


@contextlib.contextmanager
def mha_attention(model):
    """Within: every block's attention is an `_MHAAttention` over the same module (restored after)."""
    originals = [b.attn for b in model.blocks]
    try:
        for b in model.blocks:
            b.attn = _MHAAttention(b.attn)
        yield model
    finally:
        for b, a in zip(model.blocks, originals):
            b.attn = a


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


def export_decoder(model, path: str | Path, fused: bool | None = None) -> Path:
    """Trace `model` (a GPT on the CPU with `kernels="torch"`, eval mode) into an ONNX file at `path`.
    `fused`: attention as ORT's MultiHeadAttention (default: where `fused_attention_applies`)."""
    from torch.export import Dim

    if model.config.kernels != "torch":
        raise ValueError("export needs the PyTorch reference ops: build the model with kernels='torch'")
    if fused is None:
        fused = fused_attention_applies(model)
    elif fused and not fused_attention_applies(model):
        raise ValueError("MultiHeadAttention needs one kv head per query head; this model groups them")
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
    with (torch.no_grad(), warnings.catch_warnings(),
          mha_attention(model) if fused else contextlib.nullcontext()):
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(OnnxDecoder(model).eval(), (ids, mask, past), dynamo=True,
                                    input_names=input_names(c.n_layer), output_names=output_names(c.n_layer),
                                    dynamic_shapes=shapes, verbose=False,
                                    custom_translation_table=_mha_translation() if fused else None)
    program.save(str(path))
    return path
