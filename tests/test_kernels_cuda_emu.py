"""The CUDA kernels' logic on CPU: csrc/cuda_*.cu run through the CUDA emulator (csrc/cuda_emu.h).

`build.load("cuda_emu")` compiles the unchanged CUDA kernel sources with the host compiler into
torch.ops.llmk_cuda_emu (same schemas and validation as torch.ops.llmk_cuda, for CPU tensors):
every GPU thread is a coroutine, blocks run one after another, __syncthreads / warp shuffles are
real rendezvous (a deadlock or a divergent barrier is an error), shared memory is NaN-poisoned at
each block start and launch limits are those of an H100/H200.  The `emu_ops` fixture routes the
fused ops for CPU tensors to that library (and allows float16), so the same checks as the `gpu`
tests of tests/test_kernels.py (check_cuda_*) run here against the float64 oracles with
NaN-poisoned outputs, for float32, bfloat16 and float16.

Shapes are picked to reach every kernel path: one row, widths below / not a multiple of 32 and
of the block, widths larger than the block (loops wrap), more rows than the norm backward's
persistent grid, norm-backward accumulators in shared memory (<= 48 KiB, and > 48 KiB with the
opt-in attribute) and in global memory (beyond the opt-in limit, also forced with a smaller
emulated limit), cross-entropy over a 50257 vocabulary (several backward column chunks); the
vectorised (128-bit) and scalar kernels of the norms, bias-GELU / SwiGLU and cross-entropy (aligned
rows with widths a multiple of the vector width, odd-offset views, odd widths, strided rows,
vocabulary shards), the kernel that ran asserted through the emulator's launch log.  The per-token
losses (tests/test_token_losses.py's checks: CE with a per-row upstream gradient, entropy, both
in one pass; vocabulary shards) likewise, on their vectorised and scalar kernels.
What the emulator cannot catch (timing, inter-block races, out-of-bounds global accesses, ...):
see cuda_emu.h.
"""

from __future__ import annotations

import pytest
import torch

from model.kernels import build, get_ops, reference
from model.kernels import ops as kops
from tests.test_kernels import (  # noqa: F401  (poison_outputs: autouse fixture, applies here too)
    CUDA_DTYPES,
    assert_close,
    ce_grad_unit,
    check_against_oracle,
    check_cuda_ce_vocab_shards,
    check_cuda_cross_entropy,
    check_cuda_cross_entropy_sliced,
    check_cuda_norms,
    check_cuda_pointwise,
    check_cuda_rope,
    poison_outputs,
    randn,
)
from tests.test_token_losses import OPS as TOKEN_OPS
from tests.test_token_losses import (
    assert_grads,
    assert_values,
    check_ce_ent_vocab_shards,
    check_confident_rows,
    check_token_ops,
)

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
dtypes = pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: DTYPE_IDS[d])


@pytest.fixture(scope="module")
def emu_lib():
    return build.load("cuda_emu")  # a build failure is a test failure, not a skip


@pytest.fixture
def emu_ops(emu_lib, monkeypatch):
    """get_ops("fused") whose CPU kernels are the emulated CUDA kernels (float16 included)."""
    orig = kops.kernel_lib
    monkeypatch.setattr(kops, "kernel_lib",
                        lambda device, mode: emu_lib if device.type == "cpu" else orig(device, mode))
    monkeypatch.setattr(kops, "_dtype_ok", lambda t: t.dtype in kops.CUDA_DTYPES)
    monkeypatch.setattr(kops, "CPU_DTYPES", kops.CUDA_DTYPES)
    return get_ops("fused")


# -------------------------------------------------------------------------------------- norms


@dtypes
@pytest.mark.parametrize("shape", [(1, 7), (3, 33), (17, 1000), (5, 4099), (300, 40), (2, 3, 24)],
                         ids=lambda s: "x".join(map(str, s)))
def test_norms(emu_ops, dtype, shape):
    check_cuda_norms(emu_ops, dtype, "cpu", shape)


@dtypes
def test_norms_large_rows(emu_ops, dtype):
    """Scalar kernels (D not a multiple of the vector width): 12289, accumulators beyond 48 KiB of
    shared memory (needs the opt-in attribute); 29041, LayerNorm accumulators (2 x D floats)
    beyond the 227 KiB opt-in limit (global partials)."""
    check_cuda_norms(emu_ops, dtype, "cpu", (3, 12289))
    check_cuda_norms(emu_ops, dtype, "cpu", (2, 29041), full=False)


def _norm_launches(emu_lib) -> set[str]:
    """The norm kernels launched since the last call, as '<kernel> <threads>' (from the emulator's
    launch log; the column reduction of the weight gradients is left out)."""
    log = emu_lib._emu_launch_log()
    return {line for line in log.splitlines() if "norm_" in line}


