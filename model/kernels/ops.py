"""Autograd wrappers around the compiled kernels and the per-call device dispatch.

Each op is a `torch.autograd.Function` whose forward/backward call `torch.ops.llmk_cpu.*` (CPU
tensors) or `torch.ops.llmk_cuda.*` (CUDA tensors); the library is picked from the input's device
at call time and built lazily on first use (see `build.py`).  All outputs are allocated here and
passed to the kernels, which write every element.

Inputs the kernels do not cover go to the PyTorch reference (same semantics), never to a wrong
result: other devices or dtypes (float64, float16 on CPU), mixed dtypes that change the result
type, broadcasting shapes, cos/sin that require grad.  Such a fallback is logged once per
(op, reason) at INFO level ("auto") or warned once ("fused").

torch.compile: every op traces with fullgraph=True (CPU and CUDA).  Each kernel library gets fake
(meta) implementations as soon as it is loaded (`register_fake_impls`: every op writes only its
caller-provided outputs and returns nothing, which AOTAutograd functionalises); under tracing the
library lookup and the fallback decision run once, for real, at trace time (dynamo cannot enter
the build lock), and the autograd Functions receive the library as its `torch.ops` namespace
name, which dynamo resolves to the ops.  See `_traced_lib` and `CrossEntropyFn`.
"""

from __future__ import annotations

import logging
import threading
import warnings

import torch

from . import build, reference

log = logging.getLogger(__name__)

CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_once_lock = threading.Lock()
_once_keys: set[str] = set()


def _once(key: str) -> bool:
    with _once_lock:
        if key in _once_keys:
            return False
        _once_keys.add(key)
        return True


def reset_warnings() -> None:
    """Forget which one-time messages were emitted (tests)."""
    with _once_lock:
        _once_keys.clear()


def kernel_lib(device: torch.device, mode: str):
    """The kernel library for `device` or None (use the reference).

    mode "fused": a failed build raises RuntimeError; "auto": warns once per process and device type."""
    dev = device.type
    if dev not in ("cpu", "cuda"):
        _fallback_note(mode, "*", f"no fused kernels for device type {dev!r}")
        return None
    try:
        lib = build.load(dev)
    except build.KernelBuildError as e:
        if mode == "fused":
            raise RuntimeError(
                f"model.kernels=fused: the fused {dev.upper()} kernels could not be built ({e}). "
                "Fix the toolchain, or use kernels=auto (falls back to PyTorch) or kernels=torch."
            ) from e
        if _once(f"build-failed:{dev}"):
            warnings.warn(
                f"model.kernels=auto: fused {dev.upper()} kernels unavailable, using the PyTorch reference "
                f"ops instead. Reason: {e}",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    register_fake_impls(lib)  # once per library, for torch.compile
    return lib


def _fallback_note(mode: str, op: str, reason: str) -> None:
    if not _once(f"fallback:{op}:{reason}"):
        return
    msg = f"model.kernels ({mode}): {op} uses the PyTorch reference: {reason}"
    if mode == "fused":
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
    else:
        log.info(msg)


# ------------------------------------------------------------------------------- torch.compile

# The ops of each kernel library (model/kernels/csrc/ops_schema.h; a test checks this list against
# the loaded libraries' schemas).
KERNEL_OPS = ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "bias_gelu_fwd",
              "bias_gelu_bwd", "swiglu_fwd", "swiglu_bwd", "rope_fwd", "ce_fwd", "ce_bwd", "ce_ent_fwd",
              "ce_ent_bwd")

_fakes_lock = threading.Lock()
_fake_libs: dict[str, torch.library.Library] = {}  # namespace -> the FRAGMENT holding its fakes


def _fake_kernel(*args, **kwargs) -> None:
    # Every op writes only its caller-provided `(a!)` outputs, which a fake tensor already
    # describes (shape, dtype, device, strides), and returns nothing.
    return None


