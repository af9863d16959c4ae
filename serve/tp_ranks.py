"""The processes of a tensor-parallel server (`python -m serve RUN --tp N`; the protocol: serve.tp).

Rank 0 is the process started by hand: it checks the run from its checkpoint's meta first (a run that
cannot be served, or a --tp that does not divide the heads, kv heads, MLP width or vocabulary, is one line
and exit 2 before any other process starts), then `start_ranks` opens a TCP store on a free loopback port
and starts ranks 1..N-1 as `python -m serve.tp_ranks RUN --rank r ...`. Once each has said in the store that
it is up, all N join one process group (gloo on CPU; NCCL when every rank has its own CUDA device) and a
gloo control group, load their shard of every model (serve.loader with serve.tp.make_shard: the full model
is never built on any rank) and meet at a barrier. Rank 0 then serves HTTP (serve.cli) while the others
follow its engine calls. A run that fails to load (a missing tokenizer, a damaged checkpoint) fails alike
on every rank: rank 0 prints the one line, the others exit 2 without a word.

The other ranks run in their own sessions (Ctrl-C in a terminal reaches rank 0 only) and get SIGKILL from
the kernel if rank 0 dies (Linux `PR_SET_PDEATHSIG`); a rank whose broadcast fails (rank 0 gone) exits too.
Shutdown: rank 0's graceful stop (SIGTERM/SIGINT: in-flight requests finish) ends with `Ranks.stop`, an
"exit" message, which every rank obeys; then rank 0 waits for them. `Ranks.watch` polls the other ranks:
one that exits while serving marks the channel dead (requests fail with 503, /health says 503) and sends
rank 0 SIGTERM, so the server stops instead of hanging; rank 0 then exits 1 (`lost`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import timedelta

import torch
import torch.distributed as dist

from .procs import stop_all
from .tp import Channel, follow, make_engine, make_shard

__all__ = ["Ranks", "default_threads", "main", "start_ranks"]

STARTUP_S = 600.0  # every rank has loaded the run within this
COLLECTIVE_S = 300.0  # one engine call (or an idle wait between two heartbeats) takes less than this
EXIT_GRACE_S = 30.0  # a lost rank: rank 0 is gone this long after its graceful stop began, gracefully or not


def default_threads(tp: int) -> int:
    """Torch threads per rank: the cores shared out, so N ranks do not oversubscribe the machine."""
    return max(1, (os.cpu_count() or 1) // tp)


def _device_and_backend(rank: int, tp: int) -> tuple[torch.device, str]:
    if torch.cuda.is_available() and torch.cuda.device_count() >= tp:
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank), "nccl"
    return torch.device("cpu"), "gloo"


def _log(**fields) -> None:
    sys.stderr.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stderr.flush()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _join(store, rank: int, tp: int) -> tuple[Channel, torch.device]:
    """Join the process group and the control group (every rank calls this in the same order)."""
    device, backend = _device_and_backend(rank, tp)
    dist.init_process_group(backend, store=store, rank=rank, world_size=tp, timeout=timedelta(seconds=COLLECTIVE_S))
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_S))
    # Gloo can finish connecting a rank > 0 while rank 0 is still connecting: a rank that then failed to
    # load the run and exited made rank 0's new_group raise ("connection closed by peer") instead of
    # rank 0 reporting the load error itself. After this barrier every rank is fully connected.
    dist.barrier(group=control)
    return Channel(control), device


class Ranks:
    """Rank 0's view of the group: the other ranks' processes and the control channel."""

    def __init__(self, procs: list[subprocess.Popen], channel: Channel, device: torch.device):
        self.procs, self.channel, self.device = procs, channel, device
        self.lost: str | None = None  # why the group broke while serving
        # Set by serve.cli.start_tp once this rank's modules are sharded:
        self.engines: dict = {}  # module key -> LockstepEngine
        self.threads = 1  # torch threads per rank
        self.parameter_bytes: dict[str, int] = {}  # module key -> this rank's parameter bytes
        self._stopping = False

    def watch(self, on_lost: Callable[[str], None], period: float = 0.1) -> None:
        """In a thread: a rank that exits (or a broken channel) while serving stops the server. `on_lost(why)`
        fails the requests in flight at once: the scheduler thread may be waiting in a collective with the
        gone rank, which gloo does not always end (seen: a TP all-reduce still waiting 8 s after the kill)."""

        def exited() -> dict[int, int]:
            return {r: p.returncode for r, p in enumerate(self.procs, 1) if p.poll() is not None}

        def loop():
            while not self._stopping:
                gone = exited()
                if not gone and self.channel.dead is None:
                    time.sleep(period)
                    continue
                if not gone:  # a collective failed: a rank that died is seen exited a moment later
                    time.sleep(1.0)
                    gone = exited()
                if self._stopping:
                    return
                failure = self.channel.dead
                why = "; ".join(f"tensor-parallel rank {r} exited with code {rc}" for r, rc in gone.items()) or failure
                self.channel.mark_dead(why)
                self.lost = why
                _log(event="tp_rank_lost", error=why, failure=failure if failure != why else None)
                # uvicorn's graceful shutdown (the requests in flight are failed first), with a hard deadline.
                threading.Timer(EXIT_GRACE_S, os._exit, (1,)).start()
                try:
                    on_lost(why)
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)
                return

        threading.Thread(target=loop, name="tp-watch", daemon=True).start()
        self.channel.start_heartbeat()

    def abort(self) -> None:
        """End the other ranks at once: before serving (rank 0 could not load the run), or after a loss."""
        self._stopping = True
        for p in self.procs:
            with suppress(OSError):
                p.kill()
            p.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """Every rank exits: an "exit" message, then wait (SIGKILL after `timeout`)."""
        self._stopping = True
        if self.lost is not None:  # the group is broken: no "exit" reaches the ranks still alive
            self.abort()
        self.channel.close()
        stop_all(self.procs, timeout)
        if self.lost is None:  # after a lost rank a collective may still wait with it: no teardown
            with suppress(Exception):
                dist.destroy_process_group()


def start_ranks(run: str, tp: int, follower_args: list[str]) -> Ranks | int:
    """Start ranks 1..tp-1 and join them in the process groups (rank 0 has checked the run). Ranks, or the
    exit code of a rank that failed to start (its error line is on stderr)."""
    store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, timeout=timedelta(seconds=STARTUP_S),
                          wait_for_workers=False)
    procs = [subprocess.Popen([sys.executable, "-m", "serve.tp_ranks", run, "--rank", str(r), "--tp", str(tp),
                               "--store-port", str(store.port), *follower_args],
                              stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
             for r in range(1, tp)]
    deadline = time.monotonic() + STARTUP_S
    try:
        while not store.check([f"up/{r}" for r in range(1, tp)]):
            for r, p in enumerate(procs, 1):
                if p.poll() is not None:
                    _log(event="tp_rank_failed", rank=r, code=p.returncode)
                    return p.returncode or 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tensor-parallel ranks did not start within {STARTUP_S:.0f} s")
            time.sleep(0.05)
        channel, device = _join(store, 0, tp)
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    finally:
        if any(p.poll() is not None for p in procs):
            for p in procs:
                with suppress(OSError):
                    p.kill()
    return Ranks(procs, channel, device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.tp_ranks",
                                description="one tensor-parallel rank > 0 of `python -m serve RUN --tp N`")
    p.add_argument("run")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--store-port", type=int, required=True)
    p.add_argument("--max-slots", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--no-prefix-cache", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from trainer.checkpoint import CheckpointError
        from trainer.errors import UsageError

        from .loader import load_run

        store = dist.TCPStore("127.0.0.1", args.store_port, args.tp, is_master=False,
                              timeout=timedelta(seconds=STARTUP_S))
        store.set(f"up/{args.rank}", "1")
        channel, device = _join(store, args.rank, args.tp)
        try:
            run = load_run(args.run, args.checkpoint, shard=make_shard(None, device))
        except (UsageError, CheckpointError, OSError):
            rc = 2  # rank 0 loads the same run, fails the same way and says why
        else:
            engines = {key: make_engine(m, args.max_slots, not args.no_prefix_cache) for key, m in run.modules.items()}
            dist.barrier(group=channel.group)
            follow(channel, engines)
            rc = 0
    except Exception as e:  # noqa: BLE001 - one line: rank 0 sees this rank exit and stops the server
        _log(event="tp_rank_stopped", rank=args.rank, error=f"{type(e).__name__}: {str(e)[:300]}")
        rc = 1
    # os._exit: gloo's threads were seen to abort while being destroyed at interpreter exit
    # (tests/test_tensor_parallel.py's _exit_now); nothing is left to flush but the streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
