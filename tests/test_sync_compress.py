"""Compression of what replicas exchange (agents/sync/compress.py), in one process.

- `make_compressor` rejects unknown kinds and out-of-range ratio/rank, naming what is allowed.
- Error feedback: sent + new residual == gradient + old residual (float64, 1e-12) for every kind
  over several steps; the sum of everything sent tracks the sum of the gradients (the difference is
  the current residual, which stays below the top-k contraction bound, while without feedback the
  gap grows linearly).
- int8 errors are within half a quantisation step per element; topk keeps exactly the k largest.
- PowerSGD: exact on rank-r matrices after one power iteration (the first call, from the seeded Q,
  and every warm-started call after it); repeated calls on one matrix converge to the best rank-r
  approximation (the warm start is a subspace iteration); between 4 simulated replicas, the
  two-phase all-reduce (P, then Q) gives the same result on every replica and equals PowerSGD of
  the summed matrix.
- Bytes on the wire: fp16 2/elem, int8 1/elem + fp32 scale per chunk, topk k (value + int32
  index), powersgd r (m + n) x 4 for fp32.
- `ErrorFeedback.exchange` with a fake all-reduce / all-gather over 4 threads: every replica gets
  the same sum, equal to the sum of what each sent, for every kind.
- 4-replica SGD on a least-squares problem with int8 + error feedback reaches the loss of
  uncompressed averaging (without feedback it stays several times further off; rank-2 PowerSGD
  with its two all-reduces gets there too).
- The error-feedback state (residuals, PowerSGD Q and RNG) saves and resumes exactly.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from agents.sync.compress import (
    INT8_CHUNK,
    KINDS,
    ErrorFeedback,
    Int8Compressor,
    PowerSGDCompressor,
    TopKCompressor,
    decompress,
    make_compressor,
    orthogonalise,
    payload_bytes,
    powersgd_step,
)

F64 = torch.float64

# --------------------------------------------------------------------------- fake collectives


class FakeGroup:
    """W simulated replicas, one thread each, in one process; collectives meet at a barrier.

    all_reduce sums the replicas' tensors in replica order (so every replica gets the same bits),
    all_gather returns copies of them in replica order.
    """

    def __init__(self, world: int):
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def _meet(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        parts = [s.clone() for s in self.slots]
        self.barrier.wait()
        return parts

    def all_reduce_fn(self, rank: int):
        def fn(t):
            parts = self._meet(rank, t)
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            return total

        return fn

    def all_gather_fn(self, rank: int):
        return lambda t: self._meet(rank, t)

    def run(self, fn):
        """fn(rank) on every replica at once; their results in replica order."""
        results, errors = [None] * self.world, []

        def body(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def low_rank(m, n, r, gen, dtype=F64):
    return torch.randn(m, r, generator=gen, dtype=dtype) @ torch.randn(r, n, generator=gen, dtype=dtype)


# ------------------------------------------------------------------------------ configuration


def test_make_compressor_validates_kind_ratio_rank():
    for kind in KINDS:
        assert make_compressor(kind).kind == kind
    assert make_compressor(None).kind == "none"
    assert make_compressor("TopK", ratio=0.1).ratio == 0.1
    assert make_compressor("powersgd", rank=2).rank == 2

    with pytest.raises(ValueError, match="none, fp16, bf16, int8, topk, powersgd.*'zip'"):
        make_compressor("zip")
    for bad in (0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"topk ratio must be a number in \(0, 1\]"):
            make_compressor("topk", ratio=bad)
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ValueError, match="powersgd rank must be an integer >= 1"):
            make_compressor("powersgd", rank=bad)
    with pytest.raises(ValueError, match="ratio applies only to sync.compress: topk"):
        make_compressor("int8", ratio=0.1)
    with pytest.raises(ValueError, match="rank applies only to sync.compress: powersgd"):
        make_compressor("topk", rank=2)
    with pytest.raises(ValueError, match="sync.compress must be one of"):
        ErrorFeedback("int4")


# ----------------------------------------------------------------------------- error feedback

SHAPES = {"w": (16, 24), "b": (37,), "conv": (6, 5, 7)}
OPTIONS = {"topk": {"ratio": 0.05}, "powersgd": {"rank": 2}}


@pytest.mark.parametrize("kind", KINDS)
def test_sent_plus_residual_is_gradient_plus_old_residual(kind):
    gen = torch.Generator().manual_seed(1)
    ef = ErrorFeedback(kind, **OPTIONS.get(kind, {}))
    for _ in range(6):
        for name, shape in SHAPES.items():
            g = torch.randn(shape, generator=gen, dtype=F64) * 3
            old = ef.residual(name)
            old = torch.zeros_like(g) if old is None else old.clone()
            payload, sent = ef.step(name, g)
            new = ef.residual(name)
            if kind == "none":
                assert new is None and torch.equal(sent, g)
                continue
            assert sent.dtype == F64 and sent.shape == g.shape
            torch.testing.assert_close(sent + new, g + old, rtol=0, atol=1e-12)
            torch.testing.assert_close(decompress(payload), sent, rtol=0, atol=0)
    if kind != "none":  # lossy kinds owe something
        assert any(ef.residual(n).abs().max() > 0 for n in SHAPES)


def test_error_feedback_sum_of_sent_tracks_sum_of_gradients():
    """top-k with ratio 0.01: sum(g) - sum(sent) == residual, and the residual stays bounded.

    top-k is a delta-contraction, |x - C(x)|^2 <= (1 - delta) |x|^2 with delta = k / d, so
    |e_{t+1}| <= sqrt(1 - delta) (|e_t| + G) and |e_t| <= sqrt(1 - delta) G / (1 - sqrt(1 - delta)).
    Gradients have a constant mean with many small entries: without feedback top-k keeps sending the
    same large entries and the gap grows linearly with the steps.
    """
    d, steps = 2000, 400
    gen = torch.Generator().manual_seed(2)
    mean = torch.rand(d, generator=gen, dtype=F64) * 0.1
    mean[:10] = 1.0
    ef = ErrorFeedback("topk", ratio=0.01)
    plain = TopKCompressor(0.01)
    delta = plain.k(d) / d
    sum_g = torch.zeros(d, dtype=F64)
    sum_sent = torch.zeros(d, dtype=F64)
    sum_plain = torch.zeros(d, dtype=F64)
    g_max = 0.0
    gaps = []
    for _ in range(steps):
        g = mean + 0.05 * torch.randn(d, generator=gen, dtype=F64)
        g_max = max(g_max, g.norm().item())
        x = g + ef.residual("g") if ef.residual("g") is not None else g
        _, sent = ef.step("g", g)
        e = ef.residual("g")
        assert e.norm() ** 2 <= (1 - delta) * x.norm() ** 2 * (1 + 1e-12)  # contraction
        bound = math.sqrt(1 - delta) * g_max / (1 - math.sqrt(1 - delta))
        assert e.norm() <= bound
        sum_g += g
        sum_sent += sent
        sum_plain += plain.decompress(plain.compress(g))
        torch.testing.assert_close(sum_g - sum_sent, e, rtol=0, atol=1e-9)
        gaps.append(((sum_g - sum_sent).norm().item(), (sum_g - sum_plain).norm().item()))
    (ef_half, plain_half), (ef_end, plain_end) = gaps[steps // 2 - 1], gaps[-1]
    assert plain_end > 1.9 * plain_half  # grows linearly without feedback
    assert ef_end < 1.2 * ef_half  # stays put with it
    assert plain_end > 5 * ef_end, (plain_end, ef_end)


# ------------------------------------------------------------------------------------ int8, topk


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_int8_error_within_half_a_step(dtype):
    gen = torch.Generator().manual_seed(3)
    n = 5 * INT8_CHUNK + 77  # last chunk partial
    x = torch.randn(n, generator=gen, dtype=F64)
    x *= torch.logspace(-6, 3, n, dtype=F64)[torch.randperm(n, generator=gen)]  # many magnitudes
    x[INT8_CHUNK : 2 * INT8_CHUNK] = 0  # an all-zero chunk
    x = x.to(dtype).reshape(23, 59)  # n = 1357
    c = Int8Compressor()
    payload = c.compress(x)
    q, scale = payload.tensors["q"], payload.tensors["scale"]
    assert q.dtype == torch.int8 and q.numel() == n and scale.dtype == torch.float32
    assert scale.numel() == math.ceil(n / INT8_CHUNK)
    assert int(q.abs().max()) <= 127
    y = decompress(payload)
    assert y.dtype == dtype and y.shape == x.shape
    step = scale.to(F64).repeat_interleave(INT8_CHUNK)[:n]
    err = (x.to(F64) - y.to(F64)).reshape(-1).abs()
    slack = 1e-12 if dtype == F64 else 1e-6  # rounding of x / scale in the input dtype
    assert bool((err <= step / 2 + slack * x.to(F64).abs().reshape(-1)).all())
    # Each chunk's largest entry gets code +-127, and the zero chunk decodes to zeros.
    chunks = q[: 5 * INT8_CHUNK].reshape(5, INT8_CHUNK).abs()
    assert chunks.amax(1).tolist() == [127, 0, 127, 127, 127]
    assert bool((y.reshape(-1)[INT8_CHUNK : 2 * INT8_CHUNK] == 0).all())


def test_topk_keeps_exactly_the_k_largest():
    gen = torch.Generator().manual_seed(4)
    n = 1000
    mags = torch.randperm(n, generator=gen).to(F64) + 1  # distinct magnitudes
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    x = (mags * signs).reshape(20, 50)
    c = TopKCompressor(0.05)
    payload = c.compress(x)
    k = c.k(n)
    assert k == 50
    idx = payload.tensors["indices"]
    assert idx.dtype == torch.int32 and idx.numel() == k
    expected = set(torch.argsort(mags, descending=True)[:k].tolist())
    assert set(idx.tolist()) == expected
    y = decompress(payload).reshape(-1)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[list(expected)] = True
    assert torch.equal(y[kept], x.reshape(-1)[kept]) and bool((y[~kept] == 0).all())
    assert TopKCompressor(0.01).k(10) == 1 and TopKCompressor(1.0).k(10) == 10


# --------------------------------------------------------------------------------------- bytes


def test_payload_bytes():
    m, n = 256, 512
    numel = m * n
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(5))
    size = {k: make_compressor(k).compress(x).nbytes for k in KINDS}  # defaults: ratio 0.01, rank 4
    assert size["none"] == 4 * numel
    assert size["fp16"] == size["bf16"] == 2 * numel
    assert size["int8"] == numel + 4 * math.ceil(numel / INT8_CHUNK)  # ~1.016 bytes/elem
    k = round(0.01 * numel)
    assert size["topk"] == k * (4 + 4)  # fp32 value + int32 index, ~0.08 bytes/elem
    assert size["powersgd"] == 4 * (m + n) * 4
    for r in (1, 2, 16):
        assert PowerSGDCompressor(r).compress(x).nbytes == r * (m + n) * 4
    # Sent dense by powersgd: vectors, and matrices the factors would not shrink.
    assert PowerSGDCompressor(4).compress(torch.randn(1000)).nbytes == 4000
    assert PowerSGDCompressor(4).compress(torch.randn(6, 7)).nbytes == 4 * 42
    assert payload_bytes(torch.zeros(3, dtype=F64)) == 24
    assert payload_bytes([torch.zeros(3), torch.zeros(2, dtype=torch.int8)]) == 14
    # ErrorFeedback counts what it put on the wire.
    ef = ErrorFeedback("int8")
    ef.step("x", x)
    ef.step("x", x)
    assert ef.bytes_sent == 2 * size["int8"]


# ------------------------------------------------------------------------------------- powersgd


def test_powersgd_exact_on_rank_r_after_one_power_iteration():
    """One call (one power iteration) reconstructs a rank-r matrix exactly: P = M Q spans col(M)
    whenever M Q has rank r, which holds for the seeded Q and for each warm start after it. So
    exactness needs a single iteration, on the first call and on every later one."""
    gen = torch.Generator().manual_seed(6)
    m, n, r = 40, 30, 3
    c = PowerSGDCompressor(rank=r, seed=0)
    for call in range(6):  # call 0 from the seeded Q, then warm starts
        mat = low_rank(m, n, r, gen)
        approx = decompress(c.compress(mat))
        assert (approx - mat).norm() <= 1e-10 * mat.norm(), call
    # A rank-3 matrix with a rank-2 compressor is not exact (the check above is not vacuous).
    mat = low_rank(m, n, r, gen)
    assert (decompress(PowerSGDCompressor(rank=2).compress(mat)) - mat).norm() > 1e-3 * mat.norm()
    # With error feedback the residual stays at rounding level; higher-d tensors use [shape[0], -1].
    ef = ErrorFeedback("powersgd", rank=r)
    for _ in range(3):
        g = low_rank(8, 60, r, gen).reshape(8, 6, 10)
        _, sent = ef.step("conv", g)
        assert ef.residual("conv").norm() <= 1e-10 * g.norm()
    p = orthogonalise(
        torch.randn(50, 4, generator=gen, dtype=F64)
        @ torch.diag(torch.tensor([1, 1e-8, 1e8, 0.0], dtype=F64))
    )
    torch.testing.assert_close(p.T @ p, torch.eye(4, dtype=F64), rtol=0, atol=1e-12)  # rank-deficient P


def test_powersgd_warm_start_converges_to_best_rank_r():
    """Calls on one full-rank matrix are a subspace iteration: the error decreases to the
    Eckart-Young optimum sqrt(sum of the squared singular values beyond r)."""
    gen = torch.Generator().manual_seed(7)
    m, n, r = 30, 20, 2
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    s = 0.5 ** torch.arange(n, dtype=F64)  # gap sigma_3 / sigma_2 = 0.5
    mat = u @ torch.diag(s) @ v.T
    best = s[r:].norm().item()
    c = PowerSGDCompressor(rank=r)
    errors = [(decompress(c.compress(mat)) - mat).norm().item() for _ in range(40)]
    assert errors[0] > 1.01 * best
    assert abs(errors[-1] - best) <= 1e-9 * best
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:]))


def test_powersgd_two_phase_all_reduce_between_replicas():
    """4 replicas, each with its own M_i: every replica gets the same P, Q and aggregate, the aggregate
    is the sum of the local approximations, it equals PowerSGD of sum(M_i) from the same Q, and it
    is exact when sum(M_i) has rank r. Threads and a lockstep (phase by phase) run agree."""
    world, m, n, r = 4, 24, 18, 3
    gen = torch.Generator().manual_seed(8)
    right = torch.randn(r, n, generator=gen, dtype=F64)
    mats = [torch.randn(m, r, generator=gen, dtype=F64) @ right for _ in range(world)]  # sum has rank r
    q0 = torch.randn(n, r, generator=gen, dtype=F64)

    group = FakeGroup(world)
    steps = group.run(lambda i: powersgd_step(mats[i], q0, group.all_reduce_fn(i)))
    for s in steps[1:]:
        assert torch.equal(s.p, steps[0].p) and torch.equal(s.q, steps[0].q)
    total = sum(mats)
    agg = steps[0].aggregate()
    torch.testing.assert_close(agg, sum(s.local() for s in steps), rtol=0, atol=1e-12)
    central = powersgd_step(total, q0)
    torch.testing.assert_close(agg, central.aggregate(), rtol=0, atol=1e-12)
    assert (agg - total).norm() <= 1e-10 * total.norm()

    # Lockstep: all P's summed, orthogonalised, then all Q's summed (no threads).
    p = orthogonalise(sum(mi @ q0 for mi in mats))
    q = sum(mi.T @ p for mi in mats)
    torch.testing.assert_close(p, steps[0].p, rtol=0, atol=1e-12)
    torch.testing.assert_close(q, steps[0].q, rtol=0, atol=1e-12)

    # Not rank r: still equal to central PowerSGD of the sum, per-replica residuals exact.
    mats = [torch.randn(m, n, generator=gen, dtype=F64) for _ in range(world)]
    steps = group.run(lambda i: powersgd_step(mats[i], q0, group.all_reduce_fn(i)))
    torch.testing.assert_close(
        steps[0].aggregate(), powersgd_step(sum(mats), q0).aggregate(), rtol=0, atol=1e-12
    )


# ------------------------------------------------------------------------------------ exchange


@pytest.mark.parametrize(
    "kind, via",
    [(k, "all_reduce") for k in KINDS] + [(k, "all_gather") for k in KINDS if k != "powersgd"],
)
def test_exchange_between_replicas(kind, via):
    """int8 and topk go by all-gather even when an all-reduce is offered; powersgd only by all-reduce."""
    world = 4
    group = FakeGroup(world)
    efs = [ErrorFeedback(kind, **OPTIONS.get(kind, {}), seed=3) for _ in range(world)]
    grads = {
        (i, t, name): torch.randn(
            shape, generator=torch.Generator().manual_seed(100 * i + 10 * t + len(name)), dtype=F64
        )
        for i in range(world)
        for t in range(3)
        for name, shape in SHAPES.items()
    }

    def replica(i):
        out = []
        for t in range(3):
            for name in SHAPES:
                g = grads[(i, t, name)]
                old = efs[i].residual(name)
                old = torch.zeros_like(g) if old is None else old.clone()
                kw = {"all_reduce_fn": group.all_reduce_fn(i)} if via == "all_reduce" else {}
                kw["all_gather_fn"] = group.all_gather_fn(i)
                total = efs[i].exchange(name, g, **kw)
                new = efs[i].residual(name)
                sent = g + old - (torch.zeros_like(g) if new is None else new)
                out.append((total, sent))
        return out

    results = group.run(replica)
    wire_sum = via == "all_reduce" and kind in ("fp16", "bf16")  # the sum is formed in 16 bits
    for j in range(len(results[0])):
        totals = [res[j][0] for res in results]
        for tot in totals[1:]:
            assert torch.equal(tot, totals[0])  # every replica gets the same bits
        expected = sum(res[j][1] for res in results)
        tol = {"fp16": 1e-2, "bf16": 1e-1}.get(kind, 0) if wire_sum else 1e-12
        torch.testing.assert_close(totals[0], expected, rtol=0, atol=tol)
    if kind == "powersgd":  # the [16, 24] stream: r (m + n) x 8 bytes (float64) per call
        b = efs[0]
        assert b.bytes_sent == 3 * (2 * (16 + 24) * 8 + 37 * 8 + 2 * (6 + 35) * 8)


def test_exchange_needs_the_right_collective():
    g = torch.randn(4, 4)
    with pytest.raises(ValueError, match="needs all_gather_fn"):
        ErrorFeedback("int8").exchange("x", g, all_reduce_fn=lambda t: t)
    with pytest.raises(ValueError, match="pass all_reduce_fn"):
        ErrorFeedback("powersgd", rank=1).exchange("x", g, all_gather_fn=lambda t: [t])


# ---------------------------------------------------------------------------- SGD convergence


def _least_squares(world=4, rows=64, dim=20, out=8, seed=9):
    """Multi-output least squares, loss(W) = mean over all rows of |a W - b|^2 / 2, W [dim, out],
    split over `world` replicas whose shards have different optima (so each replica's gradient
    stays far from zero at the common optimum)."""
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for i in range(world):
        a = torch.randn(rows, dim, generator=gen, dtype=F64) * (1 + i)
        w_i = torch.randn(dim, out, generator=gen, dtype=F64)
        shards.append((a, a @ w_i + 0.3 * torch.randn(rows, out, generator=gen, dtype=F64)))
    a_all = torch.cat([a for a, _ in shards])
    b_all = torch.cat([b for _, b in shards])
    lipschitz = torch.linalg.eigvalsh(a_all.T @ a_all).max().item() / len(a_all)
    w_opt = torch.linalg.lstsq(a_all, b_all).solution

    def loss(w):
        return 0.5 * ((a_all @ w - b_all) ** 2).sum(1).mean().item()

    def grad(i, w):  # the mean over replicas of these is the full gradient
        a, b = shards[i]
        return a.T @ (a @ w - b) / len(a_all) * world

    return grad, loss, 0.5 / lipschitz, loss(w_opt), w_opt.shape


def _train(kind, steps, feedback=True, **opts):
    """SGD where replicas average their gradients through ErrorFeedback.exchange (threads)."""
    world = 4
    grad, loss, lr, best, shape = _least_squares(world)
    group = FakeGroup(world)

    def replica(i):
        ef = ErrorFeedback(kind, **opts, seed=1)
        w = torch.zeros(shape, dtype=F64)
        for _ in range(steps):
            if not feedback:
                ef.residuals.clear()
            total = ef.exchange(
                "w", grad(i, w), all_reduce_fn=group.all_reduce_fn(i), all_gather_fn=group.all_gather_fn(i)
            )
            w = w - lr * total / world
        return w

    ws = group.run(replica)
    for w in ws[1:]:
        assert torch.equal(w, ws[0])  # replicas stay identical
    return loss(ws[0]), best


def test_int8_error_feedback_sgd_matches_uncompressed_averaging():
    ref, best = _train("none", 300)
    assert ref <= best * (1 + 1e-9)  # the reference converged to the least-squares optimum
    int8, _ = _train("int8", 300)
    int8_plain, _ = _train("int8", 300, feedback=False)
    assert abs(int8 - ref) <= 1e-5 * ref, (int8, ref)
    # Each replica's gradient stays large at the optimum (shards disagree), so int8 noise does not
    # vanish there: without error feedback the loss stays several times further from the optimum.
    assert int8_plain - ref > 3 * (int8 - ref), (int8_plain, int8, ref)
    # Rank-2 PowerSGD of the [20, 8] gradients (P and Q all-reduced) with error feedback too.
    psgd, _ = _train("powersgd", 300, rank=2)
    assert abs(psgd - ref) <= 1e-6 * ref, (psgd, ref)


# ------------------------------------------------------------------------ torch.distributed


def test_torch_collective_wrappers_on_a_one_process_gloo_group():
    import torch.distributed as dist

    from agents.sync.compress import torch_all_gather, torch_all_reduce

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        g = torch.randn(12, 10, generator=torch.Generator().manual_seed(11))
        for kind in ("int8", "powersgd", "fp16"):
            ef = ErrorFeedback(kind, **OPTIONS.get(kind, {}))
            total = ef.exchange("g", g, all_reduce_fn=torch_all_reduce(), all_gather_fn=torch_all_gather())
            # One replica: the sum is what it sent, and sent + residual is the gradient.
            torch.testing.assert_close(total + ef.residual("g"), g, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- state


def test_error_feedback_state_resumes_exactly():
    gen = torch.Generator().manual_seed(10)
    grads = [{n: torch.randn(s, generator=gen) for n, s in SHAPES.items()} for _ in range(6)]
    for kind in ("int8", "powersgd"):
        a = ErrorFeedback(kind, **OPTIONS.get(kind, {}))
        for step in grads[:3]:
            for n, g in step.items():
                a.step(n, g)
        b = ErrorFeedback(kind, **OPTIONS.get(kind, {}))
        b.load_state_dict(a.state_dict())
        for step in grads[3:]:
            for n, g in step.items():
                _, sa = a.step(n, g)
                _, sb = b.step(n, g)
                assert torch.equal(sa, sb)
        assert a.bytes_sent == b.bytes_sent
    with pytest.raises(ValueError, match="not int8"):
        ErrorFeedback("int8").load_state_dict(ErrorFeedback("fp16").state_dict())