def register_fake_impls(lib) -> None:
    """Fake (and meta) implementations of every op of `lib`, a `torch.ops` namespace such as
    `torch.ops.llmk_cpu`, so torch.compile / FakeTensor / meta tensors can trace the ops.
    Idempotent; kernel_lib() calls it right after a library is loaded."""
    ns = getattr(lib, "name", None)
    if ns in _fake_libs:  # the per-call fast path (a dict lookup)
        return
    if not isinstance(lib, torch._ops._OpNamespace) or not ns:
        raise TypeError(f"register_fake_impls needs a torch.ops namespace, got {type(lib).__name__}")
    with _fakes_lock:
        if ns in _fake_libs:
            return
        frag = torch.library.Library(ns, "FRAGMENT")
        for op in KERNEL_OPS:
            torch.library.register_fake(f"{ns}::{op}", _fake_kernel, lib=frag)
        _fake_libs[ns] = frag


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _traced_lib_impl(op: str, device_type: str, dtype: torch.dtype, mode: str) -> str | None:
    if not _dtype_supported(device_type, dtype):
        _fallback_note(mode, op, f"dtype {dtype} on {device_type}")
        return None
    lib = kernel_lib(torch.device(device_type), mode)
    if lib is None:
        return None
    if not isinstance(lib, torch._ops._OpNamespace):
        raise TypeError(f"model.kernels: torch.compile can only trace kernel libraries that are torch.ops "
                        f"namespaces; kernel_lib() returned {type(lib).__name__}")
    register_fake_impls(lib)  # (a no-op unless kernel_lib was replaced, e.g. by a test)
    return lib.name


# Under dynamo the lookup (build lock, one-time notes, a possible first build) cannot be traced;
# it runs for real once per trace and its result, the library's torch.ops namespace name (or None:
# use the reference), is baked into the graph.  That is sound: a process keeps its library.
_traced_lib = torch.compiler.assume_constant_result(_traced_lib_impl)


def _resolve(lib):
    """A library passed to the autograd Functions: the namespace itself (eager) or, when traced,
    its name in torch.ops (a constant dynamo can carry through ctx and resolve to the ops)."""
    return getattr(torch.ops, lib) if isinstance(lib, str) else lib


def _note(mode: str, op: str, reason: str) -> None:
    if _compiling():
        _traced_note(mode, op, reason)
    else:
        _fallback_note(mode, op, reason)


def _traced_note_impl(mode: str, op: str, reason: str) -> bool:
    _fallback_note(mode, op, reason)
    return True


_traced_note = torch.compiler.assume_constant_result(_traced_note_impl)


