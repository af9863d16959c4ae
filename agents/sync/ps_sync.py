"""`sync.strategy: parameter_server` in the training loop: workers push gradients, servers step AdamW.

A job of `launch.procs_per_node x launch.nodes` processes: the last `sync.servers` ranks are
servers (`run_server`, instead of the training loop), the others are workers, one replica each
(`ParameterServerSync`, the worker's side, hooked on its `Stepper`). Server s owns shard s of the
flat parameter vector and its AdamW (`agents.sync.param_server`, whose docstring gives the
protocol); the training loop's collectives run over the workers only (`ParallelDims.job_group`).

One step of a worker: forward and backward through its DeepSpeed engine (ZeRO-0, fp32), then,
instead of the engine's optimizer (its step is skipped; the engine still zeroes gradients and
moves its counters), push the flat gradient to the servers and pull the updated weights.
`sync.staleness: 0` is synchronous: every server averages all workers' gradients in worker order
and applies one AdamW step (the job's mean gradient, as `allreduce`). `k >= workers - 1` is
asynchronous: each push is applied on its own, at most k versions late, in a fixed order (the
server's `ordered` mode) so that runs and resumes are reproducible bit for bit.

The servers apply what the engine would have: AdamW with the recipe's betas, eps and learning-rate
schedule, weight decay on the same elements (`trainer.model_setup.param_groups`), global-norm
clipping at `optim.grad_clip`. The schedule follows the server's version: one update per step when
synchronous; when asynchronous, W updates (one per worker) per step, each at the step's rate.
A step every worker skips (a non-finite loss: the veto is job-wide) pushes nothing.

Control and checkpoints. Rank 0 (worker 0) drives the servers with small messages (`_send_obj`):
`open` (the first time with the initial weights, or the servers' states of a checkpoint) starts a
session, `snapshot` asks a server for its `state_dict()` once every worker has stopped its session,
`exit` ends the server process. A checkpoint is taken where no message is in flight: every worker
sends stop(), the servers' serve() returns, rank 0 collects their states into its loop state, and
the next push opens a new session. A dead worker or server fails the others' waits (gloo), naming
the rank, within `launch.timeout_s`.
"""

from __future__ import annotations

import datetime
import io

import torch
import torch.distributed as dist

from trainer.errors import UsageError
from trainer.schema import Recipe

from .gossip import unflatten_
from .param_server import Layout, ParameterServer, PSWorker
from .strategies import _flat, _Strategy

TAG_CONTROL = 0x50530010  # rank 0 <-> server: control messages and snapshots
# Fault injection for the tests (as trainer.faults): every server (or RECIPES_FAULT_RANK's) dies
# by SIGKILL once it has applied update N.
KILL_SERVER_AT_VERSION = "RECIPES_FAULT_KILL_SERVER_AT_VERSION"


def _timeout(recipe: Recipe) -> datetime.timedelta:
    return datetime.timedelta(seconds=recipe.launch.timeout_s)


def _send_obj(obj, dst: int) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst, tag=TAG_CONTROL)
    dist.send(data, dst, tag=TAG_CONTROL)


def _recv_obj(src: int):
    n = torch.zeros(1, dtype=torch.int64)
    dist.recv(n, src, tag=TAG_CONTROL)
    data = torch.empty(int(n), dtype=torch.uint8)
    dist.recv(data, src, tag=TAG_CONTROL)
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)


