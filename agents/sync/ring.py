"""Our own ring all-reduce over torch.distributed point-to-point, and the byte counter every
synchronisation strategy sends through.

    ring_all_reduce(tensor, group=None)   in-place SUM over `group`, the contract of
                                          dist.all_reduce(tensor, group=group)
    isend(tensor, dst, group=None, tag=0) dist.isend that counts the bytes this process sends
    irecv(tensor, src, group=None, tag=0) dist.irecv (counts nothing: bytes are counted once, sent)
    comm_bytes()                          bytes this process has sent through `isend` so far
    SentBytes()                           context manager: `with SentBytes() as sent: ...; sent.bytes`

The algorithm (Patarasuk & Yuan 2009; Baidu's / Horovod's ring): the flat tensor of N elements is
cut into R chunks (chunk c = elements [c*N//R, (c+1)*N//R); with N < R some chunks are empty), then

  reduce-scatter, R-1 steps: at step s, group rank r sends chunk (r-s) mod R to its right neighbour
    and receives chunk (r-s-1) mod R from its left one, adding it into its own copy of that chunk;
    what it received and summed at step s is what it sends at step s+1. Chunk c starts at rank c
    and travels right collecting one contribution per hop, so after R-1 steps rank r holds the
    complete sum of chunk (r+1) mod R, computed once, in one fixed order
    ((x_c + x_{c+1}) + x_{c+2}) + ... + x_{c-1}.
  all-gather, R-1 steps: at step t, rank r sends chunk (r+1-t) mod R and receives chunk (r-t) mod R
    straight into its tensor (a copy, no arithmetic), forwarding it at step t+1.

Rank r sends every chunk but (r+1) in the first phase and every chunk but (r+2) in the second, so
2N - |chunk r+1| - |chunk r+2| elements: 2(R-1)/R * S bytes of an S-byte tensor when N is
divisible by R, never more than that plus one chunk (16-bit floats: below). That is less than 2S
whatever R is, and every link of the ring is busy in every step.

Every chunk is moreover cut into segments of `segment_bytes` (default 4 MiB) and the ring is
pipelined per segment: a segment received and summed is sent on at once, while the later segments
of the same step are still on the wire, and the receive for the next step is posted into the
segment of the receive buffer just consumed. The scratch memory is one chunk-sized receive buffer
(S/R bytes; for 16-bit floats also two fp32 chunks, 4S/R bytes more, below), not a copy of the
tensor (only a non-contiguous input is reduced in a contiguous copy and copied back), and it is
bounded: a tensor whose chunks would need more than `scratch_bytes` (default 64 MiB) is reduced
as consecutive blocks of R bounded chunks, one ring after the other (each block sends its own
2(R-1)/R share, so the bytes are the same up to one chunk per block).

16-bit floats (bf16, fp16) are accumulated in fp32: a partial sum travels the ring as fp32 (the
first hop of each chunk carries the sender's own 16-bit values, exactly), each hop adds its 16-bit
contribution into the fp32 partial, and the owner rounds the complete fp32 sum to 16 bits once; the
all-gather then copies those 16-bit values. The result is the fp32 sum rounded once, identical on
every rank, for the price of fp32 on the wire in reduce-scatter steps 1..R-2: (3R-4)/R * S bytes
instead of 2(R-1)/R * S (the same for R = 2). Summing in 16 bits would round R-1 times.

Why not the textbook listing that passes whole buffers around the ring
----------------------------------------------------------------------
The listing found in many tutorials ("Our Own Ring-Allreduce" in PyTorch's "Writing Distributed
Applications" tutorial and its copies) keeps an accumulator and, R-1 times, sends a whole S-byte
buffer to the right and receives one from the left: at the first step its own input, afterwards the
buffer it just received, so every rank sees every other rank's input once and adds it into the
accumulator. It is slow and, in floating point, wrong:

  * slow: each rank sends (R-1) * S bytes instead of 2(R-1)/R * S, R/2 times more (2x for R = 4,
    4x for R = 8), and the time of each step grows with the whole S rather than S/R.
  * ranks disagree: rank r computes ((x_r + x_{r-1}) + x_{r-2}) + ... + x_{r+1}, its own order.
    Float addition is commutative but not associative, so for R >= 3 the ranks end with different
    bits (for standard-normal fp32 inputs some pair of ranks disagrees in about 46% of the
    elements for R = 3, 69% for R = 4 and 96% for R = 8; tests/test_sync_ring.py checks that they
    do). Replicas meant to hold identical weights then apply different updates and drift apart, and
    a later all-reduce of gradients never pulls the weights back together. In the ring above each
    chunk's sum is computed once, by one rank, and the others copy it.
  * 16-bit inputs are summed in 16 bits, rounded at each of the R-1 additions.
  * it uses the world's ranks (dist.get_rank(), get_world_size()), so it cannot run on a subgroup.

It sums correctly only because it forwards the *received* buffer, which still holds one rank's
unmodified input. The tempting shortening that forwards the accumulated buffer itself (send
`accum`, receive into a temporary, `accum += temporary`) counts contributions more than once: with
a_r = x_r and a_r <- a_r + a_{r-1} repeated R-1 times, rank r ends with sum_j C(R-1, j) x_{r-j},
binomial weights that total 2^(R-1) instead of R (x_r + 2x_{r-1} + x_{r-2} for R = 3), correct only
for R = 2. Adding into that buffer while its isend is still in flight is worse still: gloo sends
from the tensor's memory, so the receiver may get the old bytes, the new ones, or a mixture.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist

__all__ = ["SCRATCH_BYTES", "SEGMENT_BYTES", "SentBytes", "comm_bytes", "irecv", "isend", "ring_all_reduce"]

# Pipelining grain: one message carries at most this many bytes. On the shared 2-core CPU host,
# 1, 4 and 8 MiB did not differ beyond the run-to-run noise (bench/results/ring-cpu.md); 4 MiB
# keeps the number of messages (each a send/receive handshake in gloo) low while a 64 MiB tensor
# over 4 ranks still moves in 4 segments per chunk.
SEGMENT_BYTES = 4 << 20
SCRATCH_BYTES = 64 << 20  # scratch memory per call, at most (module docstring)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_SEGMENTS = 1 << 15  # segments per chunk, so that a message's tag fits in a C int (see _tag)

# ------------------------------------------------------------------------------------ byte counter

_lock = threading.Lock()
_sent = 0


def isend(tensor: torch.Tensor, dst: int, group=None, tag: int = 0):
    """dist.isend(tensor, dst, group, tag) (`dst` a global rank), counting the bytes sent. Every
    point-to-point send of the sync strategies goes through here, so `comm_bytes()` is what this
    process has sent to synchronise."""
    global _sent
    with _lock:
        _sent += tensor.numel() * tensor.element_size()
    return dist.isend(tensor, dst, group=group, tag=tag)


def irecv(tensor: torch.Tensor, src: int, group=None, tag: int = 0):
    """dist.irecv(tensor, src, group, tag) (`src` a global rank). Received bytes are not counted:
    they are the sender's sent bytes."""
    return dist.irecv(tensor, src, group=group, tag=tag)


