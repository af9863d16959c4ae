"""Tensor-parallel serving, the lockstep protocol (`python -m serve RUN --tp N`; the processes: serve.tp_ranks).

Every rank holds 1/N of every served model: serve.loader builds each on the meta device, converts it with the
project's TP layers (`model.tensor_parallel.apply_tensor_parallel`: attention heads, MLP width and vocabulary
split; `make_shard`), adds the LoRA agents' adapters over the split layers (`agents.lora.add_adapters(...,
tensor_parallel=True)`) and copies in only this rank's slices of the run's consolidated weights, adapters
included; every rank builds the same `DecodeEngine` over its shard. The adapter of each row travels with the
prefill/admit call, so rows of several agents share a step on every rank as without TP. Rank 0 alone runs HTTP and the scheduler. Its engines are `LockstepEngine`s:
each engine call (prefill and admit: prompts, slots, sampling params, adapters; prefill_step: a token
budget; decode: slots; release: a slot) is broadcast to the other ranks over a gloo control group before it
runs locally, and the other ranks (`follow`) run the same call on their engine. So all ranks run the same
forward in the same order and meet in the TP layers' all-reduces and the head's all-gather of the logits.

Sampling: the engine gathers the full-vocabulary logits on every rank (the same values everywhere: a
collective's result is identical on all ranks), and every sampled row draws from its own seeded generator
(a request without a seed gets one drawn on rank 0 and sent with the call, see `_seeded`), so every rank
emits the same tokens. Each message carries rank 0's tokens of the previous call; a rank whose own tokens
differ stops (its KV cache would silently diverge), which rank 0 sees as a lost rank.

A lost rank (its process exited; a collective failed, which gloo reports at once for a closed peer) marks
the channel dead with the reason: the call in flight and every later one raise `RankLost` (HTTP 503), and
serve.tp_ranks shuts the server down. Engine input errors (ValueError) are raised by the engine before it
changes anything, identically on every rank, so they fail the call's rows and the ranks stay in step; any
other exception in a call leaves the ranks' states unknown and is treated as a lost rank.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import threading
import time

import torch
import torch.distributed as dist

from model import GPTConfig
from model.generate import DecodeEngine, SamplingParams, StepOutput
from model.tensor_parallel import apply_tensor_parallel, check_tensor_parallel
from trainer.errors import UsageError

from .loader import Shard
from .scheduler import Scheduler

__all__ = ["Channel", "LockstepEngine", "RankLost", "TPScheduler", "check_tp", "follow", "make_engine",
           "make_shard", "parameter_bytes"]

FRAME = 16384  # bytes of a message's first broadcast: every usual engine call fits in it
HEARTBEAT_S = 5.0  # an idle rank 0 pings this often, so the other ranks' waits never reach the group timeout

_RNG = random.SystemRandom()


class RankLost(RuntimeError):
    """A tensor-parallel rank is gone: the server cannot decode any more (HTTP 503)."""

    http_status = 503


def check_tp(configs: dict[str, tuple[GPTConfig, bool]], tp: int) -> None:
    """UsageError (one line) unless every module (`serve.loader.module_configs`: key -> (config, carries
    LoRA adapters)) splits over `tp` ranks. A module with LoRA adapters splits as its base does: the adapters
    follow the layers' splits (agents.lora, Megatron's: A whole and B by rows over a column-parallel layer, A
    by columns and B whole over a row-parallel one) and their rank r is never split, so no adapter rank or
    target adds a condition here (a target that is not a TP layer is refused when the ranks build it)."""
    if tp < 1:
        raise UsageError(f"--tp must be >= 1, got {tp}")
    for config, _lora in configs.values():
        try:
            check_tensor_parallel(config, tp)
        except ValueError as e:
            raise UsageError(f"--tp {tp}: {e}") from None


def make_shard(group=None, device: torch.device | None = None) -> Shard:
    """How serve.loader builds this rank's part of each model: converted on the meta device with the TP
    layers over `group` (None: the default group), then only this rank's slices of the weights copied."""
    return Shard(dist.get_world_size(group), dist.get_rank(group), lambda m: apply_tensor_parallel(m, group),
                 device or torch.device("cpu"))


