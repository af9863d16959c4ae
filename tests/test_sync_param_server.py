"""agents.sync.param_server: the parameter server's exactness, versions, bounded staleness, byte
counts, checkpoints and failure behaviour.

In-process: shard bounds, layouts, argument and call-order checks, and the asynchronous admission
rule (`StalenessBound`) in a simulation of thousands of pushes with random arrival orders. Then one
world of 4 gloo processes on CPU is started once (starting processes is most of the cost on a small
host) and runs every distributed case in turn on the ranks a `Layout` names (the others go straight
to the barrier after each case), the failure cases last (they end the world):

  sync     W=3 S=1, W=2 S=2 and W=3 S=1 on ranks in no particular order, 10 rounds each, lr
           schedule, with and without clipping: every worker's weights after every round are
           bit-identical to single-process torch AdamW on the mean gradient (summed in worker
           order; computed in the parent process), clipping by torch's clip_grad_norm_ over the
           shards; one version per round; exact bytes of push / pull / stop and of the servers.
  resume   W=2 S=2: 5 rounds, state_dicts through torch.save, fresh objects, fetch(), 5 more rounds:
           the same bits as 10 rounds in one go.
  async    k=1 (W=2 S=2) and k=2 (W=3 S=1, clipping), 1,000 pushes each with random per-worker
           delays: staleness <= k for every push (server log and the workers' replies), every push
           applied exactly once, version += 1 per push, exact bytes; each server's weights equal a
           sequential replay of its log with torch AdamW (bits); the bound held fast workers back.
           Then a state_dict round trip and a second session (fetch(), 20 pushes per worker): the
           replay of both logs still matches. Control: the same delays with k = 50 give staleness
           > 2, so the bound is what kept it <= k.
  failure  a hung worker makes an asynchronous server raise PeerError after its 2 s timeout; a dead
           server makes its worker raise PeerError at once (the process group timeout is 300 s).
"""

from __future__ import annotations

import datetime
import io
import math
import os
import random
import time

import pytest
import torch
import torch.distributed as dist

from agents.sync import param_server as ps
from agents.sync.param_server import (
    Layout,
    ParameterServer,
    PeerError,
    ProtocolError,
    PSWorker,
    StalenessBound,
)
from agents.sync.ring import SentBytes, comm_bytes
from launch.multiproc import free_port

WORLD = 4
N = 1001  # uneven shards over 2 servers: 500 and 501
HPARAMS = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}
HDR, REPLY = 8 * ps.HEADER_LEN, 8 * ps.REPLY_LEN  # header bytes (float64)


def schedule(version: int) -> float:
    return 1e-2 * (0.5 + 0.5 * math.cos(math.pi * min(version, 400) / 400))


# ------------------------------------------------------------------------------- in-process


def test_shard_bounds_and_layout():
    for n, s in ((1001, 2), (10, 3), (7, 7), (5, 1)):
        b = ps.shard_bounds(n, s)
        assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(s - 1))
        lens = [e - a for a, e in b]
        assert max(lens) - min(lens) <= 1
    lay = Layout.standard(N, workers=3, servers=2)
    assert lay.workers == (0, 1, 2) and lay.servers == (3, 4) and lay.bounds == [(0, 500), (500, 1001)]
    assert lay.role(4) == ("server", 1) and lay.role(1) == ("worker", 1) and lay.role(5) is None
    with pytest.raises(ValueError):
        Layout(10, (0, 1), (1,))
    with pytest.raises(ValueError):
        Layout(1, (0,), (1, 2))


def test_staleness_below_workers_minus_one_is_refused():
    with pytest.raises(ValueError, match="W-1"):
        StalenessBound(workers=3, k=1)
    StalenessBound(workers=3, k=2)
    with pytest.raises(ValueError, match="W-1"):
        ParameterServer(Layout.standard(N, 3, 2), _init(), staleness=1, rank=3)


