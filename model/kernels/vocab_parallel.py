"""Vocabulary-parallel cross-entropy (Megatron style) without gathering the logits.

Each rank of the tensor-parallel `group` holds the logits columns [vocab_start, vocab_start + V_r).
Per row, every rank computes its local log-sum-exp and its target logit (0 when the target lies in
another shard) with the fused `ce_fwd` kernel (or plain torch); then

    m     = all_reduce_max(lse_local)                    # the row max, shifted by log(sum) locally
    s, xt = all_reduce_sum([exp(lse_local - m), target_logit_local])
    lse   = m + log(s)           loss_i = lse_i - xt_i    (0 for ignored rows)

i.e. two all-reduces of [2, N] floats at most; nothing of size V crosses ranks.  The result is the
mean over non-ignored rows (all ranks must hold the same `targets`).  Backward needs no
communication: d loss / d logits_shard = (exp(x - lse) - onehot_local) * grad / count, written by
`ce_bwd` into a new shard-sized tensor or, with `inplace_backward=True`, into the shard itself.

Under torch.compile the library is looked up once at trace time (as in `ops`) and the gradient is
always written out of place (see `ops.cross_entropy`); the all-reduces are traced by dynamo as
functional collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import build, ops
from .ops import _compiling, _resolve, logits_3d


def _local_stats_torch(logits, targets, ignore_index, vocab_start):
    V = logits.shape[-1]
    x = logits.reshape(-1, V).float()
    lse = torch.logsumexp(x, dim=-1)
    local = targets - vocab_start
    in_shard = (targets != ignore_index) & (local >= 0) & (local < V)
    xt = x.gather(1, local.clamp(0, V - 1).unsqueeze(1)).squeeze(1)
    return lse, torch.where(in_shard, xt, torch.zeros_like(xt))


def _grad_torch(logits, targets, lse, scale, ignore_index, vocab_start):
    V = logits.shape[-1]
    x = logits.reshape(-1, V).float()
    p = torch.exp(x - lse.unsqueeze(1))
    local = targets - vocab_start
    in_shard = (targets != ignore_index) & (local >= 0) & (local < V)
    # (scatter/masked_fill rather than boolean indexing: no data-dependent shapes under compile)
    p.scatter_add_(1, local.clamp(0, V - 1).unsqueeze(1), -in_shard.to(p.dtype).unsqueeze(1))
    p.mul_(scale)
    p.masked_fill_((targets == ignore_index).unsqueeze(1), 0.0)
    return p.to(logits.dtype).view(logits.shape)


class VocabParallelCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, ignore_index, inplace, lib):
        N = targets.numel()
        if lib is not None:
            kernels = _resolve(lib)
            loss_local = ops.new_out(N, torch.float32, logits.device)
            lse_local = ops.new_out(N, torch.float32, logits.device)
            xt = ops.new_out(N, torch.float32, logits.device)
            kernels.ce_fwd(logits, targets, ignore_index, vocab_start, False, loss_local, lse_local, xt)
        else:
            lse_local, xt = _local_stats_torch(logits, targets, ignore_index, vocab_start)
        m = lse_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # all -inf rows: avoid -inf - -inf
        s_xt = torch.stack([torch.exp(lse_local - m), xt])
        dist.all_reduce(s_xt, op=dist.ReduceOp.SUM, group=group)
        lse = m + torch.log(s_xt[0])
        valid = targets != ignore_index
        count = valid.sum()
        loss = torch.where(valid, lse - s_xt[1], torch.zeros_like(lse)).sum() / count
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.vocab_start, ctx.ignore_index, ctx.inplace, ctx.lib = vocab_start, ignore_index, inplace, lib
        return loss

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse, count = ctx.saved_tensors
        scale = (g.float() / count).reshape(1)
        if ctx.lib is None:
            grad = _grad_torch(logits, targets, lse, scale, ctx.ignore_index, ctx.vocab_start)
            if ctx.inplace:
                logits.copy_(grad)
                grad = logits
            return grad, None, None, None, None, None, None
        grad = logits if ctx.inplace else ops.new_out(logits.shape, logits.dtype, logits.device)
        _resolve(ctx.lib).ce_bwd(logits, targets, lse, scale, ctx.ignore_index, ctx.vocab_start, grad)
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard, targets, vocab_start: int, group=None, ignore_index: int = -100,
                                 *, use_kernels: bool | None = None, inplace_backward: bool = False):
    """Mean cross-entropy over targets != ignore_index, logits split over the vocabulary.

    logits_shard [..., V_r]: this rank's columns [vocab_start, vocab_start + V_r) of the full
    logits; targets [...]: global token ids (identical on every rank of `group`).
    use_kernels: None = the fused kernel when it builds for this device, else torch; True = require
    the kernel; False = plain torch.  Returns the same scalar on every rank."""
    x = logits_3d(logits_shard)
    t = targets.reshape(-1).to(torch.int64).contiguous()
    if t.numel() != x.shape[0] * x.shape[1]:
        raise ValueError(f"targets have {t.numel()} entries for {x.shape[0] * x.shape[1]} logits rows")
    if _compiling():
        lib = _traced_kernel_lib(x.device.type, x.dtype, use_kernels)
    else:
        lib = _kernel_lib(x.device, x.dtype, use_kernels)
    # Out of place under torch.compile, as in ops.cross_entropy.
    inplace = bool(inplace_backward) and not _compiling()
    return VocabParallelCrossEntropyFn.apply(x, t, int(vocab_start), group, int(ignore_index), inplace, lib)


def _kernel_lib(device: torch.device, dtype: torch.dtype, use_kernels: bool | None):
    """The kernel library for `device` (None: plain torch); see `use_kernels`."""
    if use_kernels is not False and ops._dtype_supported(device.type, dtype):
        try:
            lib = build.load(device.type)
        except build.KernelBuildError:
            if use_kernels:
                raise
            return None
        ops.register_fake_impls(lib)
        return lib
    if use_kernels:
        raise RuntimeError(f"no fused cross-entropy kernel for {dtype} on {device.type}")
    return None


def _traced_kernel_lib_impl(device_type: str, dtype: torch.dtype, use_kernels: bool | None) -> str | None:
    lib = _kernel_lib(torch.device(device_type), dtype, use_kernels)
    return None if lib is None else lib.name


# Runs for real at trace time (the build lock cannot be traced); see ops._traced_lib.
_traced_kernel_lib = torch.compiler.assume_constant_result(_traced_kernel_lib_impl)