def comm_bytes() -> int:
    """Cumulative bytes this process has sent through `isend` (all strategies, all groups)."""
    with _lock:
        return _sent


class SentBytes(contextlib.AbstractContextManager):
    """`with SentBytes() as sent: ...` then `sent.bytes` = bytes this process sent inside the block
    (read inside the block, it is the count so far)."""

    def __init__(self):
        self._start = None
        self._end = None

    def __enter__(self):
        self._start, self._end = comm_bytes(), None
        return self

    def __exit__(self, *exc):
        self._end = comm_bytes()
        return False

    @property
    def bytes(self) -> int:
        if self._start is None:
            return 0
        return (comm_bytes() if self._end is None else self._end) - self._start


# ------------------------------------------------------------------------------------ ring


def ring_all_reduce(
    tensor: torch.Tensor, group=None, *, segment_bytes: int = SEGMENT_BYTES, scratch_bytes: int = SCRATCH_BYTES
) -> None:
    """Sum `tensor` over the ranks of `group` (None = the world) in place, like
    `dist.all_reduce(tensor, group=group)`, with a chunked, pipelined ring (module docstring).

    Every rank of the group must call it with a tensor of the same shape and dtype; a process
    outside the group returns at once, as dist.all_reduce does. Integer sums are exact (with the
    dtype's wrap-around) and so equal dist.all_reduce's bit for bit; float sums are computed once
    per element, in one fixed order, so every rank ends with the same bits; 16-bit floats are summed
    in fp32 and rounded once. `segment_bytes` and `scratch_bytes` tune the pipelining grain and the
    scratch memory (module docstring); every rank must pass the same values."""
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:  # not a member of `group`
        return None
    size = dist.get_world_size(group)
    if size == 1 or tensor.numel() == 0:
        return None
    if segment_bytes < 1 or scratch_bytes < 1:
        raise ValueError(f"segment_bytes and scratch_bytes must be positive, got {segment_bytes}, {scratch_bytes}")
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = work.view(-1)
    # Scratch per chunk element: the receive buffer, for 16-bit floats also two fp32 partials.
    per_element = flat.element_size() + (8 if flat.dtype in _LOW_PRECISION else 0)
    block = size * max(1, scratch_bytes // per_element)
    for start in range(0, flat.numel(), block):
        # Blocks one after the other: a rank leaves a block's ring only once all its sends and
        # receives of that block have completed, so the next block can reuse the same tags.
        _Ring(flat[start:start + block], rank, size, group, segment_bytes).run()
    if work is not tensor:
        tensor.copy_(work)
    return None


def _tag(step: int, segment: int) -> int:
    # A distinct tag per message (step 0..2R-3 over both phases, segment < 2**15), so that matching
    # never relies on message order; ProcessGroupGloo takes the tag as a C int (so R < 2**15).
    return (step << 15) | segment


class _Ring:
    """One ring all-reduce of the contiguous 1-D tensor `flat` (a view of the caller's tensor)."""

    def __init__(self, flat: torch.Tensor, rank: int, size: int, group, segment_bytes: int):
        self.flat, self.rank, self.size, self.group = flat, rank, size, group
        n = flat.numel()
        self.bounds = [c * n // size for c in range(size + 1)]
        longest = -(-n // size)  # ceil(n/R): the length of the longest chunk (the last one)
        seg = max(1, segment_bytes // flat.element_size())
        self.seg = max(seg, -(-longest // _MAX_SEGMENTS))
        # Point-to-point takes global ranks: map the group's ring neighbours.
        self.left = dist.get_global_rank(group, (rank - 1) % size)
        self.right = dist.get_global_rank(group, (rank + 1) % size)
        self.longest = longest

    def chunk(self, c: int) -> torch.Tensor:
        c %= self.size
        return self.flat[self.bounds[c]:self.bounds[c + 1]]

    def segments(self, length: int) -> list[tuple[int, int]]:
        # Segment k of any chunk covers [k*seg, (k+1)*seg) of it, so segment k of the next step's
        # chunk (chunk lengths differ by at most one element) lies where segment k of this step's
        # chunk did, or beyond the end of this step's chunk: it can be received there as soon as
        # segment k has been consumed.
        return [(a, min(a + self.seg, length)) for a in range(0, length, self.seg)]

    def send(self, t: torch.Tensor, step: int, k: int):
        return isend(t, self.right, self.group, _tag(step, k))

    def recv(self, t: torch.Tensor, step: int, k: int):
        return irecv(t, self.left, self.group, _tag(step, k))

    def run(self) -> None:
        if self.flat.dtype in _LOW_PRECISION:
            self.reduce_scatter_fp32()
        else:
            self.reduce_scatter()
        self.all_gather()

    # -------------------------------------------------------------------------- reduce-scatter

    def reduce_scatter(self) -> None:
        """Sum in place, in the tensor's dtype: rank r ends with the complete chunk r+1."""
        r, steps = self.rank, self.size - 1
        buf = torch.empty(self.longest, dtype=self.flat.dtype)
        sends = [self.send(self.chunk(r)[a:b], 0, k) for k, (a, b) in enumerate(self.segments(len(self.chunk(r))))]
        recvs = [self.recv(buf[a:b], 0, k) for k, (a, b) in enumerate(self.segments(len(self.chunk(r - 1))))]
        for s in range(steps):
            mine = self.chunk(r - s - 1)  # the chunk arriving at step s; sent on at step s+1
            nxt = self.segments(len(self.chunk(r - s - 2))) if s + 1 < steps else []
            posted = []
            for k, (a, b) in enumerate(self.segments(len(mine))):
                recvs[k].wait()
                mine[a:b].add_(buf[a:b])
                if s + 1 < steps:
                    sends.append(self.send(mine[a:b], s + 1, k))
                    if k < len(nxt):  # buf[a:b] is consumed: the next step's segment k lands there
                        posted.append(self.recv(buf[nxt[k][0]:nxt[k][1]], s + 1, k))
            for k in range(len(posted), len(nxt)):  # a segment the next (longer) chunk has beyond
                posted.append(self.recv(buf[nxt[k][0]:nxt[k][1]], s + 1, k))
            recvs = posted
        # The all-gather receives into the chunks sent above: their sends must have left.
        for w in sends:
            w.wait()

    def reduce_scatter_fp32(self) -> None:
        """The same for 16-bit floats, summing in fp32: the partial sums travel as fp32 (step 0
        sends the rank's own 16-bit chunk, exact), and the owner rounds the complete sum once."""
        r, steps, dtype = self.rank, self.size - 1, self.flat.dtype
        first = torch.empty(self.longest, dtype=dtype)  # step 0 arrives in 16 bits
        # partial[s % 2] holds the fp32 partial sum made at step s and sent at step s+1; step s+2
        # receives into it again once that send of the segment has completed. (R = 2 sends no
        # partial sums: its one step rounds each segment's sum straight away.)
        partial = [torch.empty(self.longest, dtype=torch.float32) for _ in range(2 if steps > 1 else 0)]
        sends = [self.send(self.chunk(r)[a:b], 0, k) for k, (a, b) in enumerate(self.segments(len(self.chunk(r))))]
        recvs = [self.recv(first[a:b], 0, k) for k, (a, b) in enumerate(self.segments(len(self.chunk(r - 1))))]
        # Sends still reading partial[i] segment k, by (i, k): wait them before receiving there.
        reading: dict[tuple[int, int], list] = {}
        for s in range(steps):
            mine = self.chunk(r - s - 1)
            acc = partial[s % 2] if partial else None
            nxt = self.segments(len(self.chunk(r - s - 2))) if s + 1 < steps else []
            posted = []

            def post_next(k, s=s, nxt=nxt, posted=posted):
                i = (s + 1) % 2
                for w in reading.pop((i, k), ()):
                    w.wait()
                a, b = nxt[k]
                posted.append(self.recv(partial[i][a:b], s + 1, k))

            for k, (a, b) in enumerate(self.segments(len(mine))):
                recvs[k].wait()
                if steps == 1:  # R = 2: the sum of two 16-bit values, in fp32, rounded once
                    mine[a:b].copy_(mine[a:b].float().add_(first[a:b]))
                    continue
                if s == 0:
                    acc[a:b].copy_(mine[a:b])  # exact: 16-bit values are fp32 values
                    acc[a:b].add_(first[a:b])  # in fp32 (acc's dtype)
                else:
                    acc[a:b].add_(mine[a:b])  # the fp32 partial received into acc, plus our 16 bits
                if s + 1 < steps:
                    reading.setdefault((s % 2, k), []).append(self.send(acc[a:b], s + 1, k))
                    if k < len(nxt):
                        post_next(k)
                else:
                    mine[a:b].copy_(acc[a:b])  # the complete sum, rounded to 16 bits once
            for k in range(len(posted), len(nxt)):
                post_next(k)
            recvs = posted
        for w in sends + [w for ws in reading.values() for w in ws]:
            w.wait()

    # -------------------------------------------------------------------------- all-gather

    def all_gather(self) -> None:
        """Rank r holds the complete chunk r+1; pass the complete chunks around, copying only."""
        r, steps = self.rank, self.size - 1
        # Every chunk but r+1 arrives once, each into its own place: post all the receives now.
        recvs = [
            [self.recv(self.chunk(r - t)[a:b], steps + t, k) for k, (a, b) in enumerate(self.segments(len(self.chunk(r - t))))]
            for t in range(steps)
        ]
        own = self.chunk(r + 1)
        sends = [self.send(own[a:b], steps, k) for k, (a, b) in enumerate(self.segments(len(own)))]
        for t in range(steps):
            got = self.chunk(r - t)
            for k, (a, b) in enumerate(self.segments(len(got))):
                recvs[t][k].wait()
                if t + 1 < steps:
                    sends.append(self.send(got[a:b], steps + t + 1, k))
        for w in sends:
            w.wait()