def test_argument_and_call_order_checks():
    """What is refused before anything is sent (no process group needed: ranks given)."""
    lay = Layout.standard(N, workers=2, servers=2)
    with pytest.raises(ValueError, match="not a worker"):
        PSWorker(lay, _init(), rank=2)
    with pytest.raises(ValueError, match="not a server"):
        ParameterServer(lay, _init(), rank=0)
    with pytest.raises(ValueError, match="contiguous 1-D"):
        PSWorker(lay, _init(N + 1), rank=0)
    with pytest.raises(ValueError, match="neither the full vector"):
        ParameterServer(lay, _init(7), rank=2)
    client = PSWorker(lay, _init(), rank=1)
    assert client.index == 1 and client.version == 0
    with pytest.raises(ProtocolError, match="without a push"):
        client.pull()
    # A server takes the full vector or its own shard; its state round-trips in-process.
    full = ParameterServer(lay, _init(), rank=3, **HPARAMS)
    shard = ParameterServer(lay, _init()[500:].clone(), rank=3, **HPARAMS)
    assert (full.start, full.end) == (500, N) and torch.equal(full.weights, shard.weights)
    state = full.state_dict()
    shard.load_state_dict(state)
    assert shard.version == 0 and shard.next_seq == [0, 0]
    with pytest.raises(ValueError, match="another parameter-server layout"):
        ParameterServer(lay, _init(), rank=2, **HPARAMS).load_state_dict(state)  # shard 0 <- shard 1
    with pytest.raises(ValueError, match="another parameter-server layout"):
        ParameterServer(lay, _init(), rank=3, staleness=1, **HPARAMS).load_state_dict(state)


def _simulate(W: int, k: int, pushes: int, rng: random.Random, speeds: list[float]):
    """The server's asynchronous loop without communication: each worker has its share of `pushes`
    and stops after it; the next message comes from a random worker not waiting for a reply (worker
    w with weight speeds[w]). Returns (staleness per push, applied (w, seq) in order, deferred)."""
    bound = StalenessBound(W, k)
    quota = [pushes // W + (w < pushes % W) for w in range(W)]
    version, seq, waiting, log, deferred = 0, [0] * W, {}, [], 0
    active = set(range(W))
    while active:
        free = sorted(active - set(waiting))
        assert free, f"deadlock at version {version}: every active worker waits ({bound.pulled})"
        w = rng.choices(free, [speeds[x] for x in free])[0]
        if seq[w] == quota[w]:  # done: stop()
            active.discard(w)
            bound.stopped(w)
        else:
            waiting[w] = seq[w]
            seq[w] += 1
        while waiting:
            ready = [x for x in sorted(waiting, key=lambda x: (bound.pulled[x], x)) if bound.admissible(x, version)]
            if not ready:
                break
            x = ready[0]
            log.append((x, waiting.pop(x), version - bound.pulled[x]))
            version += 1
            bound.received(x, version)
        deferred += w in waiting
    return [s for _, _, s in log], [(w, q) for w, q, _ in log], deferred


def test_staleness_rule_simulated():
    """Random arrival orders, skewed speeds: staleness never exceeds k, no deadlock, every push once,
    and the bound is reached (the rule is not stricter than needed); k = W-1 holds fast workers back."""
    rng = random.Random(0)
    for W in (1, 2, 3, 4):
        for k in sorted({max(W - 1, 1), W, W + 2}):
            speeds = [1.0 + 9.0 * (w == 0) for w in range(W)]  # worker 0 ten times faster
            stale, applied, deferred = _simulate(W, k, 3000, rng, speeds)
            assert max(stale) <= k and len(applied) == 3000 and len(set(applied)) == 3000
            if W > 1:
                assert max(stale) == k, (W, k, max(stale))
                if k == W - 1:
                    assert deferred > 0


# ------------------------------------------------------------------------------- helpers


def _noise(w: int, seq: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100_000 * (w + 1) + seq))


def _grad(weights: torch.Tensor, w: int, seq: int) -> torch.Tensor:
    """A worker's gradient: elementwise in the weights (so a shard's gradient depends on that shard
    only: the asynchronous replay below needs that) plus noise of (worker, seq)."""
    return 0.1 * weights + _noise(w, seq, weights.numel())


def _init(n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(7))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


