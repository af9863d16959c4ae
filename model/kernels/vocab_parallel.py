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

Per-token variants (policy-gradient losses): `vocab_parallel_token_cross_entropy`,
`vocab_parallel_token_entropy` and `vocab_parallel_token_logprob_and_entropy` return float32 [...]
per token (no reduction) and take any per-token upstream gradient.  Each rank computes, per row,
its local lse_r and (for the entropy) its local entropy H_r of the softmax over its own columns
(`ce_ent_fwd`, one read of the shard); with w_r = exp(lse_r - lse) the share of rank r in the
softmax mass, the chain rule of entropy gives  H = sum_r w_r (H_r - log w_r).  Written with
m = all_reduce_max(lse_r) and a_r = exp(lse_r - m):

    s = sum_r a_r,   T = sum_r a_r (H_r + (m - lse_r)),   lse = m + log s,   H = T / s + log s

(one MAX all-reduce of [N] and one SUM all-reduce of at most [4, N]: "max, sum-exp and
sum p*z"; every term >= 0, so no cancellation).  The ranks at the max are counted apart from the
rest (s = c + r, log s = log1p(r) for c == 1) so a row whose mass sits in one shard keeps the
precision of the others' small share.  Backward needs no communication: with the global lse and H,
d/dz_j = p_j (g_ce - g_H (z_j - lse + H)) - g_ce [j == target] on each shard (`ce_bwd` with a
per-row scale when only the CE is asked for, else `ce_ent_bwd`).
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


# ------------------------------------------------------------------------------- per-token variants


def _local_token_stats_torch(logits, targets, ignore_index, vocab_start, want_ent):
    """(lse_r, H_r or None, target logit or None) of this shard, as ce_ent_fwd computes them
    (an ignored row gives 0s)."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V).float()
    lse = torch.logsumexp(x, dim=-1)
    ent = xt = None
    if want_ent:
        logp = x - lse.unsqueeze(1)
        p = logp.exp()
        ent = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    if targets is not None:
        local = targets - vocab_start
        valid = targets != ignore_index
        in_shard = valid & (local >= 0) & (local < V)
        zero = torch.zeros_like(lse)
        xt = torch.where(in_shard, x.gather(1, local.clamp(0, V - 1).unsqueeze(1)).squeeze(1), zero)
        lse = torch.where(valid, lse, zero)
        ent = torch.where(valid, ent, zero) if ent is not None else None
    return lse, ent, xt


def _token_grad_torch(logits, targets, lse, ent, gl, gh, ignore_index, vocab_start):
    """p (gl - gh (log p + H)) - gl onehot_local, 0 for ignored rows (the kernels' formula)."""
    V = logits.shape[-1]
    d = logits.reshape(-1, V).float() - lse.unsqueeze(1)
    p = d.exp()
    c = torch.zeros_like(lse) if gl is None else gl
    if gh is not None:
        g = p * ((c - gh * ent).unsqueeze(1) - gh.unsqueeze(1) * d.clamp_min(-110.0))
    else:
        g = p * c.unsqueeze(1)
    if targets is not None:
        if gl is not None:
            local = targets - vocab_start
            in_shard = (targets != ignore_index) & (local >= 0) & (local < V)
            g.scatter_add_(1, local.clamp(0, V - 1).unsqueeze(1), -(in_shard.to(g.dtype) * gl).unsqueeze(1))
        g.masked_fill_((targets == ignore_index).unsqueeze(1), 0.0)
    return g.to(logits.dtype).view(logits.shape)


class VocabParallelTokenFn(torch.autograd.Function):
    """Per-token CE and/or entropy [N] over a vocabulary split (see the module docstring): the
    outputs asked for, (ce, entropy), ce or entropy; targets None: entropy only, no ignored rows."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, ignore_index, want_ce, want_ent, lib):
        N = logits.shape[0] * logits.shape[1]
        dev = logits.device
        xt = None
        if lib is not None:
            kernels = _resolve(lib)
            lse_l = ops.new_out(N, torch.float32, dev)
            xt = ops.new_out(N, torch.float32, dev) if targets is not None else None
            if want_ent:
                ent_l = ops.new_out(N, torch.float32, dev)
                kernels.ce_ent_fwd(logits, targets, ignore_index, vocab_start, False, lse_l, ent_l, None, xt)
            else:  # the CE alone: the cheaper cross-entropy forward
                ent_l = None
                loss_l = ops.new_out(N, torch.float32, dev)
                kernels.ce_fwd(logits, targets, ignore_index, vocab_start, False, loss_l, lse_l, xt)
        else:
            lse_l, ent_l, xt = _local_token_stats_torch(logits, targets, ignore_index, vocab_start, want_ent)
        m = lse_l.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # all -inf rows: avoid -inf - -inf
        # The ranks at the max (a_r == 1) are counted apart from the others' mass (see above).
        at_max = (lse_l == m).to(torch.float32)
        rest = torch.exp(lse_l - m) * (1.0 - at_max)
        parts = [at_max, rest]
        if targets is not None:
            parts.append(xt)
        if want_ent:
            parts.append((at_max + rest) * (ent_l + (m - lse_l)))
        red = torch.stack(parts)
        dist.all_reduce(red, op=dist.ReduceOp.SUM, group=group)
        cnt, rest = red[0], red[1]
        s = cnt + rest
        log_s = torch.where(cnt == 1.0, torch.log1p(rest), torch.log(s))
        lse = m + log_s
        valid = targets != ignore_index if targets is not None else None
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        ce = ent = None
        if want_ce:
            ce = torch.where(valid, (m - red[2]) + log_s, zero)
        if want_ent:
            ent = red[-1] / s + log_s
            if valid is not None:
                ent = torch.where(valid, ent, zero)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.vocab_start, ctx.ignore_index, ctx.lib = vocab_start, ignore_index, lib
        ctx.want_ce, ctx.want_ent = want_ce, want_ent
        if not _compiling():  # dynamo cannot trace this call; backward handles None gradients
            ctx.set_materialize_grads(False)
        if want_ce and want_ent:
            return ce, ent
        return ce if want_ce else ent

    @staticmethod
    def backward(ctx, *grads):
        logits, targets, lse, ent = ctx.saved_tensors
        if ctx.want_ce and ctx.want_ent:
            gl, gh = grads
        else:
            gl, gh = (grads[0], None) if ctx.want_ce else (None, grads[0])
        gl, gh = ops._grad32(gl), ops._grad32(gh)
        nones = (None,) * 7
        if gl is None and gh is None:
            return (None, *nones)
        if ctx.lib is None:
            grad = _token_grad_torch(logits, targets, lse, ent, gl, gh, ctx.ignore_index, ctx.vocab_start)
            return (grad, *nones)
        grad = ops.new_out(logits.shape, logits.dtype, logits.device)
        if gh is None:  # CE only: the cross-entropy backward with a per-row scale
            _resolve(ctx.lib).ce_bwd(logits, targets, lse, gl, ctx.ignore_index, ctx.vocab_start, grad)
        else:
            _resolve(ctx.lib).ce_ent_bwd(logits, targets, lse, ent, gl, gh, ctx.ignore_index, ctx.vocab_start, grad)
        return (grad, *nones)


def _vp_token(logits_shard, targets, vocab_start, group, ignore_index, want_ce, want_ent, use_kernels):
    x = logits_3d(logits_shard)
    t = None
    if targets is not None:
        t = targets.reshape(-1).to(torch.int64).contiguous()
        if t.numel() != x.shape[0] * x.shape[1]:
            raise ValueError(f"targets have {t.numel()} entries for {x.shape[0] * x.shape[1]} logits rows")
    if _compiling():
        lib = _traced_kernel_lib(x.device.type, x.dtype, use_kernels)
    else:
        lib = _kernel_lib(x.device, x.dtype, use_kernels)
    return VocabParallelTokenFn.apply(x, t, int(vocab_start), group, int(ignore_index), want_ce, want_ent, lib)


def vocab_parallel_token_cross_entropy(logits_shard, targets, vocab_start: int, group=None, ignore_index: int = -100,
                                       *, use_kernels: bool | None = None):
    """Per-token cross-entropy -log p(target), float32 of targets' shape (0 where targets ==
    ignore_index), from logits split over the vocabulary: logits_shard [..., V_r] holds this rank's
    columns [vocab_start, vocab_start + V_r) of the full logits, targets [...] global ids (the
    same on every rank of `group`).  Differentiable with any per-token upstream gradient; every
    rank returns the same values.  use_kernels as in `vocab_parallel_cross_entropy`."""
    return _vp_token(logits_shard, targets, vocab_start, group, ignore_index, True, False,
                     use_kernels).view(targets.shape)


def vocab_parallel_token_entropy(logits_shard, group=None, *, use_kernels: bool | None = None):
    """Per-token entropy -sum_j p_j log p_j of the softmax over the full (split) vocabulary,
    float32 [...] for logits_shard [..., V_r] (this rank's columns).  Exact (float32 accumulation),
    differentiable: d/dz_j = -p_j (log p_j + H) on each shard, no communication in backward."""
    return _vp_token(logits_shard, None, 0, group, -100, False, True, use_kernels).view(logits_shard.shape[:-1])


def vocab_parallel_token_logprob_and_entropy(logits_shard, targets, vocab_start: int, group=None,
                                             ignore_index: int = -100, *, use_kernels: bool | None = None):
    """(log p(target), entropy), float32 of targets' shape, from one read of the shard and the
    same two all-reduces; positions with targets == ignore_index are 0 in both outputs and get no
    gradient (as `ops.token_logprob_and_entropy`)."""
    ce, ent = _vp_token(logits_shard, targets, vocab_start, group, ignore_index, True, True, use_kernels)
    return -ce.view(targets.shape), ent.view(targets.shape)