def new_out(shape, dtype, device) -> torch.Tensor:
    """Allocates every kernel output (uninitialised; the kernels write all of it).  The tests
    replace this with a NaN-filling version so an element a kernel forgets to write fails."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dtype_supported(device_type: str, dtype: torch.dtype) -> bool:
    return dtype in (CUDA_DTYPES if device_type == "cuda" else CPU_DTYPES)


def _dtype_ok(t: torch.Tensor) -> bool:
    return _dtype_supported(t.device.type, t.dtype)


def _vec32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


# ------------------------------------------------------------------------------------------- norms


class LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, lib):
        N, D = x.shape
        w32, b32 = _vec32(weight), _vec32(bias)
        y = new_out(x.shape, x.dtype, x.device)
        h = new_out(x.shape, x.dtype, x.device) if residual is not None else None
        mean = new_out(N, torch.float32, x.device)
        rstd = new_out(N, torch.float32, x.device)
        _resolve(lib).layer_norm_fwd(x, residual, w32, b32, eps, y, h, mean, rstd)
        ctx.save_for_backward(h if h is not None else x, mean, rstd, w32)
        ctx.lib, ctx.has_res = lib, residual is not None
        ctx.wdtype = weight.dtype if weight is not None else None
        ctx.bdtype = bias.dtype if bias is not None else None
        if not _compiling():  # dynamo cannot trace this call; backward handles zeros too
            ctx.set_materialize_grads(False)
        if h is not None:
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, mean, rstd, w32 = ctx.saved_tensors
        D = h.shape[1]
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        dy = torch.zeros_like(h) if dy is None else dy.contiguous()
        dres = dh.contiguous() if (ctx.has_res and dh is not None) else None
        dx = new_out(h.shape, h.dtype, h.device)
        dw = new_out(D, torch.float32, h.device) if need_w else None
        db = new_out(D, torch.float32, h.device) if need_b else None
        _resolve(ctx.lib).layer_norm_bwd(dy, h, mean, rstd, w32, dres, dx, dw, db)
        return (
            dx if need_x else None,
            dx if need_r else None,
            dw.to(ctx.wdtype) if need_w else None,
            db.to(ctx.bdtype) if need_b else None,
            None,
            None,
        )


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype, lib):
        N, D = x.shape
        w32 = _vec32(weight)
        y = new_out((N, D), out_dtype, x.device)
        h = new_out(x.shape, x.dtype, x.device) if residual is not None else None
        rstd = new_out(N, torch.float32, x.device)
        _resolve(lib).rms_norm_fwd(x, residual, w32, eps, y, h, rstd)
        ctx.save_for_backward(h if h is not None else x, rstd, w32)
        ctx.lib, ctx.has_res, ctx.out_dtype = lib, residual is not None, out_dtype
        ctx.wdtype = weight.dtype if weight is not None else None
        if not _compiling():  # dynamo cannot trace this call; backward handles zeros too
            ctx.set_materialize_grads(False)
        if h is not None:
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, rstd, w32 = ctx.saved_tensors
        D = h.shape[1]
        need_x, need_r, need_w = ctx.needs_input_grad[:3]
        if dy is None:
            dy = torch.zeros(h.shape, dtype=ctx.out_dtype, device=h.device)
        dy = dy.contiguous()
        dres = dh.contiguous() if (ctx.has_res and dh is not None) else None
        dx = new_out(h.shape, h.dtype, h.device)
        dw = new_out(D, torch.float32, h.device) if need_w else None
        _resolve(ctx.lib).rms_norm_bwd(dy, h, rstd, w32, dres, dx, dw)
        return dx if need_x else None, dx if need_r else None, dw.to(ctx.wdtype) if need_w else None, None, None, None


# ------------------------------------------------------------------------------------- pointwise


class BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lib):
        b32 = _vec32(bias)
        y = new_out(x.shape, x.dtype, x.device)
        _resolve(lib).bias_gelu_fwd(x, b32, y)
        ctx.save_for_backward(x, b32)
        ctx.lib = lib
        ctx.bdtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, b32 = ctx.saved_tensors
        need_b = ctx.needs_input_grad[1]
        dx = new_out(x.shape, x.dtype, x.device)
        db = new_out(x.shape[1], torch.float32, x.device) if need_b else None
        _resolve(ctx.lib).bias_gelu_bwd(dy.contiguous(), x, b32, dx, db)
        return dx, db.to(ctx.bdtype) if need_b else None, None


class SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, lib):
        y = new_out(gate.shape, gate.dtype, gate.device)
        _resolve(lib).swiglu_fwd(gate, up, y)
        ctx.save_for_backward(gate, up)
        ctx.lib = lib
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg = new_out(gate.shape, gate.dtype, gate.device)
        du = new_out(dg.shape, dg.dtype, dg.device)
        _resolve(ctx.lib).swiglu_bwd(dy.contiguous(), gate, up, dg, du)
        return dg, du, None


class RopeFn(torch.autograd.Function):
    """Rotates q and k with one cos/sin; backward applies the transposed rotation."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, lib):
        qo = new_out(q.shape, q.dtype, q.device)
        ko = new_out(k.shape, k.dtype, k.device)
        kernels = _resolve(lib)
        kernels.rope_fwd(q, cos, sin, False, qo)
        kernels.rope_fwd(k, cos, sin, False, ko)
        ctx.save_for_backward(cos, sin)
        ctx.lib = lib
        if not _compiling():  # dynamo cannot trace this call; backward handles zeros too
            ctx.set_materialize_grads(False)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = []
        for g in (dq, dk):
            if g is None:
                grads.append(None)
                continue
            out = new_out(g.shape, g.dtype, g.device)
            # (a traced backward may not read strides in torch 2.6: contiguous() there)
            _resolve(ctx.lib).rope_fwd(g.contiguous() if _compiling() else _head_view(g), cos, sin, True, out)
            grads.append(out)
        return grads[0], grads[1], None, None, None


