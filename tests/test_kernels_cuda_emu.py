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
emulated limit), cross-entropy over a 50257 vocabulary (several backward column chunks).
What the emulator cannot catch (timing, inter-block races, out-of-bounds global accesses, ...):
see cuda_emu.h.
"""

from __future__ import annotations

import pytest
import torch

from model.kernels import build, get_ops
from model.kernels import ops as kops
from tests.test_kernels import (  # noqa: F401  (poison_outputs: autouse fixture, applies here too)
    CUDA_DTYPES,
    assert_close,
    check_cuda_ce_vocab_shards,
    check_cuda_cross_entropy,
    check_cuda_cross_entropy_sliced,
    check_cuda_norms,
    check_cuda_pointwise,
    check_cuda_rope,
    poison_outputs,
    randn,
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
        assert_close(dw, gw, dtype, "rms_norm dweight")


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