def _lr_schedule(recipe: Recipe, workers: int):
    """The learning rate of the update a server applies at `version` (see the module docstring)."""
    from trainer.ds_config import lr_lambda

    fn, per_step = lr_lambda(recipe), workers if recipe.sync.staleness > 0 else 1
    return lambda version: recipe.optim.lr * fn(version // per_step)


class ParameterServerSync(_Strategy):
    """The worker's side (module docstring)."""

    exchanges_gradients = True

    def __init__(self, recipe: Recipe, replicas: int):
        super().__init__(recipe, replicas)
        self.servers = recipe.sync.servers
        self.session_open = False
        self.server_states = None  # rank 0 after a resume: what the servers continue from

    def attach(self, stepper, replica, sample_counts):
        super().attach(stepper, replica, sample_counts)
        if any(p.dtype != torch.float32 for p in self.params):
            raise UsageError("sync.strategy=parameter_server: the servers step fp32 weights; it needs "
                             "train.precision=fp32 with parallel.zero_stage=0")
        W = self.replicas
        self.flat = _flat(self.params)
        self.layout = Layout(self.flat.numel(), tuple(range(W)), tuple(range(W, W + self.servers)))
        self.worker = PSWorker(self.layout, self.flat, timeout=_timeout(self.recipe))
        # Weight decay where the engine's parameter groups put it (matrices, not embeddings).
        from trainer.model_setup import param_groups

        decayed = {id(p) for p in param_groups(replica.module, 1.0)[0]["params"]}
        self.decay_mask = torch.cat([torch.full((p.numel(),), id(p) in decayed) for p in self.params])
        stepper.after_backward.append(self._exchange)

    @torch.no_grad()
    def _exchange(self, stepper) -> None:
        if stepper.skipper.skip_next:  # a step every worker skips (non-finite loss somewhere)
            return
        if not self.session_open:
            self._open_session()
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("sync.strategy=parameter_server: a trainable parameter has no gradient after backward")
        self.worker.push(_flat(grads))
        self.worker.pull()
        unflatten_(self.params, self.flat)
        stepper.skipper.skip_next = True  # the servers applied the update: the engine's optimizer must not

    def _open_session(self) -> None:
        if self.dims.rank == 0:
            for s, rank in enumerate(self.layout.servers):
                msg = {"action": "open", "numel": self.layout.numel, "workers": self.replicas}
                if self.server_states is not None:
                    msg["state"] = self.server_states[s]
                elif self.worker.version == 0 and self.worker.pushes == 0:
                    a, b = self.layout.bounds[s]
                    msg["init"], msg["decay_mask"] = self.flat[a:b].clone(), self.decay_mask[a:b].clone()
                _send_obj(msg, rank)
            self.server_states = None
        self.session_open = True

    def _close_session(self) -> list | None:
        """Every worker stops; rank 0 returns the servers' states (None elsewhere)."""
        if not self.session_open:
            self._open_session()  # a checkpoint before any step: the servers must exist to be saved
        self.worker.stop()
        state = self.worker.state_dict()
        self.worker = PSWorker(self.layout, self.flat, timeout=_timeout(self.recipe))
        self.worker.load_state_dict(state)
        self.session_open = False
        if self.dims.rank != 0:
            return None
        states = []
        for rank in self.layout.servers:
            _send_obj({"action": "snapshot"}, rank)
            states.append(_recv_obj(rank))
        return states

    def log_row(self, step: int) -> dict:
        row = {**super().log_row(step), "ps_version": self.worker.version}
        if self.recipe.sync.staleness > 0:
            row["staleness"] = self.worker.last_staleness
            row["consensus_dist"] = self.consensus_dist()
        return row

    def state_dict(self) -> dict:
        servers = self._close_session()
        return {**super().state_dict(), "worker": self.worker.state_dict(), "servers": servers,
                "layout": {"workers": self.replicas, "servers": self.servers}}

    def load_state_dict(self, state: dict) -> None:
        want = {"workers": self.replicas, "servers": self.servers}
        if state.get("layout") != want:
            raise UsageError(f"the checkpoint's parameter-server job had {state.get('layout')}, this one {want}: "
                             "resume with the same launch processes and sync.servers")
        super().load_state_dict(state)
        self.worker.load_state_dict(state["worker"])
        self.server_states = state["servers"]

    def close(self) -> None:
        """End of the run: the servers exit (rank 0 tells them)."""
        if self.session_open:
            self._close_session()
        if self.dims.rank == 0:
            for rank in self.layout.servers:
                _send_obj({"action": "exit"}, rank)


def run_server(recipe: Recipe, world_size: int, rank: int) -> None:
    """The server rank's process: take part in creating the job's groups, then serve sessions
    until rank 0 says exit (module docstring)."""
    from trainer import faults
    from trainer.dims import ParallelDims
    from trainer.run_context import SignalWatch

    SignalWatch()  # a stop signal is the workers' to act on: they checkpoint, then rank 0 says exit
    servers = recipe.sync.servers
    ParallelDims.build(world_size, rank, recipe.parallel.tp, recipe.parallel.pp, world_size - servers, servers)
    o, server = recipe.optim, None
    layout_servers = tuple(range(world_size - servers, world_size))
    while True:
        msg = _recv_obj(0)
        action = msg["action"]
        if action == "exit":
            return
        if action == "snapshot":
            _send_obj({**server.state_dict(), "decay_mask": server.decay_mask}, 0)
            continue
        if server is None:
            workers = msg["workers"]
            layout = Layout(msg["numel"], tuple(range(workers)), layout_servers)
            if "state" in msg:
                init, mask = msg["state"]["weights"], msg["state"]["decay_mask"]
            elif "init" in msg:
                init, mask = msg["init"], msg["decay_mask"]
            else:
                raise RuntimeError(f"parameter server rank {rank}: asked to serve before receiving weights")
            server = ParameterServer(
                layout, init, staleness=recipe.sync.staleness, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                weight_decay=o.weight_decay, lr_schedule=_lr_schedule(recipe, workers),
                max_grad_norm=o.grad_clip or None, timeout=_timeout(recipe), log_limit=10_000,
                decay_mask=mask, ordered=True)
            if "state" in msg:
                server.load_state_dict(msg["state"])
        server.serve(on_update=lambda srv: faults.maybe_kill(KILL_SERVER_AT_VERSION, srv.version))