# (dtype, D) -> the forward and backward kernels that must run: vectorised with NV vectors per
# thread and the block size, or the scalar kernels.  The backward's vectorised kernel is limited
# to 512 threads x 2 vectors (its register use; see cuda_norms.cu), the forward's to 1024 x 4.
WIDE_ROWS = {
    (torch.bfloat16, 8192): ("norm_fwd_vec_kernel<T, O, RMS, 2> 512", "norm_bwd_vec_kernel<T, O, RMS, 2> 512"),
    (torch.bfloat16, 32768): ("norm_fwd_vec_kernel<T, O, RMS, 4> 1024", "norm_bwd_kernel<T, O, RMS> 512"),
    (torch.float32, 4096): ("norm_fwd_vec_kernel<T, O, RMS, 2> 512", "norm_bwd_vec_kernel<T, O, RMS, 2> 512"),
    (torch.float32, 16384): ("norm_fwd_vec_kernel<T, O, RMS, 4> 1024", "norm_bwd_kernel<T, O, RMS> 512"),
    (torch.float16, 40000): ("norm_fwd_kernel<T, O, RMS> 512", "norm_bwd_kernel<T, O, RMS> 512"),
}


@pytest.mark.parametrize("dtype,D", list(WIDE_ROWS), ids=["bf16-8192", "bf16-32768", "f32-4096", "f32-16384",
                                                           "f16-40000"])
def test_norms_wide_vector_rows(emu_lib, emu_ops, dtype, D):
    """Wide rows take the planned kernels (checked in the launch log) and match the oracle:
    2 vectors per thread at 512 threads (bf16 8192, f32 4096), the forward at 1024 threads x 4
    vectors with the scalar backward (bf16 32768, f32 16384), and 40000 16-bit elements too wide
    for any vectorised kernel."""
    fwd, bwd = WIDE_ROWS[(dtype, D)]
    x = randn(2, D, dtype=dtype, seed=94, scale=2.0)
    w = randn(D, dtype=dtype, seed=95)
    _norm_launches(emu_lib)
    y = emu_ops.rms_norm(x.requires_grad_(), w.requires_grad_(), 1e-6)
    assert _norm_launches(emu_lib) == {fwd}
    y.backward(torch.ones_like(y))
    assert _norm_launches(emu_lib) == {bwd}
    check_cuda_norms(emu_ops, dtype, "cpu", (2, D), full=False)


@dtypes
def test_norms_misaligned_rows(emu_lib, dtype):
    """Rows that start off a 16-byte boundary (a contiguous view at an odd offset) take the scalar
    kernels; aligned ones the vectorised kernels: both match the float64 oracle."""
    N, D = 5, 1000
    nan = float("nan")
    buf = randn(N * D + 1, dtype=dtype, seed=90, scale=2.0)
    for x in (buf[1:].view(N, D), buf[:-1].view(N, D).clone()):
        w, b = randn(D, seed=91), randn(D, seed=92)
        y = torch.full_like(x, nan)
        mean, rstd = torch.full((N,), nan), torch.full((N,), nan)
        emu_lib.layer_norm_fwd(x, None, w, b, 1e-5, y, None, mean, rstd)
        ref = torch.nn.functional.layer_norm(x.double(), (D,), w.double(), b.double(), 1e-5)
        assert_close(y, ref, dtype, "layer_norm y")
        dy = randn(N, D, dtype=dtype, seed=93)
        dx, dw = torch.full_like(x, nan), torch.full((D,), nan)
        emu_lib.rms_norm_fwd(x, None, w, 1e-5, torch.full((N, D), nan), None, rstd)
        emu_lib.rms_norm_bwd(dy.float(), x, rstd, w, None, dx, dw)
        x64 = x.double().requires_grad_()
        w64 = w.double().requires_grad_()
        yr = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
        gx, gw = torch.autograd.grad(yr, (x64, w64), dy.double())
        assert_close(dx, gx, dtype, "rms_norm dx")
        assert_close(dw, gw, dtype, "rms_norm dweight", unit=N ** 0.5)  # summed over N rows


@dtypes
def test_norms_global_accumulators_small_device(emu_ops, dtype, monkeypatch):
    """A device with 32 KiB of shared memory and 3 SMs: the backward keeps every accumulator in
    global memory and each of its 6 blocks walks several rows."""
    monkeypatch.setenv("LLMK_EMU_SMEM_OPTIN", str(32 * 1024))
    monkeypatch.setenv("LLMK_EMU_SM_COUNT", "3")
    for shape in [(20, 4099), (13, 1000), (7, 33)]:
        check_cuda_norms(emu_ops, dtype, "cpu", shape)


# ---------------------------------------------------------------------------------- pointwise


