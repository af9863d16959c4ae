"""Pure-PyTorch reference implementations of every fused op.

These define the semantics the fused kernels must reproduce (and are the fallback when a kernel
cannot be built). Shapes: the last dimension is the feature dimension; leading dimensions are
flattened by the kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps: float, residual=None):
    """LayerNorm over the last dim. With `residual`, computes h = x + residual first and returns
    (layer_norm(h), h) so the caller keeps the updated residual stream."""
    if residual is not None:
        h = x + residual
        return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm (Llama): x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""
    if residual is not None:
        h = x + residual
        return _rms(h, weight, eps), h
    return _rms(x, weight, eps)


def _rms(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y.to(x.dtype) * weight) if weight is not None else y.to(x.dtype)


def bias_gelu(x, bias):
    """GELU (tanh approximation) of x + bias; bias may be None."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


def swiglu(gate, up):
    """SwiGLU: silu(gate) * up."""
    return F.silu(gate) * up


def cross_entropy(logits, targets, ignore_index: int = -100):
    """Mean softmax cross-entropy over non-ignored targets. logits [..., V], targets [...]."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
    )


def token_cross_entropy(logits, targets, ignore_index: int = -100):
    """Per-token -log softmax(logits)[target] (float32, targets' shape); 0 where targets ==
    ignore_index.  logits [..., V], targets [...]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="none").view(targets.shape)


def _entropy_from_logp(logp):
    # -sum p log p; a zero probability (a -inf logit, or an underflow) contributes 0, not 0 * -inf
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def token_entropy(logits):
    """Per-token entropy -sum_j p_j log p_j of softmax(logits) over the last dim (float32 [...])."""
    return _entropy_from_logp(torch.log_softmax(logits.float(), dim=-1))


def token_logprob_and_entropy(logits, targets, ignore_index: int = -100):
    """(log softmax(logits)[target], entropy), float32 of targets' shape; both 0 (and without
    gradient) where targets == ignore_index."""
    logp = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    valid = t != ignore_index
    lp = logp.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(valid, lp, zero)
    ent = torch.where(valid, _entropy_from_logp(logp), zero)
    return lp.view(targets.shape), ent.view(targets.shape)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q, k, cos, sin):
    """Rotary embedding, Hugging Face Llama ("rotate half") convention.

    q [B, Hq, T, D], k [B, Hk, T, D]; cos and sin broadcastable to [B, 1, T, D] (usually [T, D]
    or [B, 1, T, D]) with the two halves of the last dim equal. Returns (q_rot, k_rot)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None, dtype=torch.float32):
    """cos, sin of shape [seq_len, head_dim] for positions 0..seq_len-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


GELU_TANH_C = math.sqrt(2.0 / math.pi)