class Reference:
    """Single-process torch AdamW on the mean gradient (summed in worker order), optionally clipped
    by torch.nn.utils.clip_grad_norm_ over the servers' shards as its parameter list."""

    def __init__(self, layout: Layout, max_grad_norm: float | None):
        self.p = torch.nn.Parameter(_init(layout.numel))
        self.opt = torch.optim.AdamW([self.p], **HPARAMS)
        self.layout, self.max_grad_norm, self.t = layout, max_grad_norm, 0

    def step(self) -> torch.Tensor:
        x = self.p.detach()
        grads = [_grad(x, w, self.t) for w in range(len(self.layout.workers))]
        mean = grads[0].clone()
        for g in grads[1:]:
            mean += g
        mean /= len(grads)
        if self.max_grad_norm is not None:
            shards = [torch.nn.Parameter(torch.zeros(b - a)) for a, b in self.layout.bounds]
            for s, (a, b) in zip(shards, self.layout.bounds):
                s.grad = mean[a:b].clone()
            full_norm = torch.linalg.vector_norm(mean)
            total = torch.nn.utils.clip_grad_norm_(shards, self.max_grad_norm)
            assert abs(float(total) - float(full_norm)) <= 1e-6 * float(full_norm)
            assert float(total) > self.max_grad_norm  # the clipping binds
            mean = torch.cat([s.grad for s in shards])
        self.opt.param_groups[0]["lr"] = schedule(self.t)
        self.p.grad = mean
        self.opt.step()
        self.t += 1
        return self.p.detach().clone()


def _server(layout, rank, **kw) -> ParameterServer:
    return ParameterServer(layout, _init(layout.numel), rank=rank, lr_schedule=schedule, **HPARAMS, **kw)


# ------------------------------------------------------------------------------- synchronous


def _sync_case(rank: int, layout: Layout, max_grad_norm: float | None, expected: list[torch.Tensor]):
    """`expected`: the weights after each round, from `Reference` (computed once, in the parent)."""
    rounds = len(expected)
    role = layout.role(rank)
    W, S = len(layout.workers), len(layout.servers)
    if role is None:
        return
    if role[0] == "server":
        server = _server(layout, rank, max_grad_norm=max_grad_norm)
        versions = []
        start = comm_bytes()
        assert server.serve(on_update=lambda s: versions.append(s.version)) == rounds
        a, b = layout.bounds[role[1]]
        clip = 4 * (S - 1) * rounds if max_grad_norm is not None else 0
        assert comm_bytes() - start == rounds * W * (REPLY + 4 * (b - a)) + clip
        assert versions == list(range(1, rounds + 1))  # once per round
        assert [(e.worker, e.seq, e.version, e.staleness) for e in server.log] == \
            [(w, t, t, 0) for t in range(rounds) for w in range(W)]
        return
    w = role[1]
    weights = _init()
    client = PSWorker(layout, weights, rank=rank)
    for t in range(rounds):
        g = _grad(weights, w, t)
        with SentBytes() as pushed:
            client.push(g)
        with SentBytes() as pulled:
            out = client.pull()
        assert pushed.bytes == S * HDR + 4 * N and pulled.bytes == 0
        assert out is weights and client.versions == [t + 1] * S and client.version == t + 1
        assert _bits_equal(weights, expected[t]), (layout, max_grad_norm, t, (weights - expected[t]).abs().max())
    with SentBytes() as stopped:
        client.stop()
    assert stopped.bytes == S * HDR
    with pytest.raises(ProtocolError):
        client.push(g)


def _resume_case(rank: int, layout: Layout, expected: list[torch.Tensor]):
    """5 rounds, checkpoint, fresh objects, 5 rounds == 10 rounds (bits)."""
    role = layout.role(rank)
    if role is None:
        return
    if role[0] == "server":
        server = _server(layout, rank)
        server.serve()
        buf = io.BytesIO()
        torch.save(server.state_dict(), buf)
        buf.seek(0)
        fresh = ParameterServer(layout, torch.zeros(N), rank=rank, lr_schedule=schedule, **HPARAMS)
        fresh.load_state_dict(torch.load(buf, weights_only=False))
        assert fresh.version == 5 and _bits_equal(fresh.weights, server.weights)
        start = comm_bytes()
        assert fresh.serve() == 10
        a, b = layout.bounds[role[1]]
        assert comm_bytes() - start == len(layout.workers) * (6 * (REPLY + 4 * (b - a)))  # 1 fetch + 5 rounds
        return
    w = role[1]
    weights = _init()
    client = PSWorker(layout, weights, rank=rank)
    for t in range(5):
        client.step(_grad(weights, w, t))
    client.stop()
    state = client.state_dict()
    saved = weights.clone()
    # A new session: a fresh client whose weights are garbage until fetch() brings the servers' ones.
    weights = torch.full((N,), float("nan"))
    client = PSWorker(layout, weights, rank=rank)
    client.load_state_dict(state)
    with SentBytes() as sent:
        client.fetch()
    assert sent.bytes == len(layout.servers) * HDR
    assert client.version == 5 and _bits_equal(weights, saved) and _bits_equal(weights, expected[4])
    for t in range(5, 10):
        client.step(_grad(weights, w, t))
        assert _bits_equal(weights, expected[t]) and client.version == t + 1
    client.stop()


