"""Per-token cross-entropy and entropy (policy-gradient losses) against float64 oracles.

The ops (model.kernels, through get_ops("fused")):
    token_cross_entropy(logits, targets, ignore_index)   -> -log p(target)          float32 [...]
    token_entropy(logits)                                -> -sum_j p_j log p_j      float32 [...]
    token_logprob_and_entropy(logits, targets, ...)      -> (log p(target), H)      one read of the logits

Every check runs the fused op and the float64 oracle (torch.log_softmax / -sum p log p in float64
on the same input values) on the same inputs, backpropagates the same RANDOM PER-TOKEN upstream
gradients through every output, and compares values and logits gradients element by element.
Every buffer the wrappers hand to the kernels is NaN-poisoned (the autouse fixture of
test_kernels.py), so an element a kernel forgets to write fails.  Shapes: one row, a 50257
vocabulary, [B, T, V] with widths that are not multiples of the vector width, row-strided views
(logits[:, :-1]), masked (-inf) logits, ignored targets (-100 and other values).

The same check functions run the CUDA kernels: through the CUDA emulator in
tests/test_kernels_cuda_emu.py (float32, bfloat16, float16; asserting which kernel ran) and on a
GPU in the `gpu` test below.

Tolerances (|fused - oracle| <= rtol |oracle| + atol):
  values (float32 outputs, computed in float32 from the exact input values for every input
  dtype): rtol 1e-5, atol 2e-7 (1 + max|logit|) (one float32 rounding of the log-sum-exp);
  gradients (stored in the logits' dtype): rtol a little over one rounding of that dtype
  (float32 2e-5, bfloat16 5e-3 = 1.28 x 2^-8, float16 2^-10), atol 2e-7 x max|oracle gradient|
  (the float32 rounding of log p + H where the entropy gradient is a difference of nearly
  equal terms), for float16 plus 2^-24 (the spacing of its subnormals).
`test_checks_catch_wrong_results` feeds deliberately wrong implementations (a gradient without
the +H term, a mean instead of per-token upstream gradient, ignored rows not masked, one unwritten
element, a value off by 1e-4, a bf16 gradient off by two roundings) through the same checks and
asserts each one fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from model.kernels import build, get_ops, memprof, reference
from model.kernels import ops as kops
from tests.test_kernels import poison_outputs, randn  # noqa: F401  (poison_outputs: autouse fixture)

VAL_RTOL, VAL_ATOL = 1e-5, 2e-7
GRAD_TOL = {  # rtol, atol (x max|oracle|), absolute floor
    torch.float32: (2e-5, 2e-7, 0.0),
    torch.bfloat16: (5e-3, 2e-7, 0.0),  # the unit roundoff 2^-8, x 1.28
    torch.float16: (2.0**-10, 2e-7, 2.0**-24),  # 2 x the unit roundoff 2^-11; subnormals' spacing
}
OPS = ("token_cross_entropy", "token_entropy", "token_logprob_and_entropy")
DTYPES = [torch.float32, torch.bfloat16]
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def fused():
    build.load("cpu")  # a build failure is a test failure here, not a skip
    return get_ops("fused")


# ------------------------------------------------------------------------------------- oracles


def o_token_ce(logits, targets, ignore_index=-100):
    V = logits.shape[-1]
    return F.cross_entropy(logits.double().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index,
                           reduction="none").view(targets.shape)


def o_token_entropy(logits):
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)  # 0 log 0 = 0 (masked -inf logits)


def o_token_logprob_and_entropy(logits, targets, ignore_index=-100):
    valid = targets != ignore_index
    return -o_token_ce(logits, targets, ignore_index), torch.where(valid, o_token_entropy(logits), 0.0)


ORACLES = {"token_cross_entropy": o_token_ce, "token_entropy": lambda logits, targets, ignore_index: o_token_entropy(
    logits), "token_logprob_and_entropy": o_token_logprob_and_entropy}


def call(ops, name, logits, targets, ignore_index):
    fn = getattr(ops, name)
    return fn(logits) if name == "token_entropy" else fn(logits, targets, ignore_index=ignore_index)


# ------------------------------------------------------------------------------------- checks


def assert_values(actual, expected, what, max_logit=0.0):
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = (a - e).abs()
    bound = VAL_RTOL * e.abs() + VAL_ATOL * (1.0 + max_logit)
    bad = err > bound
    assert not bad.any(), f"{what}: max err {err.max().item():.3g}, {int(bad.sum())}/{bad.numel()} out of tolerance"


def assert_grads(actual, expected, dtype, what):
    rtol, atol, floor = GRAD_TOL[dtype]
    assert actual.dtype == dtype and actual.shape == expected.shape, f"{what}: {actual.dtype} {tuple(actual.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = (a - e).abs()
    bound = rtol * e.abs() + atol * max(e.abs().max().item(), 1e-30) + floor
    bad = err > bound
    assert not bad.any(), (f"{what} ({dtype}): max err {err.max().item():.3g} (scale {e.abs().max().item():.3g}), "
                           f"{int(bad.sum())}/{bad.numel()} elements out of tolerance")


def check_token_op(fn, oracle, base, view, targets, dtype, what, ignore_index=-100, seed=0, zero_at_ignored=True):
    """fn(logits_view) -> output or tuple, oracle(float64 logits_view) -> same.  `base` is the leaf
    (requires grad), `view(base)` the logits the op sees (e.g. base[:, :-1]).  Random per-token
    upstream gradients through every output; values, exact zeros at ignored positions
    (zero_at_ignored; not for the entropy alone, which has no targets) and the gradient of `base`."""
    g = torch.Generator().manual_seed(seed + 101)
    leaf = base.detach().clone().requires_grad_()
    out = fn(view(leaf))
    outs = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    sum((o.double() * u).sum() for o, u in zip(outs, ups)).backward()

    leaf64 = base.detach().double().requires_grad_()
    ref = oracle(view(leaf64))
    refs = ref if isinstance(ref, tuple) else (ref,)
    sum((o * u).sum() for o, u in zip(refs, ups)).backward()

    x = view(base.detach())
    max_logit = x[torch.isfinite(x)].abs().max().item() if x.numel() else 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_values(o, r, f"{what} output {i}", max_logit)
        if zero_at_ignored and targets is not None:
            ignored = (targets == ignore_index).to(o.device)
            assert (o[ignored] == 0).all(), f"{what} output {i}: ignored positions not 0"
    assert leaf.grad is not None, f"{what}: no gradient"
    assert_grads(leaf.grad, leaf64.grad, dtype, f"{what} grad")


def token_inputs(shape, dtype, device, seed, ignore_index=-100, masked=False, scale=4.0):
    """logits [*shape] and targets [*shape[:-1]] with ignored positions (the second and the last
    when there are more than two rows), a target at the last column, and (masked) a block of
    -inf logits in the first row."""
    V = shape[-1]
    logits = randn(*shape, dtype=dtype, seed=seed, scale=scale)
    targets = torch.randint(0, V, shape[:-1], generator=torch.Generator().manual_seed(seed + 1))
    flat = targets.view(-1)
    if flat.numel() > 2:
        flat[1] = ignore_index
        flat[-1] = ignore_index
    flat[0] = V - 1
    if masked and V > 4:
        logits.view(-1, V)[0, 1: V // 2] = float("-inf")  # the target (V - 1) stays finite
    return logits.to(device), targets.to(device)


def check_token_ops(ops, dtype, device, shape, ignore_index=-100, seed=120, masked=False, sliced=False,
                    names=OPS):
    """All three ops (or `names`) on [*shape] logits; sliced: the op sees logits[:, :-1] of a
    [B, T + 1, V] tensor (rows with two-level strides, no copy) and the gradient of the whole
    tensor is checked (zeros in the dropped position)."""
    if sliced:
        B, T, V = shape
        base, _ = token_inputs((B, T + 1, V), dtype, device, seed, ignore_index, masked)
        _, targets = token_inputs((B, T, V), dtype, device, seed, ignore_index, masked)

        def view(x):
            return x[:, :-1]
    else:
        base, targets = token_inputs(shape, dtype, device, seed, ignore_index, masked)

        def view(x):
            return x
    for name in names:
        def fn(logits, name=name):
            return call(ops, name, logits, targets, ignore_index)

        def oracle(logits, name=name):
            return ORACLES[name](logits, targets.cpu(), ignore_index=ignore_index)

        check_token_op(fn, oracle, base, view, targets.cpu(), dtype, f"{name} {tuple(shape)}", ignore_index, seed,
                       zero_at_ignored=name != "token_entropy")


def check_ce_ent_vocab_shards(lib, dtype, device, N=37, V=1001, bounds=(0, 501, 1001), seed=130):
    """The vocabulary-parallel use of the kernels: ce_ent_fwd per shard (vocab_start, no range
    check; with and without targets) against the shard's own float64 lse, entropy and target
    logit; then ce_ent_bwd per shard with the global lse and entropy and random per-row upstream
    gradients, and ce_bwd with a per-row scale, against the float64 gradient of the full row."""
    full = randn(N, V, dtype=dtype, seed=seed, scale=3.0)
    full[3, 10: V // 2] = float("-inf")
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 1))
    targets[[0, 5, N - 1]] = -100
    targets[1], targets[2], targets[3] = bounds[1] - 1, bounds[1], V - 1  # shard edges
    f64 = full.double()
    valid = targets != -100
    g = torch.Generator().manual_seed(seed + 2)
    gl, gh = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    x64 = f64.clone().requires_grad_()
    logp = torch.log_softmax(x64, -1)
    ce = F.cross_entropy(x64, targets, reduction="none")
    ent = o_token_entropy(x64)
    ((ce * gl).sum() + (torch.where(valid, ent, 0.0) * gh).sum()).backward()
    grad_both = x64.grad
    p = logp.detach().exp()
    onehot = F.one_hot(targets.clamp(min=0), V) * valid.unsqueeze(1)
    grad_ce = torch.where(valid.unsqueeze(1), (p - onehot) * gl.unsqueeze(1), 0.0)
    grad_ent = -p * (logp.detach().masked_fill(p == 0, 0.0) + ent.detach().unsqueeze(1)) * gh.unsqueeze(1)
    lse_g = torch.logsumexp(f64, -1).float().to(device)
    ent_g = ent.detach().float().to(device)
    nan = float("nan")
    dev_t = targets.to(device)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x = full[:, lo:hi].unsqueeze(0).to(device)  # a row-strided view of the full logits
        s64 = f64[:, lo:hi]
        for with_targets in (True, False):
            lse, h, xt = (torch.full((N,), nan, device=device) for _ in range(3))
            lib.ce_ent_fwd(x, dev_t if with_targets else None, -100, lo, False, lse, h, None,
                           xt if with_targets else None)
            keep = valid if with_targets else torch.ones_like(valid)
            assert_values(lse.cpu(), torch.where(keep, torch.logsumexp(s64, -1), 0.0), f"shard {lo} lse", 12.0)
            assert_values(h.cpu(), torch.where(keep, o_token_entropy(s64), 0.0), f"shard {lo} entropy", 12.0)
            if with_targets:
                local = targets - lo
                inside = valid & (local >= 0) & (local < hi - lo)
                xt_ref = torch.where(inside, s64.gather(1, local.clamp(0, hi - lo - 1).unsqueeze(1)).squeeze(1), 0.0)
                assert_values(xt.cpu(), xt_ref, f"shard {lo} target logit", 12.0)
        cases = [("ce+entropy", dev_t, gl, gh, grad_both), ("entropy", None, None, gh, grad_ent)]
        for what, t, a, b, ref in cases:
            grad = torch.full_like(x, nan)
            lib.ce_ent_bwd(x, t, lse_g, ent_g, a.float().to(device) if a is not None else None,
                           b.float().to(device), -100, lo, grad)
            assert_grads(grad[0].cpu(), ref[:, lo:hi], dtype, f"shard {lo} grad {what}")
        grad = torch.full_like(x, nan)
        lib.ce_bwd(x, dev_t, lse_g, gl.float().to(device), -100, lo, grad)
        assert_grads(grad[0].cpu(), grad_ce[:, lo:hi], dtype, f"shard {lo} grad ce (per-row scale)")


# ---------------------------------------------------------------------------------------- tests


SHAPES = [(1, 7), (3, 50257), (2, 5, 333), (4, 1000), (2, 3, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_ops_match_float64(fused, dtype, shape):
    check_token_ops(fused, dtype, "cpu", shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_sliced_rows_masked_logits_other_ignore_index(fused, dtype):
    """logits[:, :-1] (row strides of two levels, V = 1001: no vector-aligned rows), -inf logits
    (masked tokens: p = 0, they add 0 log 0 = 0 and get zero gradient), ignore_index 7 and -1."""
    for ignore_index in (7, -1):
        check_token_ops(fused, dtype, "cpu", (2, 4, 1001), ignore_index=ignore_index, sliced=True, masked=True)
    x, t = token_inputs((5, 300), dtype, "cpu", seed=3, masked=True)
    xl = x.clone().requires_grad_()
    lp, h = fused.token_logprob_and_entropy(xl, t)
    (lp.sum() + h.sum()).backward()
    assert (xl.grad[0, 1:150] == 0).all(), "masked logits got a gradient"


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or type(node).__name__ in seen:
            continue
        seen.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return seen


def test_kernels_ran_not_the_reference(fused):
    """The fused entries run the kernels' autograd Functions (not a silent fallback)."""
    x, t = token_inputs((3, 50), torch.float32, "cpu", seed=5)
    x.requires_grad_()
    assert "TokenCrossEntropyFnBackward" in graph_nodes(fused.token_cross_entropy(x, t))
    assert "TokenEntropyFnBackward" in graph_nodes(fused.token_entropy(x))
    for out in fused.token_logprob_and_entropy(x, t):
        assert "TokenEntropyFnBackward" in graph_nodes(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_vocab_shards_kernels(fused, dtype):
    check_ce_ent_vocab_shards(build.load("cpu"), dtype, "cpu")


def check_confident_rows(ops, device, N=64, V=50257):
    """Rows whose mass sits almost entirely on one token (logits with std 30: entropies from
    ~1e-1 down to below 1e-12) keep float32 relative precision in the entropy and in log p of the
    top token (the row max is counted apart from the others' sum of exps, so 1 + r does not round
    r away; a float32 `-sum p log p` is off by up to ~5% there).  Rows below 1e-12 are left out:
    there the float64 oracle itself rounds lse = m + log(1 + r) to m."""
    x = randn(N, V, seed=7, scale=30.0)
    h64 = o_token_entropy(x)
    keep = h64 > 1e-12
    assert keep.sum() > N // 2 and h64[keep].min() < 1e-6
    top = x.argmax(-1)
    lp64 = -o_token_ce(x, top)
    keep_lp = lp64 < -1e-12
    h = ops.token_entropy(x.to(device)).double().cpu()
    lp, h2 = (o.double().cpu() for o in ops.token_logprob_and_entropy(x.to(device), top.to(device)))
    for what, a, e, k in (("entropy", h, h64, keep), ("entropy (combined)", h2, h64, keep),
                          ("log p of the top token", lp, lp64, keep_lp)):
        rel = ((a - e).abs() / e.abs())[k].max().item()
        assert rel < 1e-5, f"{what}: relative error {rel:.3g}"


def test_confident_rows_keep_relative_precision(fused):
    check_confident_rows(fused, "cpu")


def test_combined_op_equals_the_separate_ops(fused):
    """token_logprob_and_entropy == (-token_cross_entropy, token_entropy masked at ignored
    positions), values and gradients (with both outputs used, and with only one)."""
    x, t = token_inputs((2, 6, 777), torch.float32, "cpu", seed=9)
    gen = torch.Generator().manual_seed(10)
    u1, u2 = torch.randn(t.shape, generator=gen), torch.randn(t.shape, generator=gen)
    valid = t != -100
    for w1, w2 in ((1, 1), (1, 0), (0, 1)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        lp, h = fused.token_logprob_and_entropy(xa, t)
        ((lp * u1 * w1).sum() + (h * u2 * w2).sum()).backward()
        ce, hb = fused.token_cross_entropy(xb, t), fused.token_entropy(xb)
        ((-ce * u1 * w1).sum() + (torch.where(valid, hb, 0.0) * u2 * w2).sum()).backward()
        torch.testing.assert_close(lp, -ce, rtol=1e-6, atol=2e-6)
        torch.testing.assert_close(h, torch.where(valid, hb, 0.0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)
    # only the log-prob used: the entropy output's gradient is None, not a tensor of zeros
    xa = x.clone().requires_grad_()
    lp, _ = fused.token_logprob_and_entropy(xa, t)
    lp.sum().backward()
    assert xa.grad is not None and torch.isfinite(xa.grad).all()


def test_token_ce_per_row_scale_is_the_mean_kernel_path(fused):
    """The mean cross_entropy's gradient equals, bit for bit, the per-token op's gradient with the
    upstream gradient 1 / count on every row: ce_bwd's per-row scale takes the very same
    arithmetic path as its single scale (the training loss is unchanged by the generalisation)."""
    for dtype in DTYPES:
        x, t = token_inputs((3, 7, 1001), dtype, "cpu", seed=11)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused.cross_entropy(xa, t).backward()
        count = (t != -100).sum()
        (fused.token_cross_entropy(xb, t).sum() / count).backward()
        assert torch.equal(xa.grad, xb.grad), dtype
    # and the kernel directly: scale [1] vs scale [N] of the same value
    lib = build.load("cpu")
    x, t = token_inputs((5, 333), torch.float32, "cpu", seed=12)
    x3 = x.unsqueeze(0)
    loss, lse = torch.empty(5), torch.empty(5)
    lib.ce_fwd(x3, t, -100, 0, True, loss, lse, None)
    g1, gn = torch.full_like(x3, float("nan")), torch.full_like(x3, float("nan"))
    lib.ce_bwd(x3, t, lse, torch.tensor([0.37]), -100, 0, g1)
    lib.ce_bwd(x3, t, lse, torch.full((5,), 0.37), -100, 0, gn)
    assert torch.equal(g1, gn)
    with pytest.raises(RuntimeError, match="one per logits row"):
        lib.ce_bwd(x3, t, lse, torch.ones(4), -100, 0, g1)


def test_reference_and_auto_modes_same_api(fused):
    """get_ops("torch") and ("auto") expose the token ops with the same signature, dtypes, shapes
    and values (the reference computes in float32)."""
    x, t = token_inputs((2, 3, 101), torch.bfloat16, "cpu", seed=13)
    results = {}
    for mode in ("torch", "auto", "fused"):
        ops = get_ops(mode)
        results[mode] = (ops.token_cross_entropy(x, t, ignore_index=-100), ops.token_entropy(x),
                         *ops.token_logprob_and_entropy(x, t, ignore_index=-100))
    for mode in ("torch", "auto"):
        for a, b in zip(results[mode], results["fused"]):
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fallbacks_to_reference(fused):
    """float64 logits (no kernel) use the reference, with a one-time note naming the op; targets
    that do not match the logits rows fail (in the reference) instead of reading past them."""
    kops.reset_warnings()
    x64, t = token_inputs((4, 30), torch.float64, "cpu", seed=14)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for name in OPS:
            out = call(fused, name, x64, t, -100)
            ref = ORACLES[name](x64, t, ignore_index=-100)
            for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
                assert o.dtype == torch.float32
                torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6)
    msgs = [str(r.message) for r in rec]
    for name in OPS:
        assert any(f"{name} uses the PyTorch reference: dtype torch.float64" in m for m in msgs), msgs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError):
            fused.token_logprob_and_entropy(x64.float(), t[:3])  # 3 targets for 4 rows
    # targets of another shape with one entry per row are fine: the outputs take their shape
    lp, h = fused.token_logprob_and_entropy(x64.float(), t.view(2, 2))
    assert lp.shape == h.shape == (2, 2)
    kops.reset_warnings()


def test_out_of_range_target_raises(fused):
    for fn in (fused.token_cross_entropy, fused.token_logprob_and_entropy):
        with pytest.raises((RuntimeError, IndexError)):
            fn(randn(2, 10, seed=15), torch.tensor([3, 10]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_memory(fused, dtype):
    """The forward allocates O(N) (no float32 copy, no log-softmax); forward + backward of the
    entropy / combined op allocates just the gradient (one [N, V] tensor of the logits' dtype), while
    the float32 reference holds several [N, V] float32 temporaries."""
    N, V = 64, 50257
    nv = N * V * torch.tensor([], dtype=dtype).element_size()
    x, t = token_inputs((N, V), dtype, "cpu", seed=16)

    def step(fn):
        def run():
            leaf = x.clone().requires_grad_()  # allocated before the measurement starts
            return memprof.cpu_alloc_stats(lambda: torch.autograd.grad(fn(leaf), leaf))
        return run()

    fwd = memprof.cpu_alloc_stats(lambda: fused.token_logprob_and_entropy(x, t))
    assert fwd.largest < nv / 100 and fwd.peak < nv / 50, fwd
    for name, fn in (("entropy", lambda a: fused.token_entropy(a).sum()),
                     ("combined", lambda a: sum(o.sum() for o in fused.token_logprob_and_entropy(a, t))),
                     ("ce", lambda a: fused.token_cross_entropy(a, t).sum())):
        st = step(fn)
        assert st.largest <= nv and st.peak < 1.05 * nv, (name, st)
    ref = step(lambda a: sum(o.sum() for o in reference.token_logprob_and_entropy(a, t)))
    assert ref.peak > 3 * nv, ref


# ------------------------------------------------------------- the checks can fail (sensitivity)


class _Wrong(torch.autograd.Function):
    """Right values (the reference's), the gradient from a wrong formula."""

    @staticmethod
    def forward(ctx, logits, targets, kind):
        ctx.save_for_backward(logits, targets)
        ctx.kind = kind
        if kind == "ce_sign":
            return reference.token_cross_entropy(logits, targets)
        if kind == "unmasked":
            return reference.token_logprob_and_entropy(logits, targets)
        return reference.token_entropy(logits)

    @staticmethod
    def backward(ctx, *grads):
        x, t = ctx.saved_tensors
        logp = torch.log_softmax(x.float(), -1)
        p = logp.exp()
        h = -(p * logp).sum(-1, keepdim=True)
        onehot = F.one_hot(t.clamp(min=0), x.shape[-1]) * (t != -100).unsqueeze(-1)
        if ctx.kind == "no_H":  # -p log p: the "+H" term forgotten
            grad = -p * logp * grads[0].unsqueeze(-1)
        elif ctx.kind == "mean_upstream":  # one upstream value for every token
            grad = -p * (logp + h) * grads[0].mean()
        elif ctx.kind == "ce_sign":  # p + onehot
            grad = (p + onehot) * grads[0].unsqueeze(-1) * (t != -100).unsqueeze(-1)
        else:  # "unmasked": the entropy gradient also at ignored rows
            g_lp, g_h = grads
            grad = -(p - onehot) * g_lp.unsqueeze(-1) - p * (logp + h) * g_h.unsqueeze(-1)
        return grad.to(x.dtype), None, None


def test_checks_catch_wrong_results(fused):
    """Each wrong implementation fails the same check the kernels pass."""
    x, t = token_inputs((3, 4, 129), torch.float32, "cpu", seed=17)
    ent_oracle, ce_oracle = ORACLES["token_entropy"], ORACLES["token_cross_entropy"]
    both_oracle = ORACLES["token_logprob_and_entropy"]

    def run(fn, oracle, dtype=torch.float32, base=x):
        check_token_op(fn, lambda lg: oracle(lg, t, ignore_index=-100), base, lambda a: a, t, dtype, "check",
                       zero_at_ignored=oracle is not ent_oracle)

    # the right ones pass
    run(fused.token_entropy, ent_oracle)
    run(lambda lg: fused.token_cross_entropy(lg, t), ce_oracle)
    run(lambda lg: fused.token_logprob_and_entropy(lg, t), both_oracle)

    def nan_at(out, i):
        return out.flatten().index_put((torch.tensor([i]),), torch.tensor(float("nan"))).view(out.shape)

    wrong = {
        "entropy gradient without the +H term": (lambda lg: _Wrong.apply(lg, t, "no_H"), ent_oracle),
        "a mean instead of per-token upstream gradient": (lambda lg: _Wrong.apply(lg, t, "mean_upstream"),
                                                           ent_oracle),
        "CE gradient p + onehot": (lambda lg: _Wrong.apply(lg, t, "ce_sign"), ce_oracle),
        "ignored rows get an entropy gradient": (lambda lg: _Wrong.apply(lg, t, "unmasked"), both_oracle),
        "ignored positions not masked": (lambda lg: (-fused.token_cross_entropy(lg, t), fused.token_entropy(lg)),
                                         both_oracle),
        "one unwritten element": (lambda lg: nan_at(fused.token_entropy(lg), 5), ent_oracle),
        "a value off by 1e-4": (lambda lg: fused.token_entropy(lg) * (1 + 1e-4), ent_oracle),
    }
    for what, (fn, oracle) in wrong.items():
        with pytest.raises(AssertionError):
            run(fn, oracle)
            raise RuntimeError(f"not caught: {what}")  # not an AssertionError: fails the test

    # a bf16 gradient off by two bf16 roundings (x (1 + 2^-7)) fails the bf16 tolerance
    def off_by_two_roundings(lg):
        h = fused.token_entropy(lg)
        h.register_hook(lambda g: g * (1 + 2.0**-7))
        return h

    xb = x.to(torch.bfloat16)
    run(fused.token_entropy, ent_oracle, torch.bfloat16, xb)
    with pytest.raises(AssertionError):
        run(off_by_two_roundings, ent_oracle, torch.bfloat16, xb)


# ------------------------------------------------------------------------------------------ GPU


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_cuda_token_ops(dtype):
    build.load("cuda")
    ops = get_ops("fused")
    for shape in [(1, 7), (9, 50257), (9, 50304), (2, 5, 333)]:  # 50304: the vectorised kernels
        check_token_ops(ops, dtype, "cuda", shape)
    check_token_ops(ops, dtype, "cuda", (2, 4, 1000), ignore_index=7, sliced=True, masked=True)
    check_ce_ent_vocab_shards(build.load("cuda"), dtype, "cuda")
    check_ce_ent_vocab_shards(build.load("cuda"), dtype, "cuda", N=21, V=1024, bounds=(0, 512, 1019, 1024))
    if dtype == torch.float32:
        check_confident_rows(ops, "cuda")
        check_confident_rows(ops, "cuda", V=50304)
