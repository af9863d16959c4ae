"""Fused kernels (model.kernels) against float64 oracles.

Every op runs through `get_ops("fused")` on fresh random inputs (randn: never zeros, weights and
biases included) with odd shapes (widths not multiples of the 8-lane vectors, a single row, a
50257 vocabulary); forward outputs and all gradients (input, weight, bias, residual) are compared
with the PyTorch reference evaluated in float64 (reference.py where it is dtype-agnostic; the
same formula in float64 for rms_norm and cross_entropy, whose references upcast to float32).
Every output buffer the wrappers hand to the kernels is NaN-poisoned (autouse fixture), so an
element a kernel forgets to write fails the comparison.

Tolerances, per element, relative to that element's float64 value with an absolute floor (never
to the tensor's largest element, which would let small elements be far off):
    |fused - oracle| <= rtol * |oracle| + floor * unit (+ the dtype's subnormal spacing)
    float32:        rtol 1e-4,   floor 2e-5
    bfloat16:       rtol 1.6e-2, floor 1.6e-2   (8-bit mantissa: one rounding is 2^-9 = 2e-3)
    float16 (CUDA): rtol 2e-3,   floor 2e-3
`unit` is the scale of the terms that make up the element, where cancellation can leave the
element itself near zero: 1 for the unit-scale quantities of these tests (inputs are randn of
scale 1 to 4); for the gradient of a per-column weight or bias, a sum over rows r of terms
up_r * a_r with a = d out / d parameter (its rounding errors, one per term, add up like a random
walk), sqrt(sum_r up_r^2) * rms(a): the upstream gradients of that column times the typical size
of a (a single a_r can be near zero while the quantities it is computed from, e.g. a LayerNorm's
input and mean, are not: its rounding error does not shrink with it); for a cross-entropy
gradient g * (p - onehot), g * (p + onehot), the magnitude of its two terms (elements far from the
target are then compared relatively, down to 1e-13).
CUDA tests are marked `gpu` and skip without a GPU; their checks (check_cuda_*) also run on CPU
through the CUDA emulator in tests/test_kernels_cuda_emu.py.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from model.kernels import build, get_ops, memprof, reference
from model.kernels import ops as kops

TOL = {  # rtol, floor (see the module docstring)
    torch.float32: (1e-4, 2e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = [torch.float32, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_out(shape, dtype, device):
        return torch.full(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,), float("nan"),
                          dtype=dtype, device=device)

    monkeypatch.setattr(kops, "new_out", nan_out)


@pytest.fixture(scope="module")
def fused():
    build.load("cpu")  # a build failure is a test failure here, not a skip
    return get_ops("fused")


def assert_close(actual, expected, dtype, what="", unit=1.0):
    """|actual - expected| <= rtol * |expected| + floor * unit, element by element (`unit`: a
    number or a tensor of `expected`'s shape, see the module docstring)."""
    rtol, floor = TOL[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = (a - e).abs()
    unit = unit.detach().double().to(e.device) if isinstance(unit, torch.Tensor) else unit
    # + the spacing of the dtype's subnormals: what rounds to zero or a subnormal (float16 below
    # 6e-5) cannot keep its relative precision
    fi = torch.finfo(dtype)
    bound = rtol * e.abs() + floor * unit + fi.smallest_normal * fi.eps
    bad = err > bound
    if bad.any():
        i = int((err / bound).argmax())
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements out of tolerance; worst: element {i}, "
            f"{a.reshape(-1)[i].item():.6g} vs {e.reshape(-1)[i].item():.6g} (bound {bound.reshape(-1)[i].item():.3g})")


def ce_grad_unit(logits64, targets, scale, ignore_index=-100):
    """The magnitude of the two terms of a cross-entropy gradient, scale * (p + onehot) per
    element (0 in ignored rows): the unit of its tolerance floor."""
    p = torch.softmax(logits64.double(), -1)
    valid = (targets != ignore_index).unsqueeze(-1)
    onehot = torch.zeros_like(p).scatter_(-1, targets.clamp(min=0).unsqueeze(-1).to(p.device), 1.0)
    return torch.where(valid.to(p.device), (p + onehot) * scale, 0.0)


def check_against_oracle(fused_fn, oracle_fn, inputs: dict, grad_names, dtype, ref_fn=None, seed=0, units=None):
    """Run fused_fn and oracle_fn (float64 copies of the inputs), compare outputs and grads.
    `units`: the tolerance unit of a gradient by input name (default: `column_terms_unit` for
    `weight` and `bias`, 1 otherwise)."""
    g = torch.Generator().manual_seed(seed + 9973)
    fin = {k: (v.detach().clone().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor) else v)
           for k, v in inputs.items()}
    out = fused_fn(**fin)
    outs = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    sum((o.double() * u).sum() for o, u in zip(outs, ups)).backward()

    oin = {k: (v.detach().double().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor) and
               v.is_floating_point() else v) for k, v in inputs.items()}
    oout = oracle_fn(**oin)
    oouts = oout if isinstance(oout, tuple) else (oout,)
    sum((o * u).sum() for o, u in zip(oouts, ups)).backward()

    if ref_fn is not None:  # the fused op returns the reference's dtypes
        rin = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        rout = ref_fn(**rin)
        routs = rout if isinstance(rout, tuple) else (rout,)
        assert [o.dtype for o in outs] == [o.dtype for o in routs]
    for i, (o, oo) in enumerate(zip(outs, oouts)):
        assert_close(o, oo, dtype, f"output {i}")
    units = dict(units or {})
    for k in ("weight", "bias"):
        if k in grad_names and k not in units:
            units[k] = column_terms_unit(oracle_fn, oin, k, ups)
    for k in grad_names:
        assert fin[k].grad is not None, f"no gradient for {k}"
        assert fin[k].grad.dtype == fin[k].dtype
        assert_close(fin[k].grad, oin[k].grad, dtype, f"grad {k}", unit=units.get(k, 1.0))