def make_engine(module: torch.nn.Module, max_slots: int, prefix_cache: bool = True) -> DecodeEngine:
    """One rank's engine over its shard, configured as serve.scheduler configures the unpartitioned one
    (every rank alike: the prefix cache's hits and evictions follow from the calls alone, so they are the
    same on every rank, and so are the chunks of a chunked prefill)."""
    return DecodeEngine(module, max_slots=max_slots, prefix_cache=prefix_cache)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters in this process (a tied tensor counted once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _digest(op: str, out):
    """What a call returned, compared between the ranks: the slots admitted, the tokens emitted."""
    if op == "release":
        return None
    if op == "admit":
        return ("admit", list(out))
    return [(o.slot, o.token) for o in out]


def _seeded(p: SamplingParams) -> SamplingParams:
    """A sampled row without a seed gets one, so that every rank draws the same token from its own
    generator (torch's default generator may be at different states on different ranks)."""
    if p.temperature > 0 and p.seed is None:
        return dataclasses.replace(p, seed=_RNG.getrandbits(63), generator=None)
    return p if p.generator is None else dataclasses.replace(p, generator=None)  # a generator is not sent


class Channel:
    """Rank 0 -> every other rank: one pickled message per engine call over a gloo group (`group`: the
    control group; None: the default group)."""

    def __init__(self, group=None):
        self.group = group
        self.lock = threading.Lock()  # one call at a time: rank 0's scheduler thread or its heartbeat
        self.dead: str | None = None  # why the ranks can no longer decode together
        self.check = None  # rank 0's tokens of the previous call, sent with the next message
        self.last_sent = time.monotonic()
        self._stop = threading.Event()
        self._frame = torch.zeros(FRAME, dtype=torch.uint8)

    # ---- rank 0 -----------------------------------------------------------------------------------

    def mark_dead(self, why: str) -> None:
        if self.dead is None:
            self.dead = why

    def send_locked(self, msg: dict) -> None:
        """Broadcast `msg` (the caller holds `lock`); RankLost when the group is broken."""
        if self.dead is not None:
            raise RankLost(self.dead)
        try:
            self._broadcast(pickle.dumps({**msg, "check": self.check}, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as e:  # noqa: BLE001 - gloo: "Connection closed by peer" and the like
            self.mark_dead(f"a tensor-parallel rank is gone: {_first_line(e)}")
            raise RankLost(self.dead) from e
        self.last_sent = time.monotonic()

    def start_heartbeat(self, period: float = HEARTBEAT_S) -> None:
        def beat():
            while not self._stop.wait(period / 2):
                if self.dead is not None:
                    return
                if time.monotonic() - self.last_sent < period or not self.lock.acquire(blocking=False):
                    continue
                try:
                    self.send_locked({"op": "ping"})
                except RankLost:
                    return
                finally:
                    self.lock.release()

        threading.Thread(target=beat, name="tp-heartbeat", daemon=True).start()

    def close(self) -> None:
        """Tell the other ranks to exit (nothing when the group is already broken)."""
        self._stop.set()
        if self.dead is not None:  # the lock may be held by a call stuck in a collective with a gone rank
            return
        with self.lock:
            if self.dead is None:
                try:
                    self.send_locked({"op": "exit"})
                except RankLost:
                    pass
                self.dead = "the server has stopped"

    # ---- the other ranks ---------------------------------------------------------------------------

    def receive(self) -> dict:
        frame = self._frame
        dist.broadcast(frame, 0, group=self.group)
        raw = frame.numpy().tobytes()
        n = int.from_bytes(raw[:8], "little")
        data = raw[8:8 + n]
        if n > FRAME - 8:
            rest = torch.empty(n - (FRAME - 8), dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    # ---- the wire -----------------------------------------------------------------------------------

    def _broadcast(self, data: bytes) -> None:
        """A message is one broadcast of FRAME bytes (its length, then its start) and, when longer, one
        more of the rest. torch's broadcast_object_list cost ~1.1 ms a message here (two broadcasts and
        its own conversions), against ~0.15 ms for one 16 KiB frame, in every decode step."""
        head = len(data).to_bytes(8, "little") + data[:FRAME - 8]
        self._frame[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(self._frame, 0, group=self.group)
        if len(data) > FRAME - 8:
            dist.broadcast(torch.frombuffer(bytearray(data[FRAME - 8:]), dtype=torch.uint8), 0, group=self.group)


def _start_args(prompts, slots, params, adapters) -> tuple:
    """prefill's and admit's arguments as sent: plain lists, every sampled row seeded."""
    return ([list(p) for p in prompts], list(slots), [_seeded(p) for p in params],
            None if adapters is None else list(adapters))


class LockstepEngine:
    """Rank 0's side of one engine: DecodeEngine's interface for the scheduler; every call that changes
    the engine is first sent to the other ranks."""

    def __init__(self, channel: Channel, key: str, engine: DecodeEngine):
        self.channel, self.key, self.engine = channel, key, engine
        self.max_slots = engine.max_slots

    def free_slots(self) -> list[int]:
        return self.engine.free_slots()

    def running_slots(self) -> list[int]:
        return self.engine.running_slots()

    def prefix_stats(self) -> dict | None:
        return self.engine.prefix_stats()

    def prefilling_slots(self) -> list[int]:
        return self.engine.prefilling_slots()

    def prefill(self, prompts, slots, params, adapters=None) -> list[StepOutput]:
        return self._call("prefill", *_start_args(prompts, slots, params, adapters))

    def admit(self, prompts, slots, params, adapters=None) -> list[int]:
        return self._call("admit", *_start_args(prompts, slots, params, adapters))

    def prefill_step(self, max_tokens: int | None = None) -> list[StepOutput]:
        return self._call("prefill_step", max_tokens)

    def decode(self, slots) -> list[StepOutput]:
        return self._call("decode", list(slots))

    def release(self, slot: int) -> None:
        if self.channel.dead is not None:  # nothing to keep in step any more: free the slot here only
            self.engine.release(slot)
            return
        self._call("release", slot)

    def _call(self, op: str, *args):
        ch = self.channel
        with ch.lock:
            ch.send_locked({"op": op, "key": self.key, "args": args})
            try:
                out = getattr(self.engine, op)(*args)
            except ValueError:  # raised before the engine changed anything, on every rank alike
                ch.check = ("error", "ValueError")
                raise
            except Exception as e:  # noqa: BLE001 - a collective failed, or the ranks' states are now unknown
                ch.mark_dead(f"tensor-parallel {op} failed: {_first_line(e)}")
                raise RankLost(ch.dead) from e
            ch.check = _digest(op, out)
            return out


class TPScheduler(Scheduler):
    """The scheduler over lockstep engines: unhealthy (/health 503, new requests 503) once a rank is lost."""

    def __init__(self, channel: Channel, *args, **kwargs):
        self.channel = channel
        super().__init__(*args, **kwargs)

    @property
    def alive(self) -> bool:
        return super().alive and self.channel.dead is None

    def submit(self, rows) -> None:
        if self.channel.dead is not None:
            raise RankLost(self.channel.dead)
        super().submit(rows)

    def stop(self, timeout: float = 30.0) -> None:
        if self.channel.dead is not None:  # the loop may wait in a collective with a gone rank: not joined
            return
        super().stop(timeout)


class Diverged(RuntimeError):
    """This rank's tokens differ from rank 0's."""


def follow(channel: Channel, engines: dict[str, DecodeEngine]) -> None:
    """A rank other than 0: run rank 0's engine calls until it says exit. Raises when rank 0 is gone (the
    broadcast fails), when this rank's tokens differ from rank 0's (Diverged), or when a call fails other
    than on its input."""
    mine = None
    while True:
        msg = channel.receive()
        if msg["check"] != mine:
            raise Diverged(f"this rank's last tokens {mine} differ from rank 0's {msg['check']}")
        op = msg["op"]
        if op == "exit":
            return
        if op == "ping":
            continue
        try:
            out = getattr(engines[msg["key"]], op)(*msg["args"])
        except ValueError:
            mine = ("error", "ValueError")
            continue
        mine = _digest(op, out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
