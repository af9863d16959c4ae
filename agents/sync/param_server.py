"""A parameter server for replicas: centralised synchronisation over torch.distributed point-to-point.

    layout = Layout.standard(numel, workers=W, servers=S)   ranks 0..W-1 workers, W..W+S-1 servers
    # on a server rank
    server = ParameterServer(layout, init_flat, staleness=0, lr=..., lr_schedule=..., max_grad_norm=...)
    server.serve()                     # the server loop; returns when every worker has sent stop()
    server.state_dict() / server.load_state_dict(state)
    # on a worker rank (a replica holding the full model as one flat vector `weights`)
    client = PSWorker(layout, weights)
    client.push(grad_flat); client.pull()          # or client.step(grad_flat): push then pull
    client.fetch()                                  # the servers' current weights, nothing applied
    client.stop()                                   # end of the session for this worker
    client.state_dict() / client.load_state_dict(state)

Errors: PeerError (a peer died or the timeout expired), ProtocolError (calls or messages out of
order), ValueError (bad settings). `StalenessBound` is the asynchronous admission rule on its own.

Roles
-----
A job's world holds W workers and S servers (`Layout`: any disjoint global ranks; `Layout.standard`
puts workers on 0..W-1 and servers on W..W+S-1; other ranks may exist and take no part). Every
worker holds the full model as one flat vector of N elements. Server s owns the contiguous shard
[s*N//S, (s+1)*N//S) of it (as even as possible by element count) and the optimizer state of that
shard: `torch.optim.AdamW` on the shard tensor, so one step is torch's AdamW math bit for bit
(AdamW is elementwise: a shard steps exactly like the same elements of the full vector), with the
learning rate set before each step to `lr_schedule(version)` (the server's version before the
step; constant `lr` without a schedule). The server works in the parameters' dtype (float32 for
the exactness above; it keeps no float32 master copy of 16-bit weights).

Version
-------
A server's `version` is the number of updates it has applied to its shard (0 for the initial
weights; `load_state_dict` restores it). Every reply to a worker carries the version of the shard
it sends; a worker remembers, per server, the version it last received (`PSWorker.versions`) and
sends it with its next gradient: that is the version the gradient was computed on.

Synchronous mode (staleness=0)
------------------------------
A round: the server receives one message from every active worker, in worker order 0..W-1 (a
gradient computed on the current version, else ProtocolError), averages the gradients in that
fixed order (acc = g_0; acc += g_1; ...; acc /= n: deterministic, the same bits on every run),
clips (below), applies one AdamW step, increments the version once and sends the new shard to every
worker that pushed. Every server does the same on its shard, so the workers' pulled vectors equal
the all-reduce (mean) + AdamW result; with the same summation order, bit for bit (the tests).
A worker that sends stop() instead of a gradient leaves; later rounds average over the workers still
active. A fetch() is answered when the round reaches that worker.

Asynchronous mode with bounded staleness (staleness=k >= 1)
------------------------------------------------------------
The server applies each worker's gradient on its own: one AdamW step per push, version += 1 per
push, and replies to that worker alone with the shard and its new version. Definition: the
*staleness* of an applied push is

    tau = (server version just before the push is applied) - (version the gradient was computed on)

i.e. the number of other workers' updates applied to the shard since the pushing worker last
received it. The server guarantees tau <= k for every push. Rule: with version V, the push of worker
u is applied only if afterwards the gradients the other active workers are computing could still
all be applied within the bound, slowest first: sorting their computed-on versions q_1 <= q_2 <=
..., V + i - q_i <= k for every i >= 1. Otherwise the push waits in the server (its gradient
received and kept), and so does the worker, blocked in pull(): it is too far ahead of the slowest
workers. After every applied update the waiting pushes are reconsidered, slowest first. The state
(every active worker can still be served within k) holds initially and is kept by every applied
push, and the slowest worker's push is always admissible in it, so the rule never deadlocks, and
tau <= k holds for every push, including the slowest one's.

Lower bound: k >= W - 1 is necessary and enforced (ValueError otherwise). W gradients computed on
the same version (the initial weights: every worker's first push) are applied one at a time, at W
distinct versions, so the last of them has tau >= W - 1. Use staleness=0 for tighter coupling.
With k = W - 1 the workers take turns (after the first round, every worker's push is applied once
in every W consecutive updates, in a fixed cyclic order); a larger k lets fast workers run ahead.

Order (`ordered=`): by default the server applies pushes as they arrive (an any-source receive),
so which of two workers computing at once goes first depends on timing, and so do the bits of the
result. With `ordered=True` the server instead waits for the slowest worker not already waiting
(then the lowest index) and hears it first: the same rule as above, applied to a fixed order of
messages, so a run is reproducible bit for bit (and resumes so after a kill). Fast workers then
cannot run ahead of that order: after the first round every worker's push is applied once every W
updates, each W - 1 versions late. A training loop whose workers meet at collectives every step
(the loss mean, the stop signal) advances in lockstep anyway, and loses nothing but randomness.

With S > 1 servers each server runs its own schedule on its shard, so a pulled vector may combine
shards of different versions (`PSWorker.versions`, one per server); the bound holds per shard.

Gradient clipping (max_grad_norm)
---------------------------------
Global-norm clipping, with torch.nn.utils.clip_grad_norm_'s math over the shards as its parameter
list: total = ||(||g_0||, ..., ||g_{S-1}||)||_2, g *= min(1, max_norm / (total + 1e-6)).
Synchronous: of the averaged gradient; the servers exchange their shard norms point-to-point (S-1
scalars each per round) and stack them in server order, so all get the same total. Asynchronous: of
each push's own gradient: the worker computes the total over its shards and sends it in the header
of every shard, so every server scales its shard by the same factor.

Messages
--------
Every send goes through `agents.sync.ring.isend` (bytes counted in `ring.comm_bytes()`). A message
is one tensor of the parameters' dtype: the bits of a small float64 header followed by a shard
(integers in the header are exact below 2**53), so a push or a reply is one gloo message per
server, whatever the header says. Tags keep the streams apart; between two ranks, messages of one
tag arrive in the order sent.
  worker -> server s, tag TAG_PUSH: header (kind, worker index, version, seq, total norm), then
      for kind PUSH the gradient shard; FETCH (reply with the current shard, apply nothing) and
      STOP carry the header only (a gloo receive accepts a message shorter than its buffer).
      seq: the worker's push count; the server checks it is the next one it expects from that
      worker, so a push can neither be lost nor applied twice (also across a checkpoint/resume).
  server -> worker, tag TAG_REPLY: header (version, staleness of the push just applied), then the
      weights shard.
  server -> server, tag TAG_NORM (synchronous clipping): the shard norm, one float32.
Bytes sent: a push, S*40 + N*itemsize; fetch() and stop(), S*40; pull(), 0 (the servers send); a
server's reply, 16 + n_s*itemsize; synchronous clipping, 4*(S-1) per server per round.

The server receives from any worker (an any-source receive) in asynchronous mode and from each
worker in turn in synchronous mode. A reply is a copy of the shard, made when it is sent (the shard
moves on while the message is in flight); in synchronous mode one copy serves every worker of the
round.

Failures: nobody waits forever
------------------------------
Every wait in this module is a gloo wait, bounded by the process group's timeout
(`dist.init_process_group(..., timeout=timedelta(...))`, 30 minutes by default for gloo) or by
`timeout=` given to ParameterServer / PSWorker, which then bounds each of their waits instead. A
failed or timed-out wait raises PeerError naming the rank, the role and what it waited for. A peer
that died (its sockets closed) fails a wait on that peer at once: a worker waiting for a server, a
synchronous server waiting for a given worker. An asynchronous server waits for whichever worker
sends next, and a hung or dead worker is noticed only when the timeout expires. The timeout must
therefore exceed the longest legitimate gap between two messages (a worker's step, its evaluation
and checkpointing) plus the longest wait for the slowest worker (a held-back push, a round). A
process that raises PeerError and exits closes its connections in turn, so whoever waits on it
fails at once: a failure spreads through the job instead of leaving it hanging. After a PeerError
gloo closes the connections concerned: the job is over and restarts from its checkpoints
(`state_dict`).

Sessions
--------
serve() returns once every worker has sent stop(); a worker must not send anything more to it. An
asynchronous server raises ProtocolError if a stopped worker sends again in the same session (a
synchronous one receives only from active workers, so the message waits for the next session). A
new session starts a new serve() (usually in new processes, after load_state_dict) with every
worker active again: each worker carries on from the version it holds, or calls fetch() first if
the others went on after its stop() (a push more than k versions behind raises ProtocolError).

Checkpoints
-----------
`ParameterServer.state_dict()`: the shard's weights, AdamW's state, the version, per worker the
version its computed gradients refer to and the next push seq expected, and pushes received but
not applied yet (asynchronous; none once serve() has returned). `PSWorker.state_dict()`: its
versions (one per server), its push count, and whether it awaits a reply. A consistent checkpoint
of the job is taken where no message is in flight: after serve() has returned on every server and
stop() on every worker, or in synchronous mode at `serve(on_update=...)` with the workers' state
taken after their pull of that version. A new session (fresh objects, load_state_dict, serve /
push) continues bit for bit.
"""