def column_terms_unit(oracle_fn, oin: dict, name: str, ups) -> torch.Tensor:
    """For a parameter `name` that acts on each column j of the outputs alone (a norm's weight or
    bias, a bias): its gradient's element j is sum_r up_rj * a_rj, a_rj = d out_rj / d p_j; this
    returns sqrt(sum_r up_rj^2) * rms(a), with a from forward-mode AD of the float64 oracle."""
    import torch.autograd.forward_ad as fwAD

    p = oin[name].detach()
    with fwAD.dual_level():
        args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in oin.items()}
        args[name] = fwAD.make_dual(p, torch.ones_like(p))
        out = oracle_fn(**args)
        tangents = [fwAD.unpack_dual(o).tangent for o in (out if isinstance(out, tuple) else (out,))]
    sq = torch.zeros_like(p)
    for t, u in zip(tangents, ups):
        if t is not None:
            sq += u.pow(2).reshape(-1, p.numel()).sum(0).reshape(p.shape) * t.pow(2).mean()
    return sq.sqrt()


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ oracles


def o_layer_norm(x, weight, bias, eps, residual=None):
    h = x + residual if residual is not None else x
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return (y, h) if residual is not None else y


def o_rms_norm(x, weight, eps, residual=None):
    h = x + residual if residual is not None else x
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = y * weight if weight is not None else y
    return (y, h) if residual is not None else y


def o_cross_entropy(logits, targets, ignore_index=-100):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


# ------------------------------------------------------------------------------------ the tolerance


