"""agents.sync.ring: the chunked ring all-reduce against gloo's dist.all_reduce, its byte counter,
subgroups, 16-bit accumulation, and the claims its docstring makes about the textbook listing.

One world of 8 gloo processes on CPU is started once (starting processes is most of the cost on a
small host); every case runs on the world (R = 8) and on subgroups of it with R = 5, 4, 3, 2 and 1,
disjoint groups running at the same time, their members interleaved (group ranks != global ranks),
and ranks outside a group calling in as non-members."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from agents.sync import ring
from agents.sync.ring import SentBytes, ring_all_reduce
from launch.multiproc import free_port

BIG = 10**6 + 7  # the size the exactness and byte checks run at, besides 0, 1 and R-1


def test_exported_lazily_from_agents_sync():
    import agents.sync

    assert agents.sync.ring_all_reduce is ring_all_reduce


# ------------------------------------------------------------------------------- helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (so -0.0 != 0.0 and NaN payloads count)."""
    view = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}.get(t.dtype)
    return t.contiguous().view(view) if view is not None else t


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = (_bits(actual) != _bits(expected)).sum().item()
    assert diff == 0, f"{what}: {diff} of {actual.numel()} elements differ"


def chunk_lengths(n: int, size: int) -> list[int]:
    return [(c + 1) * n // size - c * n // size for c in range(size)]


def expected_sent(n: int, size: int, r: int, dtype: torch.dtype) -> int:
    """Bytes group rank r sends for one ring all-reduce of n elements, derived from the algorithm:
    reduce-scatter sends chunks r, r-1, ..., r+2 (every chunk but r+1), all-gather sends chunks
    r+1, r, ..., r+3 (every chunk but r+2). 16-bit floats: reduce-scatter steps 1..R-2 carry fp32."""
    if size == 1:
        return 0
    L = chunk_lengths(n, size)
    e = torch.empty(0, dtype=dtype).element_size()
    if dtype in (torch.bfloat16, torch.float16):
        rs = e * L[r] + 4 * sum(L[(r - s) % size] for s in range(1, size - 1))
    else:
        rs = e * (n - L[(r + 1) % size])
    return rs + e * (n - L[(r + 2) % size])


def expected_sent_blocked(n: int, size: int, r: int, dtype: torch.dtype, scratch_bytes: int) -> int:
    """The same when the tensor is reduced as blocks of R chunks of bounded scratch."""
    e = torch.empty(0, dtype=dtype).element_size()
    block = size * max(1, scratch_bytes // (e + (8 if dtype in (torch.bfloat16, torch.float16) else 0)))
    return sum(expected_sent(min(block, n - start), size, r, dtype) for start in range(0, n, block))


def _gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _inputs(seed: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1000, 1001, (n,), generator=g).to(dtype)  # integer-valued: exact sums


def _check_exact(x: torch.Tensor, group, what: str, segment_bytes: int = ring.SEGMENT_BYTES,
                 scratch_bytes: int | None = None):
    """ring_all_reduce gives dist.all_reduce's bits, and sends exactly the bytes the algorithm says
    (at most 2(R-1)/R * S + one chunk)."""
    ref = x.clone()
    dist.all_reduce(ref, group=group)
    ours = x.clone()
    kw = {} if scratch_bytes is None else {"scratch_bytes": scratch_bytes}
    with SentBytes() as sent:
        assert ring_all_reduce(ours, group, segment_bytes=segment_bytes, **kw) is None
    assert_same_bits(ours, ref, what)
    n, size, r = x.numel(), dist.get_world_size(group), dist.get_rank(group)
    S, e = n * x.element_size(), x.element_size()
    if scratch_bytes is None:
        assert sent.bytes == expected_sent(n, size, r, x.dtype), (what, sent.bytes)
        assert sent.bytes <= 2 * (size - 1) / size * S + e * math.ceil(n / size), what
    else:
        assert sent.bytes == expected_sent_blocked(n, size, r, x.dtype, scratch_bytes), (what, sent.bytes)


# ------------------------------------------------------------------------------- the textbook listing


def _neighbours(group) -> tuple[int, int, int, int]:
    r, size = dist.get_rank(group), dist.get_world_size(group)
    return r, size, dist.get_global_rank(group, (r - 1) % size), dist.get_global_rank(group, (r + 1) % size)


def _tutorial_allreduce(send: torch.Tensor, recv: torch.Tensor, group):
    """PyTorch's "Our Own Ring-Allreduce" tutorial listing (whole buffers passed around), its sends
    routed through the counting wrapper; the world's ranks replaced by the group's."""
    _, size, left, right = _neighbours(group)
    send_buff, recv_buff, accum = send.clone(), send.clone(), send.clone()
    for i in range(size - 1):
        if i % 2 == 0:
            send_req = ring.isend(send_buff, right, group)
            ring.irecv(recv_buff, left, group).wait()
            accum[:] += recv_buff[:]
        else:
            send_req = ring.isend(recv_buff, right, group)
            ring.irecv(send_buff, left, group).wait()
            accum[:] += send_buff[:]
        send_req.wait()
    recv[:] = accum[:]


def _accumulated_allreduce(t: torch.Tensor, group):
    """The shortening that forwards the accumulated buffer itself."""
    _, size, left, right = _neighbours(group)
    tmp = torch.empty_like(t)
    for _ in range(size - 1):
        req = ring.isend(t, right, group)
        ring.irecv(tmp, left, group).wait()
        req.wait()
        t += tmp


def _textbook_claims(group, seed: int):
    """What ring.py's docstring says of the textbook listing."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    # Sums correctly on integers, but sends (R-1) * S bytes.
    x = _inputs(seed, 10_000, torch.float32)
    ref = x.clone()
    dist.all_reduce(ref, group=group)
    out = torch.empty_like(x)
    with SentBytes() as sent:
        _tutorial_allreduce(x, out, group)
    assert_same_bits(out, ref, "tutorial listing, integer-valued")
    assert sent.bytes == (size - 1) * x.numel() * 4

    # Random fp32: each rank sums in its own order, so for R >= 3 the ranks disagree in some bits.
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(seed + 1))
    _tutorial_allreduce(x, out, group)
    others = _gather(out, group)
    disagree = sum(int((_bits(o) != _bits(others[0])).sum()) for o in others[1:])
    if size >= 3:
        assert disagree > 0, "the tutorial listing was expected to leave ranks with different bits"
    else:
        assert disagree == 0  # x0 + x1 == x1 + x0: float addition is commutative
    ours = x.clone()
    ring_all_reduce(ours, group)
    for o in _gather(ours, group):
        assert_same_bits(o, ours, "ring: every rank the same bits")

    # Forwarding the accumulated buffer: rank r gets sum_j C(R-1, j) x_{r-j} (right only for R <= 2).
    x = _inputs(seed + 2, 1000, torch.int64)
    inputs = _gather(x, group)
    acc = x.clone()
    _accumulated_allreduce(acc, group)
    binomial = sum(math.comb(size - 1, j) * inputs[(rank - j) % size] for j in range(size))
    assert torch.equal(acc, binomial)
    assert torch.equal(acc, sum(inputs)) == (size <= 2)


# ------------------------------------------------------------------------------- the cases


def _group_cases(group, seed: int):
    """Every check on one group (the world or a subgroup); `seed` differs per global rank."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    tag = f"R={size}"

    # Bit-identical to dist.all_reduce on integer-valued fp32 and on int64; bytes sent.
    for dtype in (torch.float32, torch.int64):
        for n in (0, 1, size - 1, BIG):
            _check_exact(_inputs(seed + n, n, dtype), group, f"{tag} {dtype} n={n}")
        # Tiny segments: many messages per step, chunk lengths differing by one, segment counts too.
        _check_exact(_inputs(seed, 1003, dtype), group, f"{tag} {dtype} segmented", segment_bytes=24)
        # Bounded scratch: blocks of R chunks of 100 elements, one ring after the other.
        _check_exact(_inputs(seed, 10_007, dtype), group, f"{tag} {dtype} blocks", segment_bytes=200,
                     scratch_bytes=100 * dtype.itemsize)

    # A 2-D, non-contiguous tensor is reduced in place like any other.
    base = _inputs(seed + 5, 37 * 29, torch.float32).reshape(37, 29)
    x, ref = base.t(), base.t().clone()
    dist.all_reduce(ref, group=group)
    ring_all_reduce(x, group)
    assert not x.is_contiguous() and x.data_ptr() == base.data_ptr()
    assert_same_bits(x.contiguous(), ref, f"{tag} non-contiguous")

    # Random fp32: within 1e-6 of gloo relative to sum |x_i| (what bounds any summation order's
    # error), elementwise relative for positive inputs, and the same bits on every rank.
    g = torch.Generator().manual_seed(seed + 6)
    for x in (torch.randn(100_003, generator=g), torch.rand(100_003, generator=g)):
        ref, ours, mag = x.clone(), x.clone(), x.abs()
        dist.all_reduce(ref, group=group)
        dist.all_reduce(mag, group=group)
        ring_all_reduce(ours, group)
        assert ((ours - ref).abs() <= 1e-6 * mag).all(), tag
        if (x > 0).all():
            assert ((ours - ref).abs() <= 1e-6 * ref.abs()).all(), tag
        for o in _gather(ours, group):
            assert_same_bits(o, ours, f"{tag} random fp32: same bits on every rank")

    # 16-bit floats: the fp32 sum rounded once. Magnitudes in [2^-6, 4) keep the fp32 sum of up to 8
    # values exact (at most 21 significant bits), so it is the float64 sum, rounded once.
    for dtype in (torch.bfloat16, torch.float16):
        for n, seg, scratch in ((100_003, ring.SEGMENT_BYTES, ring.SCRATCH_BYTES), (1003, 16, ring.SCRATCH_BYTES),
                                (10_007, 100, 1000)):
            g = torch.Generator().manual_seed(seed + 7)
            mag = torch.exp2(torch.empty(n).uniform_(-6, 2, generator=g))
            sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
            x = (mag * sign).to(dtype)
            inputs = _gather(x, group)
            expected = sum(i.double() for i in inputs).to(dtype)
            ours = x.clone()
            with SentBytes() as sent:
                ring_all_reduce(ours, group, segment_bytes=seg, scratch_bytes=scratch)
            assert_same_bits(ours, expected, f"{tag} {dtype} n={n}: fp32 sum rounded once")
            assert sent.bytes == expected_sent_blocked(n, size, rank, dtype, scratch), (tag, dtype, n, sent.bytes)
            for o in _gather(ours, group):
                assert_same_bits(o, ours, f"{tag} {dtype}: same bits on every rank")
            if size >= 3:  # summing in 16 bits (rounding at every addition) would differ somewhere
                in16 = inputs[0].clone()
                for i in inputs[1:]:
                    in16 += i
                assert (_bits(in16) != _bits(expected)).any()

    _textbook_claims(group, seed + 8)


# One world of WORLD processes (spawning is most of the cost on a small host); the other ring
# sizes run as subgroups of it, two or four disjoint groups at once, their members interleaved
# so that group ranks differ from global ranks.
WORLD = 8
PARTITIONS = [
    [[0, 2, 4, 6, 7], [1, 3, 5]],  # R = 5 and R = 3 at once
    [[4, 5, 6, 7], [1, 2, 3]],  # R = 4 and R = 3; rank 0 takes no part in either
    [[0, 4], [1, 5], [2, 6], [3, 7]],  # four groups of R = 2 at once
    [[r] for r in range(WORLD)],  # R = 1: nothing to do
]


def _worker(rank: int, world: int):
    assert world == WORLD
    _group_cases(dist.group.WORLD, seed=1000 * rank)  # group=None is the world: below
    x = _inputs(rank, BIG, torch.float32)
    ref = x.clone()
    dist.all_reduce(ref)
    ring_all_reduce(x)
    assert_same_bits(x, ref, "group=None")

    # Every rank creates every group, in the same order.
    made = [[(members, dist.new_group(members)) for members in part] for part in PARTITIONS]
    for part in made:
        mine = [g for members, g in part if rank in members]
        if mine:
            _group_cases(mine[0], seed=1000 * rank + 17)
        else:  # not a member of any group of this partition: ring_all_reduce returns at once
            for _, g in part:
                x = _inputs(rank, 1000, torch.float32)
                before = x.clone()
                with SentBytes() as sent:
                    assert ring_all_reduce(x, g) is None
                assert sent.bytes == 0 and torch.equal(x, before)
        dist.barrier()


# ------------------------------------------------------------------------------- processes


def _entry(rank, world, port, fn):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fn(rank, world)  # an exception propagates: mp.spawn reports it with its traceback
    dist.barrier()
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads; see tests/test_tensor_parallel.py)


def spawn(fn, world):
    import torch.multiprocessing as mp

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children inherit it: no oversubscription on small hosts
    try:
        mp.spawn(_entry, args=(world, free_port(), fn), nprocs=world, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.mark.dist
def test_ring_all_reduce():
    """Every case on the world of 8 and on subgroups of 5, 4, 3, 2 and 1 of it."""
    spawn(_worker, WORLD)