from __future__ import annotations

import copy
import datetime
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .ring import irecv, isend

__all__ = [
    "Applied", "Layout", "ParameterServer", "PeerError", "ProtocolError", "PSWorker", "StalenessBound",
    "shard_bounds",
]

# Tags (gloo takes a C int): far above the ring's tags ((step << 15) | segment), one per stream.
TAG_PUSH = 0x50530001  # worker -> server: header (+ gradient shard)
TAG_REPLY = 0x50530002  # server -> worker: header + weights shard
TAG_NORM = 0x50530003  # server -> server: shard norm (synchronous clipping)

PUSH, FETCH, STOP = 1, 2, 3
HEADER_LEN = 5  # worker -> server (kind, worker, version, seq, norm), float64
REPLY_LEN = 2  # server -> worker (version, staleness), float64


class PeerError(RuntimeError):
    """A wait for a peer failed: the peer died (connection closed) or the timeout expired."""


class ProtocolError(RuntimeError):
    """A message or a call that breaks the protocol (wrong version, seq, order of calls)."""


def shard_bounds(numel: int, servers: int) -> list[tuple[int, int]]:
    """Server s owns [s*numel//servers, (s+1)*numel//servers): contiguous, lengths differ by <= 1."""
    if servers < 1 or numel < 0:
        raise ValueError(f"need servers >= 1 and numel >= 0, got {servers}, {numel}")
    return [(s * numel // servers, (s + 1) * numel // servers) for s in range(servers)]


@dataclass(frozen=True)
class Layout:
    """Who is who: `workers` and `servers` are global ranks (disjoint); worker i / server s are the
    indices into them. `numel`: the length of the flat parameter vector."""

    numel: int
    workers: tuple[int, ...]
    servers: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "workers", tuple(int(r) for r in self.workers))
        object.__setattr__(self, "servers", tuple(int(r) for r in self.servers))
        ranks = self.workers + self.servers
        if not self.workers or not self.servers:
            raise ValueError("a parameter-server job needs at least one worker and one server")
        if len(set(ranks)) != len(ranks) or min(ranks) < 0:
            raise ValueError(f"worker ranks {self.workers} and server ranks {self.servers} must be distinct, >= 0")
        if self.numel < len(self.servers):
            raise ValueError(f"{self.numel} parameters cannot be sharded over {len(self.servers)} servers")

    @classmethod
    def standard(cls, numel: int, workers: int, servers: int) -> Layout:
        """Workers on ranks 0..W-1, servers on W..W+S-1."""
        return cls(numel, tuple(range(workers)), tuple(range(workers, workers + servers)))

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(self.numel, len(self.servers))

    def role(self, rank: int) -> tuple[str, int] | None:
        """("worker", i), ("server", s) or None for a rank that takes no part."""
        if rank in self.workers:
            return "worker", self.workers.index(rank)
        if rank in self.servers:
            return "server", self.servers.index(rank)
        return None


@dataclass(frozen=True)
class Applied:
    """One applied push, as the server log records it (`computed_on` = the version the gradient was
    computed on, `version` = the server's version just before applying it)."""

    worker: int
    seq: int
    computed_on: int
    version: int

    @property
    def staleness(self) -> int:
        return self.version - self.computed_on


class StalenessBound:
    """The admission rule of the asynchronous mode (module docstring), without any communication.

    `pulled[w]`: the version worker w's gradient in flight is computed on (active workers only)."""

    def __init__(self, workers: int, k: int, pulled: dict[int, int] | None = None):
        if k < workers - 1:
            raise ValueError(f"staleness={k} cannot be guaranteed with {workers} workers applying on arrival: "
                             f"the W gradients computed on the initial weights are applied one at a time, the last "
                             f"at least W-1 = {workers - 1} versions late; "
                             f"use staleness >= {workers - 1}, or staleness=0 (synchronous)")
        self.k = k
        self.pulled = dict(pulled) if pulled is not None else dict.fromkeys(range(workers), 0)

    def admissible(self, worker: int, version: int) -> bool:
        """May `worker`'s push (computed on pulled[worker]) be applied at `version`?"""
        if version - self.pulled[worker] > self.k:
            return False  # cannot happen while the invariant holds; refuse rather than break the bound
        others = sorted(v for w, v in self.pulled.items() if w != worker)
        return all(version + i - q <= self.k for i, q in enumerate(others, 1))

    def received(self, worker: int, version: int) -> None:
        """`worker` now holds (and computes on) `version` (a reply to a push or a fetch)."""
        self.pulled[worker] = version

    def stopped(self, worker: int) -> None:
        self.pulled.pop(worker, None)


# ------------------------------------------------------------------------------------ helpers


def _wait(work, timeout: datetime.timedelta | None, what: str) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except RuntimeError as e:
        raise PeerError(f"{what} failed (peer died or timeout expired): {e}") from e


def _global_norm(norms: list[torch.Tensor]) -> torch.Tensor:
    # torch.nn.utils.get_total_norm for p=2 over the shards as its tensor list.
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def _clip_(grad: torch.Tensor, max_norm: float, total: torch.Tensor) -> None:
    # torch.nn.utils.clip_grads_with_norm_: g *= clamp(max_norm / (total + 1e-6), max=1).
    grad.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))