# ------------------------------------------------------------------------------- asynchronous

DELAYS = [0.0003, 0.0015, 0.004]  # per worker: the upper end of its random delay per push (s)


def _replay(layout: Layout, s: int, log: list, max_grad_norm: float | None) -> torch.Tensor:
    """Server s's shard from a sequential replay of its log with torch AdamW: entry i is worker w's
    push seq, computed on version `computed_on` of the shard (the gradient is elementwise in the
    weights: the shard at that version determines the shard of the gradient)."""
    a, b = layout.bounds[s]
    p = torch.nn.Parameter(_init(layout.numel)[a:b].clone())
    opt = torch.optim.AdamW([p], **HPARAMS)
    history = [p.detach().clone()]
    for i, e in enumerate(log):
        assert e.version == i
        g = 0.1 * history[e.computed_on] + _noise(e.worker, e.seq)[a:b]
        if max_grad_norm is not None:  # one shard (S=1): the push's global norm is this shard's
            torch.nn.utils.clip_grad_norm_([_as_param(g)], max_grad_norm)
        opt.param_groups[0]["lr"] = schedule(i)
        p.grad = g
        opt.step()
        history.append(p.detach().clone())
    return history[-1]


def _as_param(g: torch.Tensor) -> torch.nn.Parameter:
    q = torch.nn.Parameter(torch.zeros_like(g))
    q.grad = g  # clip_grad_norm_ scales q.grad in place, i.e. g
    return q