# --------------------------------------------------------------------------------- cross-entropy


def logits_3d(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [B, T, V] without copying when the rows have two-level strides (e.g. a slice
    `logits[:, :-1]`); only the vocabulary dimension must be contiguous."""
    if logits.dim() == 1:
        x = logits.view(1, 1, -1)
    elif logits.dim() == 2:
        x = logits.unsqueeze(0)
    elif logits.dim() == 3:
        x = logits
    else:
        x = logits.reshape(-1, logits.shape[-2], logits.shape[-1])
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


class CrossEntropyFn(torch.autograd.Function):
    """Mean CE over non-ignored rows.  Saves only the logits (already alive) and lse [N].

    Backward writes (softmax - onehot) * grad / count either into a fresh tensor (the gradient
    itself, no other [N, V] temporary) or, with `inplace=True`, into the logits buffer (zero new
    [N, V] memory).  The in-place path bumps the logits' version counter, so any other autograd
    node that saved these logits (or a second backward through this one) fails loudly instead of
    reading the gradient as logits.  Only use it when nothing else reads the logits afterwards."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, inplace, lib):
        N = targets.numel()
        loss_rows = new_out(N, torch.float32, logits.device)
        lse = new_out(N, torch.float32, logits.device)
        _resolve(lib).ce_fwd(logits, targets, ignore_index, 0, True, loss_rows, lse, None)
        count = (targets != ignore_index).sum()
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.lib, ctx.ignore_index, ctx.inplace = lib, ignore_index, inplace
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse, count = ctx.saved_tensors
        scale = (g.float() / count).reshape(1)
        if ctx.inplace:
            grad = logits
        else:
            grad = new_out(logits.shape, logits.dtype, logits.device)
        _resolve(ctx.lib).ce_bwd(logits, targets, lse, scale, ctx.ignore_index, 0, grad)
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None


class TokenCrossEntropyFn(torch.autograd.Function):
    """Per-token CE [N] (0 for ignored rows).  Saves the logits and lse [N]; backward writes
    (softmax - onehot) * g_i with the per-row upstream gradient g [N] (ce_bwd with a per-row scale)
    into a fresh tensor, the only [N, V] allocation."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, lib):
        N = targets.numel()
        loss_rows = new_out(N, torch.float32, logits.device)
        lse = new_out(N, torch.float32, logits.device)
        _resolve(lib).ce_fwd(logits, targets, ignore_index, 0, True, loss_rows, lse, None)
        ctx.save_for_backward(logits, targets, lse)
        ctx.lib, ctx.ignore_index = lib, ignore_index
        return loss_rows

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        grad = new_out(logits.shape, logits.dtype, logits.device)
        _resolve(ctx.lib).ce_bwd(logits, targets, lse, g.float().contiguous(), ctx.ignore_index, 0, grad)
        return grad, None, None, None


class TokenEntropyFn(torch.autograd.Function):
    """Per-token entropy [N] (targets None), or (CE [N], entropy [N]) with targets (ignored rows:
    both 0, no gradient), from one read of the logits (ce_ent_fwd).  Saves the logits, lse and H;
    backward writes p (gl - gh (log p + H)) - gl onehot into a fresh tensor in one pass (ce_ent_bwd),
    with only the upstream gradients that exist (an unused output costs nothing)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, lib):
        N = logits.shape[0] * logits.shape[1]
        lse = new_out(N, torch.float32, logits.device)
        ent = new_out(N, torch.float32, logits.device)
        loss = new_out(N, torch.float32, logits.device) if targets is not None else None
        _resolve(lib).ce_ent_fwd(logits, targets, ignore_index, 0, True, lse, ent, loss, None)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.lib, ctx.ignore_index, ctx.with_ce = lib, ignore_index, targets is not None
        if not _compiling():  # dynamo cannot trace this call; backward handles None gradients
            ctx.set_materialize_grads(False)
        return (loss, ent) if targets is not None else ent

    @staticmethod
    def backward(ctx, *grads):
        logits, targets, lse, ent = ctx.saved_tensors
        gl, gh = grads if ctx.with_ce else (None, grads[0])
        if gl is None and gh is None:
            return None, None, None, None
        grad = new_out(logits.shape, logits.dtype, logits.device)
        _resolve(ctx.lib).ce_ent_bwd(logits, targets, lse, ent, _grad32(gl), _grad32(gh), ctx.ignore_index, 0, grad)
        return grad, None, None, None