def _header_elems(header_len: int, dtype: torch.dtype) -> int:
    size = torch.empty(0, dtype=dtype).element_size()
    if (8 * header_len) % size:
        raise ValueError(f"parameters of dtype {dtype} cannot carry the float64 header")
    return 8 * header_len // size


class _Message:
    """One tensor of `dtype`: a float64 header of `header_len` values (its bits), then `payload`
    elements. `header` and `payload` are views of `buf`."""

    def __init__(self, header_len: int, payload: int, dtype: torch.dtype):
        h = _header_elems(header_len, dtype)
        self.buf = torch.empty(h + payload, dtype=dtype)
        self.header = self.buf[:h].view(torch.float64)
        self.payload = self.buf[h:]


# ------------------------------------------------------------------------------------ server


class ParameterServer:
    """Server s of `layout` (s from this process's rank, or `rank=`): owns shard s of the flat
    vector and its AdamW. `weights`: the initial full flat vector (numel elements) or the shard.

    `staleness`: 0 synchronous; k >= W-1 asynchronous with staleness <= k (module docstring).
    AdamW hyper-parameters as torch.optim.AdamW's; `lr_schedule(version)` -> lr of the step applied
    at that version (overrides `lr`). `max_grad_norm`: global-norm clipping (module docstring).
    `timeout`: bound on each wait (default: the process group's timeout). `log_limit`: how many of
    the latest applied pushes `log` keeps (`staleness_counts`, `deferred` count them all)."""

    def __init__(self, layout: Layout, weights: torch.Tensor, *, staleness: int = 0, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, lr_schedule: Callable[[int], float] | None = None,
                 max_grad_norm: float | None = None, rank: int | None = None,
                 timeout: datetime.timedelta | None = None, log_limit: int = 1_000_000,
                 decay_mask: torch.Tensor | None = None, ordered: bool = False):
        self.layout = layout
        self.rank = dist.get_rank() if rank is None else rank
        role = layout.role(self.rank)
        if role is None or role[0] != "server":
            raise ValueError(f"rank {self.rank} is not a server of {layout}")
        self.index = role[1]
        self.start, self.end = layout.bounds[self.index]
        n = self.end - self.start
        if weights.dim() != 1 or not weights.is_floating_point():
            raise ValueError("weights must be a 1-D floating-point tensor")
        if weights.numel() == layout.numel:
            weights = weights[self.start:self.end]
        elif weights.numel() != n:
            raise ValueError(f"weights has {weights.numel()} elements: neither the full vector ({layout.numel}) "
                             f"nor shard {self.index} ({n})")
        _header_elems(HEADER_LEN, weights.dtype)
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.W = len(layout.workers)
        self.staleness = staleness
        self._bound = StalenessBound(self.W, staleness) if staleness > 0 else None
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.param = torch.nn.Parameter(weights.detach().clone().contiguous(), requires_grad=False)
        # Weight decay on part of the vector only (`decay_mask`: matrices, not biases or norms, as the
        # training loop's parameter groups): AdamW without decay, and the decoupled decay
        # p *= 1 - lr * wd applied here to the masked elements first, as AdamW applies it (x 1.0
        # elsewhere is exact), so every element steps as it would in its own parameter group.
        self.decay_mask = None
        if decay_mask is not None:
            mask = decay_mask.to(torch.bool).reshape(-1)
            mask = mask[self.start:self.end] if mask.numel() == layout.numel else mask
            if mask.numel() != n:
                raise ValueError(f"decay_mask has {decay_mask.numel()} elements: neither the full vector "
                                 f"({layout.numel}) nor shard {self.index} ({n})")
            self.decay_mask, self.weight_decay, weight_decay = mask, weight_decay, 0.0
        self.optimizer = torch.optim.AdamW([self.param], lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay, amsgrad=amsgrad)
        # Asynchronous mode: `ordered` hears the workers slowest first (then by index) instead of
        # in order of arrival, which makes a run reproducible bit for bit (see the module docstring).
        self.ordered = ordered
        self.lr_schedule, self.max_grad_norm, self.timeout = lr_schedule, max_grad_norm, timeout
        self.version = 0
        self.next_seq = [0] * self.W  # the seq of the next push expected from each worker
        self.sent = [0] * self.W  # the version last sent to each worker (what its next push refers to)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # async: worker -> (header, grad)
        self.log: deque[Applied] = deque(maxlen=log_limit)
        self.staleness_counts: Counter[int] = Counter()
        self.deferred = 0  # async pushes that had to wait for slower workers
        self._sends: dict[int, tuple] = {}  # worker -> (work, message kept alive) of its reply in flight

    @property
    def weights(self) -> torch.Tensor:
        """This server's shard (the live tensor; clone it to keep a copy)."""
        return self.param.detach()

    def _what(self, what: str) -> str:
        return f"parameter server {self.index} (rank {self.rank}): {what}"

    # -------------------------------------------------------------------------------- the loop

    def serve(self, on_update: Callable[[ParameterServer], None] | None = None) -> int:
        """Serve every worker of the layout until each has sent stop(); returns the final version.
        `on_update(self)` runs after every applied update (e.g. to checkpoint `state_dict()`)."""
        if self._bound is None:
            self._serve_sync(on_update)
        else:
            self._serve_async(on_update)
        self._drain_sends()
        return self.version

    def _post_recv(self, worker: int | None):
        """Post the receive of the next message from `worker` (None: from any worker); returns a
        function that waits for it and returns (kind, worker, header, gradient or None)."""
        msg = _Message(HEADER_LEN, self.end - self.start, self.param.dtype)
        src = None if worker is None else self.layout.workers[worker]
        work = irecv(msg.buf, src, tag=TAG_PUSH)

        def finish():
            who = "any worker" if src is None else f"worker {worker} (rank {src})"
            _wait(work, self.timeout, self._what(f"waiting for a message from {who}"))
            hdr = msg.header
            kind, w = int(hdr[0]), int(hdr[1])
            if not 0 <= w < self.W or (worker is not None and w != worker):
                raise ProtocolError(self._what(f"a message from {who} names worker {w}"))
            if src is None and hasattr(work, "_source_rank") and work._source_rank() != self.layout.workers[w]:
                raise ProtocolError(self._what(f"a message of worker {w} came from rank {work._source_rank()}"))
            if kind not in (PUSH, FETCH, STOP):
                raise ProtocolError(self._what(f"unknown message kind {kind} from worker {w}"))
            if kind != PUSH:
                return kind, w, hdr, None
            seq = int(hdr[3])
            if seq != self.next_seq[w]:
                raise ProtocolError(self._what(f"push {seq} of worker {w}, expected push {self.next_seq[w]} "
                                               "(lost or repeated push, or mismatched checkpoints)"))
            self.next_seq[w] = seq + 1
            return kind, w, hdr, msg.payload

        return finish

    def _reply(self, workers: list[int], staleness: int) -> None:
        """Send the current shard and version to `workers` (one copy of the shard for all)."""
        msg = _Message(REPLY_LEN, self.end - self.start, self.param.dtype)
        msg.header[0], msg.header[1] = float(self.version), float(staleness)
        msg.payload.copy_(self.weights)
        for w in workers:
            # The previous reply to w has been received (w has sent a message since): waiting for
            # its send costs nothing and frees its copy. (A gloo send's Work reports completion
            # only once waited on: is_completed() cannot be polled instead.)
            self._drain_sends(w)
            self.sent[w] = self.version
            self._sends[w] = (isend(msg.buf, self.layout.workers[w], tag=TAG_REPLY), msg)

    def _drain_sends(self, worker: int | None = None) -> None:
        """Wait for the reply in flight to `worker` (None: to every worker)."""
        for w in [worker] if worker is not None else list(self._sends):
            if w in self._sends:
                work, _ = self._sends.pop(w)
                _wait(work, self.timeout, self._what(f"send of a reply to worker {w}"))

    def _apply(self, grad: torch.Tensor, total_norm: torch.Tensor | None) -> None:
        if self.lr_schedule is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.lr_schedule(self.version))
        if self.max_grad_norm is not None:
            _clip_(grad, self.max_grad_norm, total_norm)
        if self.decay_mask is not None and self.weight_decay:
            lr = self.optimizer.param_groups[0]["lr"]
            factor = torch.where(self.decay_mask, torch.tensor(1 - lr * self.weight_decay, dtype=self.param.dtype),
                                 torch.tensor(1.0, dtype=self.param.dtype))
            with torch.no_grad():
                self.param.mul_(factor)
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None
        self.version += 1

    def _record(self, worker: int, seq: int, computed_on: int, version: int) -> None:
        a = Applied(worker, seq, computed_on, version)
        self.log.append(a)
        self.staleness_counts[a.staleness] += 1

    # ---- synchronous

    def _serve_sync(self, on_update) -> None:
        active = list(range(self.W))
        while active:
            # The round's first message of every active worker, received in worker order (posted
            # at once; a fetch is answered and that worker's next message awaited).
            posted = {w: self._post_recv(w) for w in active}
            grads: list[tuple[int, torch.Tensor, int]] = []
            for w in list(active):
                while True:
                    kind, _, hdr, grad = posted[w]()
                    if kind != FETCH:
                        break
                    self._reply([w], 0)
                    posted[w] = self._post_recv(w)
                if kind == STOP:
                    active.remove(w)
                    continue
                if int(hdr[2]) != self.version:
                    raise ProtocolError(self._what(f"worker {w} pushed a gradient computed on version "
                                                   f"{int(hdr[2])}, the server is at {self.version}"))
                grads.append((w, grad, int(hdr[3])))
            if not grads:
                continue
            acc = grads[0][1]
            for _, g, _ in grads[1:]:
                acc.add_(g)
            acc.div_(len(grads))
            total = self._sync_norm(acc) if self.max_grad_norm is not None else None
            v = self.version
            self._apply(acc, total)
            for w, _, seq in grads:
                self._record(w, seq, v, v)
            self._reply([w for w, _, _ in grads], 0)
            if on_update is not None:
                on_update(self)

    def _sync_norm(self, acc: torch.Tensor) -> torch.Tensor:
        """The global norm of the averaged gradient: every server's shard norm, in server order."""
        mine = torch.linalg.vector_norm(acc, 2.0).reshape(1)
        norms, sends, recvs = [], [], []
        for s, rank in enumerate(self.layout.servers):
            if s == self.index:
                norms.append(mine)
                continue
            buf = torch.empty_like(mine)
            norms.append(buf)
            sends.append(isend(mine, rank, tag=TAG_NORM))
            recvs.append((irecv(buf, rank, tag=TAG_NORM), s))
        for work, s in recvs:
            _wait(work, self.timeout, self._what(f"shard norm of server {s}"))
        for work in sends:
            _wait(work, self.timeout, self._what("send of the shard norm"))
        return _global_norm([n.reshape(()) for n in norms])

    # ---- asynchronous

    def _serve_async(self, on_update) -> None:
        # Every worker of the layout starts the session active, computing on the version last sent
        # to it (a worker that rejoins far behind the others calls fetch() first).
        bound = self._bound
        bound.pulled = dict(enumerate(self.sent))
        active = set(range(self.W))
        waiting = self.pending  # pushes received, not applied yet (also those of a checkpoint)
        self._apply_admissible(waiting, on_update)
        recv = None
        while active:
            if recv is None and self.ordered:  # the slowest worker not waiting (then the lowest index)
                src = min((w for w in active if w not in waiting), key=lambda w: (bound.pulled[w], w))
                recv = self._post_recv(src)
            kind, w, hdr, grad = (recv or self._post_recv(None))()
            recv = None
            arrived = None
            if w not in active:
                raise ProtocolError(self._what(f"worker {w} sent kind {kind} after its stop(): a new session "
                                               "starts once serve() has returned on every server"))
            if w in waiting:
                raise ProtocolError(self._what(f"worker {w} sent kind {kind} while its push awaits a reply"))
            if kind == PUSH:
                self._check_version(w, int(hdr[2]))
                waiting[w] = (hdr, grad)
                arrived = w
            elif kind == FETCH:
                bound.received(w, self.version)
                self._reply([w], 0)
            else:  # STOP
                active.discard(w)
                bound.stopped(w)
            if active - set(waiting) and not self.ordered:  # somebody can still send: receive while we compute
                recv = self._post_recv(None)
            self._apply_admissible(waiting, on_update)
            if arrived is not None and arrived in waiting:
                self.deferred += 1
            if waiting and set(waiting) >= active:
                # Unreachable from a consistent state (the slowest push is always admissible).
                raise ProtocolError(self._what(f"no waiting push admissible at version {self.version} "
                                               f"(workers at {bound.pulled}, staleness <= {self.staleness})"))

    def _check_version(self, w: int, computed_on: int) -> None:
        if computed_on != self.sent[w]:
            raise ProtocolError(self._what(f"worker {w} pushed a gradient computed on version {computed_on}, the "
                                           f"server last sent it version {self.sent[w]}"))
        if self.version - computed_on > self.staleness:
            raise ProtocolError(self._what(f"worker {w} pushed a gradient computed on version {computed_on}, more "
                                           f"than staleness={self.staleness} behind version {self.version}: a worker "
                                           "that rejoins a session behind the others calls fetch() first"))

    def _apply_admissible(self, waiting: dict, on_update) -> None:
        bound = self._bound
        while waiting:
            # Slowest first (then worker order): the slowest is always admissible.
            ready = [w for w in sorted(waiting, key=lambda w: (bound.pulled[w], w))
                     if bound.admissible(w, self.version)]
            if not ready:
                return
            w = ready[0]
            hdr, grad = waiting.pop(w)
            computed_on, v = bound.pulled[w], self.version
            total = torch.tensor(float(hdr[4]), dtype=grad.dtype) if self.max_grad_norm is not None else None
            self._apply(grad, total)
            self._record(w, int(hdr[3]), computed_on, v)
            bound.received(w, self.version)
            self._reply([w], v - computed_on)
            if on_update is not None:
                on_update(self)

    # -------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "numel": self.layout.numel, "servers": len(self.layout.servers), "workers": self.W,
            "shard": self.index, "bounds": (self.start, self.end), "staleness": self.staleness,
            "version": self.version,
            "weights": self.weights.clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "next_seq": list(self.next_seq),
            "worker_versions": list(self.sent),
            "pending": {w: (h.clone(), g.clone()) for w, (h, g) in self.pending.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        want = {"numel": self.layout.numel, "servers": len(self.layout.servers), "workers": self.W,
                "shard": self.index, "staleness": self.staleness}
        got = {k: state[k] for k in want}
        if got != want:
            raise ValueError(f"checkpoint of another parameter-server layout: {got}, this server is {want}")
        with torch.no_grad():
            self.param.copy_(state["weights"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.version = int(state["version"])
        self.next_seq = [int(s) for s in state["next_seq"]]
        self.sent = [int(v) for v in state["worker_versions"]]
        self.pending = {int(w): (h.clone(), g.clone()) for w, (h, g) in state["pending"].items()}


# ------------------------------------------------------------------------------------ worker


class PSWorker:
    """Worker i of `layout` (i from this process's rank, or `rank=`). `weights`: this replica's flat
    parameter vector (1-D, contiguous, numel elements); pull() and fetch() write the servers'
    shards into it in place. `timeout` bounds each wait (default: the process group's timeout).

    Calls alternate: push(), then pull() (or step() = both), any number of times; fetch() and
    stop() between rounds, never with a push awaiting its pull."""

    def __init__(self, layout: Layout, weights: torch.Tensor, *, rank: int | None = None,
                 timeout: datetime.timedelta | None = None):
        self.layout = layout
        self.rank = dist.get_rank() if rank is None else rank
        role = layout.role(self.rank)
        if role is None or role[0] != "worker":
            raise ValueError(f"rank {self.rank} is not a worker of {layout}")
        self.index = role[1]
        if (weights.dim() != 1 or weights.numel() != layout.numel or not weights.is_contiguous()
                or not weights.is_floating_point()):
            raise ValueError(f"weights must be a contiguous 1-D floating-point tensor of {layout.numel} elements")
        _header_elems(HEADER_LEN, weights.dtype)
        self.weights, self.timeout = weights, timeout
        self.versions = [0] * len(layout.servers)  # per server: the version of the shard we hold
        self.pushes = 0
        self.awaiting = False  # a push awaits its pull
        self.last_staleness = 0  # of the last push, the largest over the servers
        self.stopped = False

    @property
    def version(self) -> int:
        """The version of the weights held: the same for every server in synchronous mode (the
        oldest shard's in asynchronous mode with several servers)."""
        return min(self.versions)

    def _what(self, what: str) -> str:
        return f"parameter-server worker {self.index} (rank {self.rank}): {what}"

    def _check(self, call: str) -> None:
        if self.stopped:
            raise ProtocolError(self._what(f"{call}() after stop()"))
        if self.awaiting:
            raise ProtocolError(self._what(f"{call}() while a push awaits its pull()"))

    def _send(self, kind: int, grad: torch.Tensor | None = None, total_norm: float = 0.0) -> None:
        sends = []
        for s, (rank, (a, b)) in enumerate(zip(self.layout.servers, self.layout.bounds)):
            msg = _Message(HEADER_LEN, b - a if grad is not None else 0, self.weights.dtype)
            msg.header.copy_(torch.tensor([kind, self.index, self.versions[s], self.pushes, total_norm],
                                          dtype=torch.float64))
            if grad is not None:
                msg.payload.copy_(grad[a:b])
            sends.append((isend(msg.buf, rank, tag=TAG_PUSH), msg, s))
        for work, _, s in sends:
            _wait(work, self.timeout, self._what(f"send to server {s}"))

    def push(self, grad: torch.Tensor) -> None:
        """Send every server its shard of `grad` (the gradient computed on the weights held, flat like
        them), with this worker's version and push count. Returns once sent."""
        self._check("push")
        if grad.shape != self.weights.shape or grad.dtype != self.weights.dtype:
            raise ValueError(f"grad must be {tuple(self.weights.shape)} {self.weights.dtype}, got "
                             f"{tuple(grad.shape)} {grad.dtype}")
        grad = grad.detach()
        total = _global_norm([torch.linalg.vector_norm(grad[a:b], 2.0) for a, b in self.layout.bounds])
        self._send(PUSH, grad, float(total))
        self.pushes += 1
        self.awaiting = True

    def pull(self) -> torch.Tensor:
        """Receive every server's updated shard into `weights` (after push(); blocks while the server
        holds the push back: synchronous until the round completes, asynchronous while this worker
        is too far ahead). Returns `weights`."""
        if not self.awaiting:
            raise ProtocolError(self._what("pull() without a push()"))
        self._receive()
        self.awaiting = False
        return self.weights

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """push(grad) then pull()."""
        self.push(grad)
        return self.pull()

    def fetch(self) -> torch.Tensor:
        """The servers' current shards into `weights` (nothing applied): e.g. a resumed worker."""
        self._check("fetch")
        self._send(FETCH)
        self._receive()
        return self.weights

    def stop(self) -> None:
        """Tell every server this worker is done (its serve() returns once all workers stopped)."""
        self._check("stop")
        self._send(STOP)
        self.stopped = True

    def _receive(self) -> None:
        posted = []
        for s, (rank, (a, b)) in enumerate(zip(self.layout.servers, self.layout.bounds)):
            msg = _Message(REPLY_LEN, b - a, self.weights.dtype)
            posted.append((irecv(msg.buf, rank, tag=TAG_REPLY), msg, s))
        stale = 0
        for work, msg, s in posted:
            _wait(work, self.timeout, self._what(f"waiting for server {s} (rank {self.layout.servers[s]})"))
            a, b = self.layout.bounds[s]
            self.weights[a:b].copy_(msg.payload)
            self.versions[s] = int(msg.header[0])
            stale = max(stale, int(msg.header[1]))
        self.last_staleness = stale

    def state_dict(self) -> dict:
        return {"versions": list(self.versions), "pushes": self.pushes, "awaiting": self.awaiting}

    def load_state_dict(self, state: dict) -> None:
        if len(state["versions"]) != len(self.layout.servers):
            raise ValueError(f"checkpoint of a worker of {len(state['versions'])} servers, "
                             f"this layout has {len(self.layout.servers)}")
        self.versions = [int(v) for v in state["versions"]]
        self.pushes, self.awaiting = int(state["pushes"]), bool(state["awaiting"])