def _async_case(rank: int, layout: Layout, k: int, pushes: int, max_grad_norm: float | None = None,
                expect_bound: bool = True, seed: int = 0) -> int | None:
    """`pushes` pushes in all, split over the workers, then a second session after a world barrier
    (an asynchronous server refuses messages from a worker after its stop() in the same session);
    returns the server's largest staleness of the first session."""
    role = layout.role(rank)
    W, S = len(layout.workers), len(layout.servers)
    if role is None:
        dist.barrier()
        return None
    if role[0] == "server":
        s = role[1]
        server = _server(layout, rank, staleness=k, max_grad_norm=max_grad_norm)
        versions = []
        start = comm_bytes()
        assert server.serve(on_update=lambda srv: versions.append(srv.version)) == pushes
        a, b = layout.bounds[s]
        assert comm_bytes() - start == pushes * (REPLY + 4 * (b - a))
        log = list(server.log)
        assert versions == list(range(1, pushes + 1))  # once per push
        assert [e.version for e in log] == list(range(pushes))
        share = [pushes // W + (w < pushes % W) for w in range(W)]
        assert sorted((e.worker, e.seq) for e in log) == [(w, q) for w in range(W) for q in range(share[w])]
        worst = max(e.staleness for e in log)
        assert sum(server.staleness_counts.values()) == pushes and max(server.staleness_counts) == worst
        if expect_bound:
            assert worst <= k and server.deferred > 0, (worst, server.deferred)
        assert _bits_equal(server.weights, _replay(layout, s, log, max_grad_norm))
        # Checkpoint round trip, then a second session: every worker fetches, pushes 20 more.
        state = server.state_dict()
        dist.barrier()
        assert state["pending"] == {} and state["version"] == pushes and state["next_seq"] == share
        fresh = ParameterServer(layout, torch.zeros(N), rank=rank, staleness=k, lr_schedule=schedule,
                                max_grad_norm=max_grad_norm, **HPARAMS)
        fresh.load_state_dict(state)
        assert fresh.serve() == pushes + 20 * W
        assert all(e.staleness <= k for e in fresh.log) and [e.version for e in fresh.log] == \
            list(range(pushes, pushes + 20 * W))
        # The second session continues the first: replay both logs back to back.
        assert _bits_equal(fresh.weights, _replay(layout, s, log + list(fresh.log), max_grad_norm))
        return worst
    w = role[1]
    rng = random.Random(1000 * seed + w)
    weights = _init()
    client = PSWorker(layout, weights, rank=rank)
    mine = pushes // W + (w < pushes % W)
    for q in range(mine):
        time.sleep(rng.uniform(0, DELAYS[w]))
        before = list(client.versions)
        with SentBytes() as sent:
            client.push(_grad(weights, w, q))
        assert sent.bytes == S * HDR + 4 * N
        client.pull()
        assert all(v > u for v, u in zip(client.versions, before))  # our own update is in
        if expect_bound:
            assert client.last_staleness <= k
    client.stop()
    state = client.state_dict()
    dist.barrier()
    client = PSWorker(layout, weights, rank=rank)
    client.load_state_dict(state)
    assert client.pushes == mine
    client.fetch()  # rejoining: the others may have gone on after our stop()
    for q in range(mine, mine + 20):
        client.step(_grad(weights, w, q))
        assert client.last_staleness <= k
    client.stop()
    return None


# ------------------------------------------------------------------------------- failures


def _failure_case(rank: int):
    """Ends the world. Rank 3 serves (asynchronously, 2 s timeout) worker 0, which hangs after one
    step; rank 2 serves rank 1 and dies in its second round. (Servers on ranks that were servers
    before: their first AdamW step, which imports torch._dynamo, is behind them.)"""
    lay_a = Layout(N, (0,), (3,))
    lay_b = Layout(N, (1,), (2,))
    if rank == 3:
        server = _server(lay_a, 3, staleness=1, timeout=datetime.timedelta(seconds=2))
        t = time.monotonic()
        with pytest.raises(PeerError, match="parameter server 0 .rank 3."):
            server.serve()
        assert server.version == 1 and time.monotonic() - t < 30
    elif rank == 0:
        weights = _init()
        PSWorker(lay_a, weights, rank=0).step(_grad(weights, 0, 0))
        time.sleep(3)  # hung: no stop() (the server gives up after its 2 s timeout)
    elif rank == 2:
        server = _server(lay_b, 2)

        def die(s):
            if s.version == 2:
                os._exit(0)  # a crash: no stop, no reply flushed, sockets closed by the OS

        server.serve(on_update=die)
    elif rank == 1:
        weights = _init()
        client = PSWorker(lay_b, weights, rank=1)
        client.step(_grad(weights, 0, 0))
        t = time.monotonic()
        with pytest.raises(PeerError, match="worker 0 .rank 1."):
            for q in range(1, 10):
                client.step(_grad(weights, 0, q))
        assert time.monotonic() - t < 20  # the PG timeout is 300 s: noticed by the closed connection


# ------------------------------------------------------------------------------- the world


# The synchronous configurations: (layout, max_grad_norm); 2-3 workers, 1-2 servers, one with its
# ranks in no particular order. Their references are computed once, in the parent process.
SYNC_CASES = [
    (Layout.standard(N, workers=3, servers=1), None),
    (Layout.standard(N, workers=2, servers=2), 0.5),
    (Layout(N, (3, 0, 1), (2,)), 0.5),
]
RESUME = Layout.standard(N, workers=2, servers=2)


def _references() -> dict:
    refs = {}
    for i, (layout, clip) in enumerate(SYNC_CASES):
        ref = Reference(layout, clip)
        refs[i] = [ref.step() for _ in range(10)]
    ref = Reference(RESUME, None)
    refs["resume"] = [ref.step() for _ in range(10)]
    return refs


def _world(rank: int, world: int, refs: dict):
    assert world == WORLD
    for i, (layout, clip) in enumerate(SYNC_CASES):
        _sync_case(rank, layout, clip, refs[i])
        dist.barrier()
    cases = [
        lambda: _resume_case(rank, RESUME, refs["resume"]),
        lambda: _async_case(rank, Layout.standard(N, workers=2, servers=2), k=1, pushes=1000),
        lambda: _async_case(rank, Layout.standard(N, workers=3, servers=1), k=2, pushes=1000, max_grad_norm=0.5),
    ]
    for case in cases:
        case()
        dist.barrier()
    worst = _async_case(rank, Layout.standard(N, workers=3, servers=1), k=50, pushes=300, expect_bound=False,
                        seed=1)
    flag = torch.tensor([worst if worst is not None else -1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    assert flag.item() > 2, f"control: without a tight bound these delays give staleness {flag.item()}"
    dist.barrier()
    _failure_case(rank)


def _entry(rank, world, port, fn, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    fn(rank, world, *args)  # an exception propagates: mp.spawn reports it with its traceback
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no barrier: the failure case has ended the world; skip gloo's teardown too


@pytest.mark.dist
def test_parameter_server():
    import torch.multiprocessing as mp

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_entry, args=(WORLD, free_port(), _world, _references()), nprocs=WORLD, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