def test_tolerance_is_per_element_not_per_tensor_max():
    """A 10% error on an element 40 times smaller than the tensor's largest passed the old bound
    (1e-2 x max|oracle|) in bf16; per element it fails. So does a 50% error on a cross-entropy
    gradient element of 1e-6 (far from its target: compared relatively)."""
    e = torch.tensor([20.0, 0.5], dtype=torch.float64)
    assert_close(torch.tensor([20.0, 0.5078125]), e, torch.bfloat16)  # one bf16 rounding of 0.5
    with pytest.raises(AssertionError, match="1/2 elements out of tolerance"):
        assert_close(torch.tensor([20.0, 0.55]), e, torch.bfloat16)
    logits = torch.tensor([[12.0, 0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([0])
    g = torch.softmax(logits, -1) - torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    unit = ce_grad_unit(logits, t, 1.0)
    assert_close(g * (1 + 2**-9), g, torch.bfloat16, unit=unit)
    with pytest.raises(AssertionError):
        assert_close(g * torch.tensor([1.0, 1.0, 1.5], dtype=torch.float64), g, torch.bfloat16, unit=unit)


# -------------------------------------------------------------------------------------------- norms

NORM_SHAPES = [(1, 7), (3, 33), (17, 1000), (5, 4099), (2, 3, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(fused, dtype, shape, residual, affine):
    D = shape[-1]
    inputs = dict(x=randn(*shape, dtype=dtype, seed=1, scale=2.0) + 0.5,
                  weight=randn(D, dtype=dtype, seed=2) if affine else None,
                  bias=randn(D, dtype=dtype, seed=3) if affine else None, eps=1e-5,
                  residual=randn(*shape, dtype=dtype, seed=4) if residual else None)
    grads = [k for k in ("x", "weight", "bias", "residual") if inputs[k] is not None]
    check_against_oracle(fused.layer_norm, o_layer_norm, inputs, grads, dtype, ref_fn=reference.layer_norm)


def test_layer_norm_float32_weight_bf16_input(fused):
    inputs = dict(x=randn(9, 77, dtype=torch.bfloat16, seed=1), weight=randn(77, seed=2), bias=randn(77, seed=3),
                  eps=1e-5, residual=randn(9, 77, dtype=torch.bfloat16, seed=4))
    check_against_oracle(fused.layer_norm, o_layer_norm, inputs, ["x", "weight", "bias", "residual"],
                         torch.bfloat16, ref_fn=reference.layer_norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(fused, dtype, shape, residual):
    D = shape[-1]
    inputs = dict(x=randn(*shape, dtype=dtype, seed=5, scale=3.0), weight=randn(D, dtype=dtype, seed=6),
                  eps=1e-6, residual=randn(*shape, dtype=dtype, seed=7) if residual else None)
    grads = ["x", "weight"] + (["residual"] if residual else [])
    check_against_oracle(fused.rms_norm, o_rms_norm, inputs, grads, dtype, ref_fn=reference.rms_norm)


def test_rms_norm_no_weight_and_float32_weight(fused):
    x = randn(6, 130, dtype=torch.bfloat16, seed=8)
    check_against_oracle(fused.rms_norm, o_rms_norm, dict(x=x, weight=None, eps=1e-5), ["x"], torch.bfloat16,
                         ref_fn=reference.rms_norm)
    # float32 weight with bf16 activations: the reference promotes the output to float32
    check_against_oracle(fused.rms_norm, o_rms_norm, dict(x=x, weight=randn(130, seed=9), eps=1e-5,
                                                          residual=randn(6, 130, dtype=torch.bfloat16, seed=10)),
                         ["x", "weight", "residual"], torch.bfloat16, ref_fn=reference.rms_norm)


def test_norm_only_residual_output_used(fused):
    """Backward with no gradient for y (only for the residual stream h)."""
    x = randn(4, 40, seed=11).requires_grad_()
    r = randn(4, 40, seed=12).requires_grad_()
    w = randn(40, seed=13).requires_grad_()
    _, h = fused.rms_norm(x, w, 1e-5, residual=r)
    h.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(r.grad, torch.ones_like(r))
    torch.testing.assert_close(w.grad, torch.zeros_like(w))


# ----------------------------------------------------------------------------------------- pointwise

POINT_SHAPES = [(1, 5), (3, 37), (33, 1000), (2, 7, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POINT_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(fused, dtype, shape, with_bias):
    inputs = dict(x=randn(*shape, dtype=dtype, seed=14, scale=2.0),
                  bias=randn(shape[-1], dtype=dtype, seed=15) if with_bias else None)
    grads = ["x"] + (["bias"] if with_bias else [])
    check_against_oracle(fused.bias_gelu, reference.bias_gelu, inputs, grads, dtype, ref_fn=reference.bias_gelu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POINT_SHAPES)
def test_swiglu(fused, dtype, shape):
    inputs = dict(gate=randn(*shape, dtype=dtype, seed=16, scale=3.0), up=randn(*shape, dtype=dtype, seed=17))
    check_against_oracle(fused.swiglu, reference.swiglu, inputs, ["gate", "up"], dtype, ref_fn=reference.swiglu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_strided_halves(fused, dtype):
    """gate/up as the two halves of one fused GEMM output (row-strided views, no copy)."""

    def fn(both):
        gate, up = both.chunk(2, dim=-1)
        return fused.swiglu(gate, up)

    def oracle(both):
        gate, up = both.chunk(2, dim=-1)
        return reference.swiglu(gate, up)

    check_against_oracle(fn, oracle, dict(both=randn(2, 5, 2 * 67, dtype=dtype, seed=18)), ["both"], dtype)


ROPE_CASES = [  # B, Hq, Hk, T, D, cos layout
    (1, 1, 1, 1, 2, "td"),
    (2, 3, 3, 7, 10, "td"),
    (2, 4, 2, 9, 64, "td"),  # GQA
    (3, 2, 1, 5, 22, "b1td"),  # per-sequence positions
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_rope(fused, dtype, case, transposed):
    B, Hq, Hk, T, D, layout = case
    if transposed:  # the model's layout: [B, T, H, D] projections viewed as [B, H, T, D]
        q = randn(B, T, Hq, D, dtype=dtype, seed=19).transpose(1, 2)
        k = randn(B, T, Hk, D, dtype=dtype, seed=20).transpose(1, 2)
    else:
        q, k = randn(B, Hq, T, D, dtype=dtype, seed=19), randn(B, Hk, T, D, dtype=dtype, seed=20)
    cos, sin = reference.rope_cache(T + 3, D, 10000.0)
    if layout == "td":
        cos, sin = cos[3:], sin[3:]
    else:
        pos = torch.randint(0, T + 3, (B, T), generator=torch.Generator().manual_seed(21))
        cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    inputs = dict(q=q, k=k, cos=cos.to(dtype), sin=sin.to(dtype))

    def fn(q, k, cos, sin):
        return fused.rope(q, k, cos, sin)

    check_against_oracle(fn, reference.rope, inputs, ["q", "k"], dtype, ref_fn=reference.rope)


# ------------------------------------------------------------------------------------ cross-entropy

CE_SHAPES = [(1, 50257), (6, 50257), (13, 1000), (4, 7), (2, 5, 333)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy(fused, dtype, shape, inplace):
    V = shape[-1]
    logits = randn(*shape, dtype=dtype, seed=22, scale=4.0)
    targets = torch.randint(0, V, shape[:-1], generator=torch.Generator().manual_seed(23))
    flat = targets.view(-1)
    if flat.numel() > 2:
        flat[1] = -100
        flat[-1] = -100

    def fn(logits, targets):
        # in-place writes the gradient into the buffer of `logits`: give it a private copy
        x = logits * 1 if inplace else logits
        return fused.cross_entropy(x, targets, ignore_index=-100, inplace_backward=inplace)

    unit = ce_grad_unit(logits, targets, 1 / int((targets != -100).sum()))
    check_against_oracle(fn, o_cross_entropy, dict(logits=logits, targets=targets), ["logits"], dtype,
                         ref_fn=reference.cross_entropy, units={"logits": unit})


def test_cross_entropy_other_ignore_index_and_sliced_logits(fused):
    logits = randn(3, 9, 101, seed=24).requires_grad_()
    targets = torch.randint(0, 101, (3, 8), generator=torch.Generator().manual_seed(25))
    targets[0, 2] = 7
    for ignore in (7, -1):
        t = targets.clone()
        t[1, :3] = ignore
        loss = fused.cross_entropy(logits[:, :-1], t, ignore_index=ignore)  # strided rows, no copy
        ref = o_cross_entropy(logits.detach().double()[:, :-1], t, ignore_index=ignore)
        assert_close(loss, ref, torch.float32, "loss")
        (g,) = torch.autograd.grad(loss, logits)
        x64 = logits.detach().double().requires_grad_()
        (g64,) = torch.autograd.grad(o_cross_entropy(x64[:, :-1], t, ignore_index=ignore), x64)
        unit = torch.zeros_like(g64)
        unit[:, :-1] = ce_grad_unit(x64.detach()[:, :-1], t, 1 / int((t != ignore).sum()), ignore)
        assert_close(g, g64, torch.float32, "grad", unit=unit)


def test_cross_entropy_all_ignored_is_nan_like_reference(fused):
    logits = randn(4, 50, seed=26)
    t = torch.full((4,), -100)
    assert torch.isnan(fused.cross_entropy(logits, t)) and torch.isnan(reference.cross_entropy(logits, t))


def test_cross_entropy_out_of_range_target_raises(fused):
    with pytest.raises(RuntimeError, match="out of bounds"):
        fused.cross_entropy(randn(2, 10, seed=27), torch.tensor([3, 10]))


def test_cross_entropy_inplace_backward_reuses_logits_buffer(fused):
    h = randn(8, 16, seed=28).requires_grad_()
    w = randn(16, 5003, seed=29, scale=0.3)
    logits = h @ w  # owned by the loss, as in a training step
    seen = []
    logits.register_hook(lambda g: seen.append((g.data_ptr(), g.shape)))
    t = torch.randint(0, 5003, (8,), generator=torch.Generator().manual_seed(30))
    v0 = logits._version
    fused.cross_entropy(logits, t, inplace_backward=True).backward()
    assert seen == [(logits.data_ptr(), logits.shape)]
    assert logits._version > v0  # the overwrite is visible to autograd's saved-tensor checks
    h64 = h.detach().double().requires_grad_()
    o_cross_entropy(h64 @ w.double(), t).backward()
    assert_close(h.grad, h64.grad, torch.float32, "grad h")


def test_cross_entropy_inplace_misuse_fails_loudly(fused):
    """Another node that saved the logits cannot silently read the gradient instead."""
    logits = randn(4, 300, seed=31).requires_grad_()
    x = logits * 1
    t = torch.randint(0, 300, (4,), generator=torch.Generator().manual_seed(32))
    other = x.sin().sum()  # sin saves x; created first, so its backward runs after the CE's
    loss = fused.cross_entropy(x, t, inplace_backward=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_memory(fused, dtype):
    """No second [N, V] tensor: the forward allocates O(N); a training step (forward + backward)
    allocates only the gradient itself, or nothing of size [N, V] in the in-place path.  The
    reference holds log-softmax (and a float32 copy for bf16) plus its gradient."""
    N, V = 64, 50257
    nv = N * V * torch.tensor([], dtype=dtype).element_size()
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(33))
    base = randn(N, V, dtype=dtype, seed=34)

    def fwd_only():
        fused.cross_entropy(base, t)

    def step(op, inplace=False):
        def run():
            x = base.clone().requires_grad_()  # clone happens before the measurement starts
            logits = x * 1 if inplace else x  # an intermediate the loss may overwrite
            return memprof.cpu_alloc_stats(lambda: torch.autograd.grad(op(logits, t), logits))
        return run()

    fwd = memprof.cpu_alloc_stats(fwd_only)
    assert fwd.largest < nv / 100 and fwd.peak < nv / 50
    out_of_place = step(lambda a, b: fused.cross_entropy(a, b))
    assert out_of_place.largest <= nv and out_of_place.peak < 1.05 * nv  # just the gradient
    in_place = step(lambda a, b: fused.cross_entropy(a, b, inplace_backward=True), inplace=True)
    assert in_place.peak < nv / 50
    ref = step(reference.cross_entropy)
    assert 2 * out_of_place.peak <= ref.peak, (out_of_place, ref)


# --------------------------------------------------------------------------- dispatch and fallbacks


def test_get_ops_modes():
    t = get_ops("torch")
    assert t.mode == "torch" and t.layer_norm is reference.layer_norm
    for mode in ("auto", "fused"):
        ops = get_ops(mode)
        assert ops.mode == mode and all(callable(getattr(ops, n)) for n in
                                        ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "cross_entropy", "rope"))
    with pytest.raises(ValueError):
        get_ops("triton")
    # every mode accepts the same cross_entropy keywords
    logits, tg = randn(3, 11, seed=35), torch.tensor([1, 2, -100])
    vals = [get_ops(m).cross_entropy(logits, tg, ignore_index=-100, inplace_backward=False) for m in
            ("torch", "auto", "fused")]
    torch.testing.assert_close(vals[0], vals[1])
    torch.testing.assert_close(vals[0], vals[2])


def test_unsupported_dtype_falls_back_to_reference(fused):
    x = randn(3, 8, dtype=torch.float64, seed=36)
    w = randn(8, dtype=torch.float64, seed=37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
        torch.testing.assert_close(get_ops("auto").bias_gelu(x, w), reference.bias_gelu(x, w))


@pytest.fixture
def broken_build(monkeypatch):
    """Pretend the CPU library cannot be built."""

    def fail(backend, verbose=False):
        raise build.KernelBuildError(f"simulated {backend} compiler failure")

    monkeypatch.setattr(build, "load", fail)
    kops.reset_warnings()
    yield
    kops.reset_warnings()


def test_fused_mode_raises_when_build_fails(broken_build):
    with pytest.raises(RuntimeError, match="fused CPU kernels could not be built.*simulated cpu compiler failure"):
        get_ops("fused").swiglu(randn(2, 3, seed=38), randn(2, 3, seed=39))


def test_auto_mode_warns_once_and_falls_back(broken_build):
    ops = get_ops("auto")
    x, w, b = randn(4, 9, seed=40), randn(9, seed=41), randn(9, seed=42)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = ops.layer_norm(x, w, b, 1e-5)
        ops.layer_norm(x, w, b, 1e-5)
        ops.swiglu(x, x)
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "simulated cpu compiler failure" in msgs[0] and "CPU" in msgs[0]
    torch.testing.assert_close(y1, reference.layer_norm(x, w, b, 1e-5))


def test_build_is_lazy():
    """Importing and get_ops() do not build; the first call does."""
    import subprocess
    import sys

    code = ("import model.kernels as k, model.kernels.build as b; k.get_ops('fused'); "
            "assert not b._LOADED and not b._FAILED, 'built at import'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---------------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_fused_matches_torch(fused, style, dtype):
    """The GPT model with every op fused: same loss and parameter gradients as with the references."""
    from model import GPT, GPTConfig

    cfg = dict(style=style, vocab_size=257, n_layer=2, n_head=4, d_model=64, max_seq_len=32)
    if style == "llama":
        cfg["n_kv_head"] = 2
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).to(dtype)
    x = torch.randint(0, 257, (3, 17), generator=torch.Generator().manual_seed(80))
    y = x.roll(-1, dims=1)
    y[0, :4] = -100
    results = {}
    for mode in ("torch", "fused"):
        model.set_kernels(mode)
        model.zero_grad(set_to_none=True)
        loss = model.loss(x, y)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    (l_ref, g_ref), (l_fused, g_fused) = results["torch"], results["fused"]
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    assert abs(l_fused.item() - l_ref.item()) <= tol * abs(l_ref.item())
    # relative to the gradient's own norm, floored at 1% of the typical one (the key-projection
    # bias gradient is exactly zero in exact arithmetic: softmax ignores a per-row shift)
    floor = 0.01 * torch.stack([g.double().norm() for g in g_ref.values()]).median()
    for n, g in g_ref.items():
        err = (g_fused[n].double() - g.double()).norm() / torch.maximum(g.double().norm(), floor)
        assert err <= (1e-4 if dtype == torch.float32 else 5e-2), f"{n}: relative grad error {err:.3g}"


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_gpt_fused_under_autocast_uses_every_kernel(fused, style):
    """bf16 autocast over float32 weights (the usual mixed-precision step): no op falls back to the
    reference (a fused-mode fallback warns: the float32 residual stream meets bf16 block outputs,
    the float32 bias/rope tables meet bf16 activations), and the fused model is as close to the
    float64 model as the reference ops are."""
    from model import GPT, GPTConfig

    cfg = dict(style=style, vocab_size=257, n_layer=2, n_head=4, d_model=64, max_seq_len=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    exact = GPT(GPTConfig(**cfg, kernels="torch")).double()
    exact.load_state_dict(model.state_dict())
    x = torch.randint(0, 257, (3, 17), generator=torch.Generator().manual_seed(81))
    y = x.roll(-1, dims=1)
    exact.loss(x, y).backward()
    g_exact = {n: p.grad for n, p in exact.named_parameters()}
    floor = 0.01 * torch.stack([g.norm() for g in g_exact.values()]).median()
    errors = {}
    for mode in ("torch", "fused"):
        model.set_kernels(mode)
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any fallback of the fused ops fails the test
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.loss(x, y)
            loss.backward()
        errors[mode] = max(((p.grad.double() - g_exact[n]).norm() / torch.maximum(g_exact[n].norm(), floor)).item()
                           for n, p in model.named_parameters())
    assert errors["fused"] <= 1.5 * errors["torch"] + 1e-3, errors


# ------------------------------------------------------------------- vocabulary-parallel (2 ranks)


VP_CASES = [(dtype_name, use_kernels, inplace) for dtype_name in ("float32", "bfloat16")
            for use_kernels, inplace in ((True, False), (True, True), (False, False))]


def _vp_case(rank, dtype_name, use_kernels, inplace):
    from model.kernels import vocab_parallel_cross_entropy

    dtype = getattr(torch, dtype_name)
    N, V = 37, 1001  # uneven split: 501 + 500
    full = randn(N, V, dtype=dtype, seed=50, scale=3.0)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(51))
    targets[[0, 5, 36]] = -100
    targets[1], targets[2] = 500, 501  # last id of shard 0, first of shard 1
    bounds = [0, 501, V]
    lo, hi = bounds[rank], bounds[rank + 1]
    shard = full[:, lo:hi].clone().requires_grad_()
    x = shard * 1 if inplace else shard
    loss = vocab_parallel_cross_entropy(x, targets, lo, None, -100, use_kernels=use_kernels, inplace_backward=inplace)
    loss.backward()
    full64 = full.double().requires_grad_()
    ref = F.cross_entropy(full64, targets, ignore_index=-100)
    ref.backward()
    assert_close(loss, ref, dtype, f"rank {rank} loss")
    unit = ce_grad_unit(full64.detach(), targets, 1 / int((targets != -100).sum()))[:, lo:hi]
    assert_close(shard.grad, full64.grad[:, lo:hi], dtype, f"rank {rank} grad", unit=unit)


def _vp_worker(rank, world, folder):
    """Every case of VP_CASES in one pair of processes (a spawn of two ranks costs seconds); each rank
    writes what each case gave, in order, and stops at the first failure (the other rank may then wait
    in a collective: the spawn ends both)."""
    import traceback

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    for case in VP_CASES:
        try:
            _vp_case(rank, *case)
        except BaseException:
            with open(os.path.join(folder, f"{'-'.join(map(str, case))}.{rank}"), "w") as f:
                f.write(traceback.format_exc())
            dist.destroy_process_group()
            raise
        with open(os.path.join(folder, f"{'-'.join(map(str, case))}.{rank}"), "w") as f:
            f.write("ok")
    # Finished: leave without the interpreter's teardown (gloo's threads were once seen to abort
    # while being destroyed at exit under heavy load, failing a test whose checks had passed).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def vocab_parallel_results(fused, tmp_path_factory):
    """Each case's outcome on each of the two ranks: "ok" or the traceback (None: not reached)."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("vocab_parallel")
    try:
        mp.spawn(_vp_worker, args=(2, str(folder)), nprocs=2, join=True)
    except Exception:  # the failing case's traceback is in its file; a case never reached reads None
        pass
    files = {p.name: p.read_text() for p in folder.iterdir() if p.name != "init"}
    return {case: [files.get(f"{'-'.join(map(str, case))}.{r}") for r in range(2)] for case in VP_CASES}


@pytest.mark.dist
@pytest.mark.parametrize("case", VP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_vocab_parallel_cross_entropy_two_ranks(vocab_parallel_results, case):
    """The vocabulary-parallel cross-entropy over two ranks against float64 F.cross_entropy on the whole
    vocabulary: the loss, and each rank's slice of the gradient."""
    outcome = vocab_parallel_results[case]
    assert outcome == ["ok", "ok"], "\n".join(o or "not reached (an earlier case failed)" for o in outcome)


# ------------------------------------------------------------------- CUDA kernel checks (shared)
# The checks of the CUDA kernels, parametrised by device: the `gpu` tests below run them on a GPU
# with torch.ops.llmk_cuda, tests/test_kernels_cuda_emu.py runs the same checks on CPU tensors
# with the emulated library torch.ops.llmk_cuda_emu (the same kernel sources, see cuda_emu.h).

CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_cuda_norms(ops, dtype, device, shape, seed=60, full=True):
    """LayerNorm and RMSNorm with and without residual / weight / bias, and RMSNorm with a float32
    weight on low-precision activations (float32 output and float32 dy in backward).  full=False:
    only LayerNorm and RMSNorm with weight (+ bias) and residual, and RMSNorm without weight."""
    D = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, seed=seed, scale=2.0) + 0.5
    r = randn(*shape, dtype=dtype, device=device, seed=seed + 1)
    w, b = randn(D, dtype=dtype, device=device, seed=seed + 2), randn(D, dtype=dtype, device=device, seed=seed + 3)
    ln_cases = [(w, b, r), (w, b, None), (None, None, r), (None, None, None), (w, None, None)]
    for weight, bias, residual in ln_cases if full else ln_cases[:1]:
        inputs = dict(x=x, weight=weight, bias=bias, eps=1e-5, residual=residual)
        grads = [k for k in ("x", "weight", "bias", "residual") if inputs[k] is not None]
        check_against_oracle(ops.layer_norm, o_layer_norm, inputs, grads, dtype, ref_fn=reference.layer_norm)
    for weight, residual in [(w, r), (w, None), (None, None), (None, r)] if full else [(w, r), (None, None)]:
        inputs = dict(x=x, weight=weight, eps=1e-6, residual=residual)
        grads = [k for k in ("x", "weight", "residual") if inputs[k] is not None]
        check_against_oracle(ops.rms_norm, o_rms_norm, inputs, grads, dtype, ref_fn=reference.rms_norm)
    if dtype != torch.float32 and full:
        w32 = randn(D, device=device, seed=seed + 4)
        check_against_oracle(ops.rms_norm, o_rms_norm, dict(x=x, weight=w32, eps=1e-6, residual=r),
                             ["x", "weight", "residual"], dtype, ref_fn=reference.rms_norm)


def check_cuda_pointwise(ops, dtype, device, shape, seed=64):
    """bias-GELU with and without bias; SwiGLU on contiguous inputs and on the two row-strided
    halves of one [.., 2D] tensor (a fused GEMM output)."""
    x = randn(*shape, dtype=dtype, device=device, seed=seed, scale=2.0)
    b = randn(shape[-1], dtype=dtype, device=device, seed=seed + 1)
    u = randn(*shape, dtype=dtype, device=device, seed=seed + 2)
    check_against_oracle(ops.bias_gelu, reference.bias_gelu, dict(x=x, bias=b), ["x", "bias"], dtype,
                         ref_fn=reference.bias_gelu)
    check_against_oracle(ops.bias_gelu, reference.bias_gelu, dict(x=x, bias=None), ["x"], dtype)
    check_against_oracle(ops.swiglu, reference.swiglu, dict(gate=x, up=u), ["gate", "up"], dtype,
                         ref_fn=reference.swiglu)

    def halves(fn):
        return lambda both: fn(*both.chunk(2, dim=-1))

    both = randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device, seed=seed + 3, scale=3.0)
    check_against_oracle(halves(ops.swiglu), halves(reference.swiglu), dict(both=both), ["both"], dtype)


def check_cuda_rope(ops, dtype, device, case, transposed, seed=67):
    """case: (B, Hq, Hk, T, D, layout) with layout "td" (cos/sin [T, D]) or "b1td" ([B, 1, T, D],
    per-sequence positions); transposed: q/k are [B, T, H, D] projections viewed as [B, H, T, D]."""
    B, Hq, Hk, T, D, layout = case
    if transposed:
        q = randn(B, T, Hq, D, dtype=dtype, device=device, seed=seed).transpose(1, 2)
        k = randn(B, T, Hk, D, dtype=dtype, device=device, seed=seed + 1).transpose(1, 2)
    else:
        q = randn(B, Hq, T, D, dtype=dtype, device=device, seed=seed)
        k = randn(B, Hk, T, D, dtype=dtype, device=device, seed=seed + 1)
    cos, sin = reference.rope_cache(T + 3, D, 10000.0, device=device)
    if layout == "td":
        cos, sin = cos[3:], sin[3:]
    else:
        pos = torch.randint(0, T + 3, (B, T), generator=torch.Generator().manual_seed(seed + 2)).to(device)
        cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    check_against_oracle(lambda q, k, cos, sin: ops.rope(q, k, cos, sin), reference.rope,
                         dict(q=q, k=k, cos=cos.to(dtype), sin=sin.to(dtype)), ["q", "k"], dtype,
                         ref_fn=reference.rope)


def check_cuda_cross_entropy(ops, dtype, device, shape, inplace, ignore_index=-100, seed=69):
    """Mean CE with ignored rows (the second and the last; none with a single row, whose mean would
    be 0/0), out-of-place or in-place backward."""
    V = shape[-1]
    logits = randn(*shape, dtype=dtype, device=device, seed=seed, scale=4.0)
    targets = torch.randint(0, V, shape[:-1], generator=torch.Generator().manual_seed(seed + 1))
    flat = targets.view(-1)
    if flat.numel() > 1:
        flat[1] = ignore_index
        flat[-1] = ignore_index
    targets = targets.to(device)

    def fn(logits, targets):
        # in-place writes the gradient into the buffer of `logits`: give it a private copy
        return ops.cross_entropy(logits * 1 if inplace else logits, targets, ignore_index=ignore_index,
                                 inplace_backward=inplace)

    unit = ce_grad_unit(logits, targets, 1 / int((targets != ignore_index).sum()), ignore_index)
    check_against_oracle(fn, lambda logits, targets: o_cross_entropy(logits, targets, ignore_index),
                         dict(logits=logits, targets=targets), ["logits"], dtype, units={"logits": unit})


def check_cuda_cross_entropy_sliced(ops, device, seed=24):
    """Logits rows with two-level strides (logits[:, :-1], no copy) and other ignore indices;
    V = 101 (scalar kernels) and V = 1000 (rows stay 16-byte aligned: the vectorised kernels)."""
    for V in (101, 1000):
        logits = randn(3, 9, V, device=device, seed=seed).requires_grad_()
        targets = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(seed + 1))
        targets[0, 2] = 7
        targets[2, 5] = V - 1
        for ignore in (7, -1):
            t = targets.clone()
            t[1, :3] = ignore
            t = t.to(device)
            loss = ops.cross_entropy(logits[:, :-1], t, ignore_index=ignore)
            x64 = logits.detach().double().requires_grad_()
            ref = o_cross_entropy(x64[:, :-1], t, ignore_index=ignore)
            assert_close(loss, ref, torch.float32, "loss")
            (g,) = torch.autograd.grad(loss, logits)
            (g64,) = torch.autograd.grad(ref, x64)
            unit = torch.zeros_like(g64)
            unit[:, :-1] = ce_grad_unit(x64.detach()[:, :-1], t, 1 / int((t != ignore).sum()), ignore)
            assert_close(g, g64, torch.float32, "grad", unit=unit)


def check_cuda_ce_vocab_shards(lib, dtype, device, N=37, V=1001, bounds=(0, 501, 1001), seed=50):
    """The vocabulary-parallel use of ce_fwd / ce_bwd (vocab_start, no range check), one call per
    shard of a row-strided view of the full logits, combined as vocab_parallel.py does; against
    float64 log-sum-exp, target logits and softmax gradients."""
    full = randn(N, V, dtype=dtype, device=device, seed=seed, scale=3.0)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 1))
    targets[[0, 5, N - 1]] = -100
    targets[1], targets[2] = bounds[1] - 1, bounds[1]  # last id of shard 0, first of shard 1
    targets = targets.to(device)
    nan = float("nan")
    shards = [(lo, hi, full[:, lo:hi].unsqueeze(0)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    lses, xts = [], []
    for lo, _, x in shards:
        loss, lse, xt = (torch.full((N,), nan, device=device) for _ in range(3))
        lib.ce_fwd(x, targets, -100, lo, False, loss, lse, xt)
        lses.append(lse)
        xts.append(xt)
    lse_local = torch.stack(lses)
    m = lse_local.max(0).values
    lse = m + torch.exp(lse_local - m).sum(0).log()
    f64 = full.double()
    valid = targets != -100
    assert_close(lse, torch.logsumexp(f64, -1), dtype, "lse")
    xt_ref = torch.where(valid, f64.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    assert_close(torch.stack(xts).sum(0), xt_ref, dtype, "target logit")
    scale = torch.tensor([0.37], device=device)
    p = torch.softmax(f64, -1)
    p[valid.nonzero().squeeze(1), targets[valid]] -= 1.0
    p = torch.where(valid.unsqueeze(1), p * 0.37, 0.0)
    unit = ce_grad_unit(f64, targets, 0.37)
    for lo, hi, x in shards:
        grad = torch.full_like(x, nan)
        lib.ce_bwd(x, targets, lse, scale, -100, lo, grad)
        assert_close(grad[0], p[:, lo:hi], dtype, f"grad shard {lo}:{hi}", unit=unit[:, lo:hi])


# -------------------------------------------------------------------------------------------- CUDA


@pytest.fixture(scope="module")
def cuda_ops():
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    build.load("cuda")
    return get_ops("fused")


@gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_norms(cuda_ops, dtype):
    for shape in [(1, 7), (17, 1000), (5, 4099), (300, 40), (3, 12289), (2, 30000)]:
        # 300 rows: more than the backward's persistent grid; 12289: accumulators beyond 48 KiB of
        # shared memory; 30000: LayerNorm accumulators beyond the opt-in limit (global partials)
        check_cuda_norms(cuda_ops, dtype, "cuda", shape)


@gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_pointwise_and_rope(cuda_ops, dtype):
    for shape in [(1, 5), (33, 1000), (2, 7, 130)]:
        check_cuda_pointwise(cuda_ops, dtype, "cuda", shape)
    for case in [(1, 1, 1, 1, 2, "td"), (2, 4, 2, 9, 64, "td"), (3, 2, 1, 5, 22, "b1td")]:
        for transposed in (False, True):
            check_cuda_rope(cuda_ops, dtype, "cuda", case, transposed)


@gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_cross_entropy(cuda_ops, dtype, inplace):
    for shape in [(1, 50257), (9, 50257), (9, 50304), (2, 5, 333)]:  # 50304: the vectorised kernels
        check_cuda_cross_entropy(cuda_ops, dtype, "cuda", shape, inplace)
    check_cuda_cross_entropy_sliced(cuda_ops, "cuda")


@gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_ce_vocab_shards(cuda_ops, dtype):
    check_cuda_ce_vocab_shards(build.load("cuda"), dtype, "cuda")


@gpu
def test_cuda_cross_entropy_memory(cuda_ops):
    N, V = 2048, 50257
    x = randn(N, V, dtype=torch.bfloat16, device="cuda", seed=71).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    nv = N * V * 2

    def step(op):
        logits = x * 1
        op(logits, t).backward()

    fused_peak = memprof.cuda_alloc_stats(lambda: step(lambda a, b: cuda_ops.cross_entropy(
        a, b, inplace_backward=True))).peak
    ref_peak = memprof.cuda_alloc_stats(lambda: step(reference.cross_entropy)).peak
    assert fused_peak < 2.2 * nv  # logits + x.grad, nothing else of size [N, V]
    assert fused_peak * 2 <= ref_peak