def _grad32(g: torch.Tensor | None) -> torch.Tensor | None:
    # (an upstream gradient may be an expanded scalar, e.g. from .sum(): materialised, N floats)
    return None if g is None else g.reshape(-1).float().contiguous()


# ----------------------------------------------------------------------------------- op entries


def _kernel_for(x: torch.Tensor, op: str, mode: str):
    """The compiled library for `x`'s device, or None when the reference must run instead: an
    unsupported dtype (noted once) or a library that did not build (`kernel_lib` decides).
    Under torch.compile: the library's torch.ops namespace name (see `_traced_lib`)."""
    if _compiling():
        return _traced_lib(op, x.device.type, x.dtype, mode)
    if not _dtype_ok(x):
        _fallback_note(mode, op, f"dtype {x.dtype} on {x.device.type}")
        return None
    return kernel_lib(x.device, mode)


def _promote_residual(x, residual):
    """x and residual in their common dtype: h = x + residual has that dtype in the reference too.
    Under autocast the block output (bf16) meets the float32 residual stream; one up-cast of the
    smaller tensor keeps the norm fused instead of falling back to the reference."""
    if residual is None or residual.dtype == x.dtype:
        return x, residual
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


def layer_norm(x, weight, bias, eps: float, residual=None, *, mode: str = "fused"):
    def ref():
        return reference.layer_norm(x, weight, bias, eps, residual=residual)

    x, residual = _promote_residual(x, residual)
    lib = _kernel_for(x, "layer_norm", mode)
    if lib is None:
        return ref()
    D = x.shape[-1]
    reason = None
    if residual is not None and residual.shape != x.shape:
        reason = "residual shape differs from x"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (D,) or not p.is_floating_point() or p.device != x.device):
            reason = f"{name} is not a [D] float tensor on x's device"
    if reason:
        _note(mode, "layer_norm", reason)
        return ref()
    res = _rows(residual) if residual is not None else None
    out = LayerNormFn.apply(_rows(x), res, weight, bias, float(eps), lib)
    if residual is not None:
        y, h = out
        return y.view(x.shape), h.view(x.shape)
    return out.view(x.shape)


def rms_norm(x, weight, eps: float, residual=None, *, mode: str = "fused"):
    def ref():
        return reference.rms_norm(x, weight, eps, residual=residual)

    x, residual = _promote_residual(x, residual)
    lib = _kernel_for(x, "rms_norm", mode)
    if lib is None:
        return ref()
    D = x.shape[-1]
    # promote_types == result_type for a [D] weight (anything else falls back below); unlike
    # result_type it traces under torch.compile.
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    reason = None
    if residual is not None and residual.shape != x.shape:
        reason = "residual shape differs from x"
    if weight is not None and (weight.shape != (D,) or not weight.is_floating_point() or weight.device != x.device):
        reason = "weight is not a [D] float tensor on x's device"
    elif out_dtype not in (x.dtype, torch.float32):
        reason = f"result dtype {out_dtype}"
    if reason:
        _note(mode, "rms_norm", reason)
        return ref()
    res = _rows(residual) if residual is not None else None
    out = RMSNormFn.apply(_rows(x), res, weight, float(eps), out_dtype, lib)
    if residual is not None:
        y, h = out
        return y.view(x.shape), h.view(x.shape)
    return out.view(x.shape)