@dtypes
@pytest.mark.parametrize("shape", [(1, 5), (3, 37), (33, 1000), (2, 7, 130), (600, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_pointwise(emu_ops, dtype, shape):
    check_cuda_pointwise(emu_ops, dtype, "cpu", shape)


def _launches(emu_lib, *names: str) -> set[str]:
    """The kernels among `names` launched since the last read of the launch log, as
    '<kernel> <blockDim.x>' (other kernels, e.g. the column reduction, are left out)."""
    log = emu_lib._emu_launch_log()
    return {line for line in log.splitlines() if line.split("<")[0].split(" ")[0] in names}


POINTWISE = ("bias_gelu_fwd_kernel", "bias_gelu_bwd_kernel", "swiglu_fwd_kernel", "swiglu_bwd_kernel",
             "bias_gelu_fwd_vec_kernel", "bias_gelu_bwd_vec_kernel", "swiglu_fwd_vec_kernel", "swiglu_bwd_vec_kernel")
POINTWISE_VEC = {"bias_gelu_fwd_vec_kernel<T> 256", "bias_gelu_bwd_vec_kernel<T> 32", "swiglu_fwd_vec_kernel<T> 256",
                 "swiglu_bwd_vec_kernel<T> 256"}
POINTWISE_SCALAR = {"bias_gelu_fwd_kernel<T> 256", "bias_gelu_bwd_kernel<T> 32", "swiglu_fwd_kernel<T> 256",
                    "swiglu_bwd_kernel<T> 256"}


@dtypes
@pytest.mark.parametrize("shape", [(33, 1000), (5, 1004), (3, 37), (2100, 16)], ids=lambda s: "x".join(map(str, s)))
def test_pointwise_vector_paths(emu_lib, emu_ops, dtype, shape):
    """bias-GELU / SwiGLU take the 128-bit kernels when D is a multiple of the vector width (8
    16-bit or 4 float32 elements) and every row is 16-byte aligned, also SwiGLU on the two halves
    of one [N, 2D] tensor (row stride 2D); the scalar kernels otherwise (1004: float32 only; 37:
    none).  1000: 125 / 250 column vectors (a partly idle tile); 2100 rows: more than the bias
    gradient's 256 x 8 row tiles (rows wrap, partials summed over 256 blocks)."""
    W = 16 // dtype.itemsize
    _launches(emu_lib)
    check_cuda_pointwise(emu_ops, dtype, "cpu", shape)
    assert _launches(emu_lib, *POINTWISE) == (POINTWISE_VEC if shape[-1] % W == 0 else POINTWISE_SCALAR)


@dtypes
def test_pointwise_misaligned_rows(emu_lib, emu_ops, dtype):
    """Rows off a 16-byte boundary (an odd-offset view; SwiGLU's up half at an odd column offset,
    gate and up row stride 2D + 1) take the scalar kernels, and match the oracle."""
    N, D = 6, 1000
    buf = randn(N * D + 1, dtype=dtype, seed=80, scale=2.0)
    b = randn(D, dtype=dtype, seed=81)
    _launches(emu_lib)
    check_against_oracle(lambda buf, bias: emu_ops.bias_gelu(buf[1:].view(N, D), bias),
                         lambda buf, bias: reference.bias_gelu(buf[1:].view(N, D), bias),
                         dict(buf=buf, bias=b), ["buf", "bias"], dtype)
    assert _launches(emu_lib, *POINTWISE) == {"bias_gelu_fwd_kernel<T> 256", "bias_gelu_bwd_kernel<T> 32"}

    def halves(fn):
        return lambda both: fn(both[:, :D], both[:, D + 1:])

    both = randn(N, 2 * D + 1, dtype=dtype, seed=82, scale=3.0)
    check_against_oracle(halves(emu_ops.swiglu), halves(reference.swiglu), dict(both=both), ["both"], dtype)
    assert _launches(emu_lib, *POINTWISE) == {"swiglu_fwd_kernel<T> 256", "swiglu_bwd_kernel<T> 256"}


ROPE_CASES = [  # B, Hq, Hk, T, D, cos layout
    (1, 1, 1, 1, 2, "td"),
    (2, 3, 3, 7, 10, "td"),
    (2, 4, 2, 9, 64, "td"),  # GQA
    (3, 2, 1, 5, 22, "b1td"),  # per-sequence positions
]


@dtypes
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("transposed", [False, True], ids=["bhtd", "bthd"])
def test_rope(emu_ops, dtype, case, transposed):
    check_cuda_rope(emu_ops, dtype, "cpu", case, transposed)


# ------------------------------------------------------------------------------ cross-entropy


@dtypes
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_cross_entropy(emu_ops, dtype, inplace):
    for shape in [(1, 50257), (3, 50257), (13, 1000), (4, 7), (2, 5, 333)]:
        check_cuda_cross_entropy(emu_ops, dtype, "cpu", shape, inplace)


def test_cross_entropy_sliced_rows_and_ignore_index(emu_ops):
    check_cuda_cross_entropy_sliced(emu_ops, "cpu")


def test_cross_entropy_out_of_range_target_is_nan(emu_ops):
    """The CUDA kernel cannot raise: a target outside the vocabulary makes the loss NaN."""
    loss = emu_ops.cross_entropy(randn(2, 10, seed=27), torch.tensor([3, 10]))
    assert torch.isnan(loss)


@dtypes
def test_cross_entropy_vocab_parallel_shards(emu_lib, dtype):
    check_cuda_ce_vocab_shards(emu_lib, dtype, "cpu")


CE = ("ce_fwd_kernel", "ce_bwd_kernel", "ce_fwd_vec_kernel", "ce_bwd_vec_kernel")
CE_VEC = ["ce_fwd_vec_kernel<T, 2> 512", "ce_bwd_vec_kernel<T, 2> 256"]
CE_SCALAR = ["ce_fwd_kernel<T> 512", "ce_bwd_kernel<T> 256"]


def _ce_launches(emu_lib) -> list[str]:
    log = emu_lib._emu_launch_log()
    return [line for line in log.splitlines() if line.split("<")[0] in CE]


@dtypes
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_cross_entropy_vector_paths(emu_lib, emu_ops, dtype, inplace):
    """The 128-bit kernels run when V is a multiple of the vector width and every row starts
    16-byte aligned, the scalar kernels otherwise; both match the float64 oracle, with the
    gradient out of place or written into the logits.  50304 (the padded GPT-2 vocabulary): the
    forward's two-vector loop plus a partial last pass, 13 / 25 backward column chunks; 1004: a
    multiple of 4 (float32 vectors) but not of 8; 1001: no vectors."""
    W = 16 // dtype.itemsize
    for shape in [(3, 50304), (2, 3, 1004), (2, 1001)]:
        _ce_launches(emu_lib)
        check_cuda_cross_entropy(emu_ops, dtype, "cpu", shape, inplace)
        assert _ce_launches(emu_lib) == (CE_VEC if shape[-1] % W == 0 else CE_SCALAR), shape


@dtypes
def test_cross_entropy_misaligned_and_sliced_rows(emu_lib, emu_ops, dtype):
    """Rows with two-level strides (logits[:, :-1] of [B, T + 1, V], no copy) stay on the vector
    path when V keeps them aligned (V = 1000); an odd-offset view of aligned width (rows start 2 or
    4 bytes off a 16-byte boundary) and sliced rows of odd stride (V = 1001 -> rows of 1000 at
    stride 1001) take the scalar kernels."""
    g = torch.Generator().manual_seed(84)
    cases = [  # (buffer shape, view, expected kernels)
        ((2, 5, 1000), lambda x: x[:, :-1], CE_VEC),
        ((4 * 1000 + 1,), lambda x: x[1:].view(4, 1000), CE_SCALAR),
        ((2, 4, 1001), lambda x: x[:, :, :-1], CE_SCALAR),
    ]
    for shape, view, expected in cases:
        buf = randn(*shape, dtype=dtype, seed=85, scale=4.0)
        x = view(buf)
        V = x.shape[-1]
        t = torch.randint(0, V, x.shape[:-1], generator=g)
        t.view(-1)[1] = -100
        t.view(-1)[-2] = V - 1

        def fn(buf, t, view=view):
            return emu_ops.cross_entropy(view(buf), t)

        def oracle(buf, t, view=view, V=V):
            return torch.nn.functional.cross_entropy(view(buf).reshape(-1, V), t.reshape(-1))

        unit = torch.zeros(shape, dtype=torch.float64)  # the elements outside the view get no gradient
        view(unit).copy_(ce_grad_unit(view(buf.double()), t, 1 / int((t != -100).sum())))
        _ce_launches(emu_lib)
        check_against_oracle(fn, oracle, dict(buf=buf, t=t), ["buf"], dtype, units={"buf": unit})
        assert _ce_launches(emu_lib) == expected, shape


@dtypes
def test_cross_entropy_vector_path_visits_every_column(emu_lib, dtype):
    """Row r of a 50304-wide row holds a spike (+30: it dominates the row's log-sum-exp, so a
    column skipped or counted twice moves lse by ~log 2 or more) at column SPIKES[r]: the row's
    ends, vector edges, the forward's two-vector loop steps (4096 float32 / 8192 16-bit columns)
    and its last partial pass (from 49152), the backward's column chunks (2048 / 4096); the
    target is the spike, another column or ignored.  lse, loss, target logit and the gradient
    against float64."""
    spikes = [0, 3, 4, 7, 8, 2047, 2048, 4095, 4096, 8191, 8192, 12288, 49151, 49152, 50295, 50296, 50303]
    N, V = len(spikes), 50304
    x = randn(N, V, dtype=dtype, seed=86)
    x[torch.arange(N), torch.tensor(spikes)] = 30.0
    t = torch.tensor(spikes)
    t[1::3] = -100
    t[2::3] = torch.tensor(spikes[::-1])[2::3]
    nan = float("nan")
    loss, lse, xt = (torch.full((N,), nan) for _ in range(3))
    _ce_launches(emu_lib)
    emu_lib.ce_fwd(x.unsqueeze(0), t, -100, 0, True, loss, lse, xt)
    x64 = x.double()
    valid = t != -100
    ref_lse = torch.logsumexp(x64, -1)
    ref_xt = torch.where(valid, x64.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    assert_close(lse, ref_lse, dtype, "lse")
    assert_close(xt, ref_xt, dtype, "target logit")
    assert_close(loss, torch.where(valid, ref_lse - ref_xt, 0.0), dtype, "loss")
    grad = torch.full_like(x, nan).unsqueeze(0)
    emu_lib.ce_bwd(x.unsqueeze(0), t, lse, torch.tensor([0.5]), -100, 0, grad)
    p = torch.softmax(x64, -1)
    p[valid.nonzero().squeeze(1), t[valid]] -= 1.0
    assert_close(grad[0], torch.where(valid.unsqueeze(1), p * 0.5, 0.0), dtype, "grad", unit=ce_grad_unit(x64, t, 0.5))
    assert _ce_launches(emu_lib) == CE_VEC


@dtypes
def test_cross_entropy_vocab_shards_vector_paths(emu_lib, dtype):
    """Vocabulary shards of an aligned 1024-wide row: [0, 512) on the vector path, [512, 1019)
    (507 wide) and [1019, 1024) (misaligned start) on the scalar one; targets on shard edges."""
    _ce_launches(emu_lib)
    check_cuda_ce_vocab_shards(emu_lib, dtype, "cpu", N=21, V=1024, bounds=(0, 512, 1019, 1024))
    fwd, bwd = ["ce_fwd_vec_kernel<T, 2> 512", "ce_fwd_kernel<T> 512", "ce_fwd_kernel<T> 512"], \
        ["ce_bwd_vec_kernel<T, 2> 256", "ce_bwd_kernel<T> 256", "ce_bwd_kernel<T> 256"]
    assert _ce_launches(emu_lib) == fwd + bwd


# LLMK_TUNE settings (bench/kernel_sweep.py's) -> the kernels they must launch for bf16 rows of
# 4096 (norms) and 9000 (cross-entropy: the unrolled loop, a partial pass, several chunks).
NORM = ("norm_fwd_kernel", "norm_bwd_kernel", "norm_fwd_vec_kernel", "norm_bwd_vec_kernel")
NORM_DEFAULT = {"norm_fwd_vec_kernel<T, O, RMS, 1> 512", "norm_bwd_vec_kernel<T, O, RMS, 1> 512"}
TUNED = {
    "": NORM_DEFAULT | set(CE_VEC),
    "norm_fwd_threads=128,norm_bwd_threads=256,norm_bwd_blocks=1": set(CE_VEC) | {
        "norm_fwd_vec_kernel<T, O, RMS, 4> 128", "norm_bwd_vec_kernel<T, O, RMS, 2> 256"},
    "norm_fwd_threads=256,norm_bwd_blocks=4": set(CE_VEC) | {
        "norm_fwd_vec_kernel<T, O, RMS, 2> 256", "norm_bwd_vec_kernel<T, O, RMS, 1> 512"},
    "norm_fwd_threads=256,norm_fwd_hoist=1": set(CE_VEC) | {
        "norm_fwd_vec_kernel<T, O, RMS, 2, true> 256", "norm_bwd_vec_kernel<T, O, RMS, 1> 512"},
    "norm_fwd_hoist=1": set(CE_VEC) | {
        "norm_fwd_vec_kernel<T, O, RMS, 1, true> 512", "norm_bwd_vec_kernel<T, O, RMS, 1> 512"},
    "ce_fwd_unroll=4,ce_fwd_threads=256,ce_bwd_unroll=4": NORM_DEFAULT | {"ce_fwd_vec_kernel<T, 4> 256",
                                                                          "ce_bwd_vec_kernel<T, 4> 256"},
    "ce_fwd_threads=96,ce_bwd_gy=1": NORM_DEFAULT | {"ce_fwd_vec_kernel<T, 2> 96", "ce_bwd_vec_kernel<T, 2> 256"},
}


@pytest.mark.parametrize("tune", list(TUNED))
def test_tuned_launch_shapes(emu_lib, emu_ops, tune, monkeypatch):
    """Every launch shape the kernel sweep tries computes the same results (float64 oracle) and
    is the one it asks for (launch log); ce_bwd_gy=1 walks a row's column chunks in one block."""
    monkeypatch.setenv("LLMK_TUNE", tune)
    _launches(emu_lib)
    check_cuda_norms(emu_ops, torch.bfloat16, "cpu", (5, 4096), full=False)
    check_cuda_cross_entropy(emu_ops, torch.bfloat16, "cpu", (3, 9000), inplace=False)
    assert _launches(emu_lib, *CE, *NORM) == TUNED[tune]


@pytest.mark.parametrize("schedule", ["reverse", "random:11"])
def test_vector_paths_other_schedules(emu_lib, emu_ops, schedule, monkeypatch):
    """The vectorised cross-entropy (in place; 9000 bf16: the two-vector loop and a partial pass)
    and pointwise kernels (the bias-gradient tile reduction has a barrier) with threads and
    blocks in another order."""
    monkeypatch.setenv("LLMK_EMU_SCHEDULE", schedule)
    _launches(emu_lib)
    for dtype in (torch.float32, torch.bfloat16):
        check_cuda_cross_entropy(emu_ops, dtype, "cpu", (2, 9000), inplace=True)
        check_cuda_pointwise(emu_ops, dtype, "cpu", (40, 96))
    assert _launches(emu_lib, *CE, *POINTWISE) == set(CE_VEC) | POINTWISE_VEC


@pytest.mark.parametrize("schedule", ["reverse", "random:7"])
def test_other_schedules(emu_ops, schedule, monkeypatch):
    """Threads (and blocks) run in another order: a missing barrier would change results."""
    monkeypatch.setenv("LLMK_EMU_SCHEDULE", schedule)
    for dtype in (torch.float32, torch.bfloat16):
        check_cuda_norms(emu_ops, dtype, "cpu", (5, 1000))
        # more rows than the backward's blocks: the reduction buffers are reused across rows
        check_cuda_norms(emu_ops, dtype, "cpu", (300, 40), full=False)
        check_cuda_pointwise(emu_ops, dtype, "cpu", (9, 70))
        check_cuda_cross_entropy(emu_ops, dtype, "cpu", (3, 5000), inplace=True)


# ---------------------------------------------------------------- per-token CE and entropy

ENT_VEC = ["ce_ent_fwd_vec_kernel<T> 512", "ce_ent_bwd_vec_kernel<T> 256"]
ENT_SCALAR = ["ce_ent_fwd_kernel<T> 512", "ce_ent_bwd_kernel<T> 256"]


def _token_launches(emu_lib) -> list[str]:
    """The cross-entropy / entropy kernels launched since the last read, in order."""
    return [line for line in emu_lib._emu_launch_log().splitlines() if line.startswith("ce_")]


@dtypes
@pytest.mark.parametrize("shape", [(1, 7), (3, 50257), (3, 50304), (2, 5, 333), (2, 3, 1004)],
                         ids=lambda s: "x".join(map(str, s)))
def test_token_losses(emu_lib, emu_ops, dtype, shape):
    """token_cross_entropy (ce_fwd + ce_bwd with a per-row scale), token_entropy and
    token_logprob_and_entropy (ce_ent_fwd + ce_ent_bwd) against float64 with per-token upstream
    gradients; the 128-bit kernels when V is a multiple of the vector width (50304; 1004 for
    float32 only), the scalar ones otherwise (7, 333, 50257: the column chunks of a real
    vocabulary)."""
    W = 16 // dtype.itemsize
    vec = shape[-1] % W == 0
    for name in TOKEN_OPS:
        _token_launches(emu_lib)
        check_token_ops(emu_ops, dtype, "cpu", shape, names=(name,))
        if name == "token_cross_entropy":
            expected = CE_VEC if vec else CE_SCALAR
        else:
            expected = ENT_VEC if vec else ENT_SCALAR
        assert _token_launches(emu_lib) == expected, (name, shape)


@dtypes
def test_token_losses_sliced_masked_rows(emu_lib, emu_ops, dtype):
    """logits[:, :-1] of [2, 5, V] with -inf logits and ignore_index 7: V = 1000 keeps every row
    16-byte aligned (vectorised kernels), V = 1001 does not (scalar kernels)."""
    for V, expected in ((1000, ENT_VEC), (1001, ENT_SCALAR)):
        _token_launches(emu_lib)
        check_token_ops(emu_ops, dtype, "cpu", (2, 4, V), ignore_index=7, sliced=True, masked=True,
                        names=("token_logprob_and_entropy",))
        assert _token_launches(emu_lib) == expected, V
        check_token_ops(emu_ops, dtype, "cpu", (2, 4, V), ignore_index=-1, sliced=True, masked=True,
                        names=("token_entropy", "token_cross_entropy"))


@dtypes
def test_ce_ent_vocab_shards(emu_lib, dtype):
    """The kernels' vocabulary-parallel use: shards [0, 512) (vectorised), [512, 1019) (507 wide)
    and [1019, 1024) (misaligned start; scalar), targets on shard edges, a row with -inf logits."""
    _token_launches(emu_lib)
    check_ce_ent_vocab_shards(emu_lib, dtype, "cpu", N=21, V=1024, bounds=(0, 512, 1019, 1024))
    fwd = [ENT_VEC[0], ENT_VEC[0], ENT_SCALAR[0], ENT_SCALAR[0], ENT_SCALAR[0], ENT_SCALAR[0]]
    bwd = [ENT_VEC[1], ENT_VEC[1], CE_VEC[1], ENT_SCALAR[1], ENT_SCALAR[1], CE_SCALAR[1]]
    launches = _token_launches(emu_lib)
    assert launches == fwd[:2] + bwd[:3] + fwd[2:4] + bwd[3:] + fwd[4:] + bwd[3:], launches
    check_ce_ent_vocab_shards(emu_lib, dtype, "cpu")  # 1001 = 501 + 500: scalar kernels


@dtypes
def test_ce_ent_vector_path_visits_every_column(emu_lib, dtype):
    """The spike rows of test_cross_entropy_vector_path_visits_every_column through ce_ent_fwd /
    ce_ent_bwd: a column skipped or counted twice moves lse by ~log 2 or more and the entropy of
    the (nearly one-hot) row from ~1e-6 to ~log 2 or more."""
    spikes = [0, 3, 4, 7, 8, 2047, 2048, 4095, 4096, 8191, 8192, 12288, 49151, 49152, 50295, 50296, 50303]
    N, V = len(spikes), 50304
    x = randn(N, V, dtype=dtype, seed=86)
    x[torch.arange(N), torch.tensor(spikes)] = 30.0
    t = torch.tensor(spikes)
    t[1::3] = -100
    t[2::3] = torch.tensor(spikes[::-1])[2::3]
    nan = float("nan")
    lse, ent, loss = (torch.full((N,), nan) for _ in range(3))
    _token_launches(emu_lib)
    emu_lib.ce_ent_fwd(x.unsqueeze(0), None, -100, 0, True, lse, ent, None, None)
    x64 = x.double()
    logp = torch.log_softmax(x64, -1)
    p = logp.exp()
    h64 = -(p * logp).sum(-1)
    assert_values(lse, torch.logsumexp(x64, -1), "lse", 30.0)
    assert_values(ent, h64, "entropy", 30.0)
    lse2, ent2 = torch.full((N,), nan), torch.full((N,), nan)
    emu_lib.ce_ent_fwd(x.unsqueeze(0), t, -100, 0, True, lse2, ent2, loss, None)
    valid = t != -100
    ce64 = torch.where(valid, -logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    assert_values(loss, ce64, "loss", 30.0)
    gl, gh = torch.linspace(-1, 1, N), torch.linspace(2, -0.5, N)
    grad = torch.full_like(x, nan).unsqueeze(0)
    emu_lib.ce_ent_bwd(x.unsqueeze(0), t, lse2, ent2, gl, gh, -100, 0, grad)
    onehot = torch.nn.functional.one_hot(t.clamp(min=0), V) * valid.unsqueeze(1)
    ref = p * (gl.double().unsqueeze(1) - gh.double().unsqueeze(1) * (logp + h64.unsqueeze(1))) \
        - gl.double().unsqueeze(1) * onehot
    assert_grads(grad[0], torch.where(valid.unsqueeze(1), ref, 0.0), dtype, "grad")
    assert _token_launches(emu_lib) == [ENT_VEC[0], ENT_VEC[0], ENT_VEC[1]]


def test_token_losses_confident_rows(emu_lib, emu_ops):
    """Nearly one-hot rows keep the entropy's and the top log-prob's relative precision, on the
    scalar (50257) and the vectorised (50304) kernels."""
    _token_launches(emu_lib)
    check_confident_rows(emu_ops, "cpu", N=24)
    check_confident_rows(emu_ops, "cpu", N=24, V=50304)
    assert set(_token_launches(emu_lib)) == {ENT_SCALAR[0], ENT_VEC[0]}


@pytest.mark.parametrize("schedule", ["reverse", "random:5"])
def test_token_losses_other_schedules(emu_lib, emu_ops, schedule, monkeypatch):
    """The entropy kernels' block reduction (four shuffled values, one barrier) with threads and
    blocks in another order, on the vectorised (V = 5000) and scalar (V = 4999) kernels."""
    monkeypatch.setenv("LLMK_EMU_SCHEDULE", schedule)
    for dtype in (torch.float32, torch.bfloat16):
        for V in (5000, 4999):
            check_token_ops(emu_ops, dtype, "cpu", (3, V), names=("token_logprob_and_entropy",))


# ------------------------------------------------------------------------ the emulator itself


def selftest(lib, name):
    out = torch.full((4096,), float("nan"))
    lib._emu_selftest(name, out)
    return out


@pytest.mark.parametrize("name,error", [
    ("deadlock", r"deadlock: no thread of the block can make progress; threads 0-32 wait in __syncthreads.*"
                 r"threads 33-63 wait in __shfl_xor_sync"),
    ("divergent_barrier", "divergent __syncthreads"),
    ("threads_1025", r"invalid configuration argument: blockDim \(1025,1,1\)"),
    ("block_32x33", r"invalid configuration argument: blockDim \(32,33,1\)"),
    ("empty_grid", r"invalid configuration argument: gridDim \(0,1,1\)"),
    ("partial_warp_shuffle", "names lanes that do not exist"),
    ("exited_lane", "lane 5 exited while lanes"),
    ("smem_64k_no_attribute", "65536 bytes of dynamic shared memory"),
    ("smem_attribute_above_optin", "cudaFuncSetAttribute"),
    ("smem_overrun", "write past the end of dynamic shared memory"),
    ("misaligned", "misaligned address"),
])
def test_emulator_reports_faults(emu_lib, name, error):
    """Kernels that would hang or fail on a GPU fail the launch with a description (no hang), and
    the error is not sticky: the next launch works."""
    with pytest.raises(RuntimeError, match=error):
        selftest(emu_lib, name)
    assert (selftest(emu_lib, "threads_1024")[:1024] == 1).all()


def test_emulator_launch_limits_and_shared_memory(emu_lib):
    assert (selftest(emu_lib, "threads_1024")[:1024] == 1).all()
    assert (selftest(emu_lib, "smem_64k_attribute")[:32] == 1).all()
    # static and dynamic shared memory read before written: NaN in every block, never the
    # previous block's values
    assert torch.isnan(selftest(emu_lib, "shared_poison")[:3 * 128]).all()


def test_emulator_schedule_exposes_missing_barrier(emu_lib, monkeypatch):
    assert (selftest(emu_lib, "missing_barrier")[:64] == 42).all()  # forward: thread 0 runs first
    monkeypatch.setenv("LLMK_EMU_SCHEDULE", "reverse")
    assert torch.isnan(selftest(emu_lib, "missing_barrier")[1:64]).all()


def test_emulator_warp_collectives(emu_lib):
    r = selftest(emu_lib, "shuffles")[:64 * 8].view(64, 8)
    t = torch.arange(64)
    lane, base = t % 32, t - t % 32

    def own_or(src, ok):
        return torch.where(ok, src, t).float()

    torch.testing.assert_close(r[:, 0], (t ^ 1).float())
    torch.testing.assert_close(r[:, 1], own_or(t + 3, lane + 3 < 32))
    torch.testing.assert_close(r[:, 2], own_or(t - 2, lane >= 2))
    torch.testing.assert_close(r[:, 3], (base + 7).float())
    torch.testing.assert_close(r[:, 4], own_or(t ^ 16, lane >= 16))  # width 16: only earlier groups
    torch.testing.assert_close(r[:, 5], own_or(t + 4, lane % 8 + 4 < 8))
    assert (r[:, 6] == 1).all()  # ballot
    torch.testing.assert_close(r[:, 7], torch.where(lane < 16, t ^ 2, -1).float())


def test_emulator_half_conversions(emu_lib):
    """__float2half_rn / __float2bfloat16_rn round to nearest even like torch (ties, subnormals,
    overflow to infinity, NaN), and convert back exactly."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
                            65504.0, 65519.0, 65520.0, -70000.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-24,
                            2.0**-14, 2.0**-14 - 2.0**-25, 3e38, 1e-40, float("inf"), float("-inf")])
    x = torch.cat([special, torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g)])
    h, b = torch.empty(x.shape, dtype=torch.int16), torch.empty(x.shape, dtype=torch.int16)
    hf, bf = torch.empty_like(x), torch.empty_like(x)
    emu_lib._emu_convert(x, h, b, hf, bf)
    assert torch.equal(h, x.half().view(torch.int16))
    assert torch.equal(b, x.bfloat16().view(torch.int16))
    assert torch.equal(hf, x.half().float()) and torch.equal(bf, x.bfloat16().float())
    nan = torch.tensor([float("nan")])
    h1, b1 = torch.empty(1, dtype=torch.int16), torch.empty(1, dtype=torch.int16)
    hf1, bf1 = torch.empty(1), torch.empty(1)
    emu_lib._emu_convert(nan, h1, b1, hf1, bf1)
    assert torch.isnan(hf1).all() and torch.isnan(bf1).all()