def bias_gelu(x, bias, *, mode: str = "fused"):
    def ref():
        return reference.bias_gelu(x, bias)

    lib = _kernel_for(x, "bias_gelu", mode)
    if lib is None:
        return ref()
    if bias is not None and (bias.shape != (x.shape[-1],) or bias.dtype != x.dtype or bias.device != x.device):
        _note(mode, "bias_gelu", "bias is not a [D] tensor of x's dtype")
        return ref()
    return BiasGeluFn.apply(_rows(x), bias, lib).view(x.shape)


def _rows_strided(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D] keeping a view when rows are evenly strided (e.g. chunks of a fused GEMM)."""
    r = t.reshape(-1, t.shape[-1])
    if r.shape[1] > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


def swiglu(gate, up, *, mode: str = "fused"):
    def ref():
        return reference.swiglu(gate, up)

    lib = _kernel_for(gate, "swiglu", mode)
    if lib is None:
        return ref()
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        _note(mode, "swiglu", "gate and up differ in shape/dtype")
        return ref()
    return SwiGLUFn.apply(_rows_strided(gate), _rows_strided(up), lib).view(gate.shape)


def _rope_table(t: torch.Tensor, B: int, T: int, D: int) -> torch.Tensor | None:
    """cos/sin as contiguous float32 [1 or B, T, D], or None when the layout is not supported."""
    if t.dim() == 2 and tuple(t.shape) == (T, D):
        t = t.unsqueeze(0)
    elif t.dim() == 4 and t.shape[1] == 1 and t.shape[0] in (1, B) and tuple(t.shape[2:]) == (T, D):
        t = t[:, 0]
    else:
        return None
    return t.detach().to(torch.float32).contiguous()


def _head_view(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def rope(q, k, cos, sin, *, mode: str = "fused"):
    def ref():
        return reference.rope(q, k, cos, sin)

    lib = _kernel_for(q, "rope", mode)
    if lib is None:
        return ref()
    reason = None
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        reason = "q/k are not [B, H, T, D] with matching B, T, D"
    elif q.shape[-1] % 2:
        reason = "odd head dim"
    elif not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        reason = "q, k, cos, sin dtypes differ (result dtype would change)"
    elif cos.requires_grad or sin.requires_grad:
        reason = "cos/sin require grad"
    elif cos.device != q.device or sin.device != q.device or k.device != q.device:
        reason = "tensors on different devices"
    if reason is None:
        B, _, T, D = q.shape
        c, s = _rope_table(cos, B, T, D), _rope_table(sin, B, T, D)
        if c is None or s is None or c.shape[0] != s.shape[0]:
            reason = "cos/sin shape is not [T, D] or [B|1, 1, T, D]"
    if reason:
        _note(mode, "rope", reason)
        return ref()
    return RopeFn.apply(_head_view(q), _head_view(k), c, s, lib)


def cross_entropy(logits, targets, ignore_index: int = -100, *, inplace_backward: bool = False,
                  mode: str = "fused"):
    def ref():
        return reference.cross_entropy(logits, targets, ignore_index=ignore_index)

    lib = _kernel_for(logits, "cross_entropy", mode)
    if lib is None:
        return ref()
    x = logits_3d(logits)
    t = targets.reshape(-1)
    if t.numel() != x.shape[0] * x.shape[1] or t.is_floating_point() or t.device != logits.device:
        _note(mode, "cross_entropy", "targets do not match the logits rows")
        return ref()
    t = t.to(torch.int64).contiguous()
    # Under torch.compile the gradient is always written out of place: the in-place path writes
    # into a tensor saved by the forward and bumps its version counter, which a traced backward
    # cannot express (AOTAutograd would copy the result back, saving nothing).  The compiled
    # graph owns its intermediates, and the result is the same gradient.
    inplace = bool(inplace_backward) and not _compiling()
    return CrossEntropyFn.apply(x, t, int(ignore_index), inplace, lib)


def _token_rows(logits, targets, op: str, mode: str):
    """(logits as [B, T, V], targets as contiguous int64 [N]) for the token ops, or None after a
    fallback note when the targets do not match the logits rows."""
    x = logits_3d(logits)
    t = targets.reshape(-1)
    if t.numel() != x.shape[0] * x.shape[1] or t.is_floating_point() or t.device != logits.device:
        _note(mode, op, "targets do not match the logits rows")
        return None
    return x, t.to(torch.int64).contiguous()


def token_cross_entropy(logits, targets, ignore_index: int = -100, *, mode: str = "fused"):
    """Per-token cross-entropy  -log softmax(logits)[..., target]  as float32 of targets' shape.

    logits [..., V] (float32/bf16 on CPU, also float16 on CUDA; the vocabulary dimension must be
    contiguous, rows may be strided, e.g. logits[:, :-1]); targets [...] int, one per logits row.
    Positions with targets == ignore_index are 0 and get no gradient.  Differentiable w.r.t. the
    logits with any upstream gradient g [...]: d/dz_j = g (softmax(z)_j - [j == target]).
    log pi(a_t | s_t) = -token_cross_entropy(...).  One pass over the logits forward (saving one
    float per token) and one backward pass that writes the gradient, the only [N, V] allocation."""
    def ref():
        return reference.token_cross_entropy(logits, targets, ignore_index=ignore_index)

    lib = _kernel_for(logits, "token_cross_entropy", mode)
    if lib is None:
        return ref()
    rows = _token_rows(logits, targets, "token_cross_entropy", mode)
    if rows is None:
        return ref()
    return TokenCrossEntropyFn.apply(*rows, int(ignore_index), lib).view(targets.shape)


def token_entropy(logits, *, mode: str = "fused"):
    """Per-token entropy of softmax(logits) as float32 [...] (logits [..., V], layouts as in
    `token_cross_entropy`):

        H = -sum_j p_j log p_j = lse - sum_j p_j z_j,      dH/dz_k = -p_k (log p_k + H)

    computed exactly (float32 accumulation), in one pass over each row from the online state
    m = max z, s = sum exp(z - m), u = sum exp(z - m)(z - m):  H = log s - u / s (both terms >= 0,
    no cancellation for large logits).  -inf logits (masked tokens) contribute p log p = 0.
    Backward: one pass, writes only the gradient."""
    def ref():
        return reference.token_entropy(logits)

    lib = _kernel_for(logits, "token_entropy", mode)
    if lib is None:
        return ref()
    x = logits_3d(logits)
    return TokenEntropyFn.apply(x, None, -100, lib).view(logits.shape[:-1])


def token_logprob_and_entropy(logits, targets, ignore_index: int = -100, *, mode: str = "fused"):
    """(log pi(target) [...], entropy [...]), both float32 of targets' shape, from ONE read of the
    logits: what a policy-gradient loss (REINFORCE / GRPO / PPO with an entropy bonus) needs per
    token.  logprob = -token_cross_entropy, entropy = token_entropy, except that positions with
    targets == ignore_index are 0 in BOTH outputs and get no gradient from either (an ignored
    token, e.g. a prompt or padding position, takes no part; such rows are not even read).
    Backward is one pass for both upstream gradients:
        d/dz_j = -g_logp (p_j - [j == target]) - g_H p_j (log p_j + H)."""
    def ref():
        return reference.token_logprob_and_entropy(logits, targets, ignore_index=ignore_index)

    lib = _kernel_for(logits, "token_logprob_and_entropy", mode)
    if lib is None:
        return ref()
    rows = _token_rows(logits, targets, "token_logprob_and_entropy", mode)
    if rows is None:
        return ref()
    ce, ent = TokenEntropyFn.apply(*rows, int(ignore_index), lib)
    return -ce.view(targets.shape), ent.view(targets.shape)
