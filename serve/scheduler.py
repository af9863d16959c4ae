"""The continuous-batching loop: one background thread drives one `model.generate.DecodeEngine` per loaded
module (a LoRA base shared by several agents is one module, one engine; its rows carry their adapters).

Each iteration, for every engine with work: rows whose request was cancelled (a client that went away, a
stop string found) are released; waiting rows are admitted into the free slots; then every running row gets
one token with one decode step, and rows that finished are released at once. So requests join and leave the
running batch at token boundaries and a KV slot lives exactly as long as its row. When nothing is waiting or
running, the thread sleeps on a condition until a request arrives.

Admission (`prefill_chunk`, `--prefill-chunk`): when no row is decoding or prefilling, waiting rows are
prefilled whole, in one forward (nothing is stalled by it). Otherwise new rows are only admitted
(`DecodeEngine.admit`: slots taken, prefix-cache hits copied in), and each iteration, after the decode step,
one `prefill_step` computes at most a step budget of their prompt tokens, oldest first: the budget of
`prefill_chunk` tokens is shared as vLLM and Sarathi-Serve share theirs, one token per decoding row and the
rest for prompt chunks (at least a quarter of it, so prompts advance however many rows decode); an iteration
in which no row decodes computes all that is left. A row joins
the decode steps after the iteration that computed its prompt's last chunk (and gave its first token). So a
long prompt that arrives costs each running row at most a chunk's forward per token instead of its whole
prefill. The tokens are those of whole prefills (same greedy and seeded choices; the logits agree to float32
rounding). `prefill_chunk=None`: whole prefills always; engines without `admit` (serve.ort) prefill whole.

Rows talk to their request through `Row.sink`, called on this thread with each `StepOutput` (or an
Exception when the engine failed on the row's batch); the app turns that into a thread-safe hand-over to
its event loop. Engine errors fail the rows of the failing batch only; the loop goes on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.generate import DecodeEngine, SamplingParams, StepOutput

from .metrics import Metrics

__all__ = ["Row", "Scheduler"]


@dataclass(eq=False)
class Row:
    """One choice of one request: a prompt to continue in one KV slot."""

    engine: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    sink: Callable[[StepOutput | Exception], None]
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    slot: int | None = None
    done: bool = False


DEFAULT_PREFILL_CHUNK = 64  # tokens per scheduler step, decoding rows and prompt chunks together (--prefill-chunk)


def prefill_budget(step_tokens: int, decoding: int) -> int:
    """Prompt tokens one iteration may compute while `decoding` rows decode: the step's token budget less
    one per decoding row, and never less than a quarter of it."""
    return max(step_tokens - decoding, -(-step_tokens // 4))


class Scheduler:
    def __init__(self, modules: dict[str, torch.nn.Module], max_slots: int, metrics: Metrics,
                 threads: int | None = None, engines: dict | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, prefix_cache: bool = True):
        # engines: ready ones with DecodeEngine's interface instead (serve.ort's OrtEngine), by module key.
        # prefill_chunk: the step's token budget while rows decode (None: whole prefills, see the docstring).
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token (None: whole prefills), got {prefill_chunk}")
        self.engines = engines if engines is not None else {
            key: DecodeEngine(m, max_slots=max_slots, prefix_cache=prefix_cache) for key, m in modules.items()}
        self.metrics = metrics
        self.threads = threads
        self.prefill_chunk = prefill_chunk
        metrics.prefill_chunk = prefill_chunk or 0
        self._cond = threading.Condition()
        self._inbox: list[Row] = []
        self._waiting: dict[str, deque[Row]] = {k: deque() for k in self.engines}
        self._running: dict[str, dict[int, Row]] = {k: {} for k in self.engines}
        self._starting: list[Row] = []  # rows inside a prefill/admit call: in neither _waiting nor _running
        self._failed: Exception | None = None  # set by fail_all: every later submit raises it
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="serve-scheduler", daemon=True)
        # What /health and /metrics read from other threads (replaced, never mutated, by this loop).
        self._publish()

    # ---- called from other threads ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish: rows already submitted run to their end, then the thread exits."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the scheduler thread did not finish within {timeout} s")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, rows: list[Row]) -> None:
        with self._cond:
            if self._failed is not None:
                raise RuntimeError(f"the decoding loop cannot run any more: {self._failed}")
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self._thread.ident is not None and not self._thread.is_alive():  # started, then crashed
                raise RuntimeError("the decoding loop has stopped")
            self._inbox.extend(rows)
            self._cond.notify()

    def fail_all(self, error: Exception) -> None:
        """Every row not done gets `error` now, from this (another) thread: for when no engine call can
        finish any more (serve.tp: a lost rank), as the loop itself may be stuck in the collective that lost
        it. A row the loop also fails later gets a second error its request no longer reads."""
        with self._cond:
            self._failed = error
            rows = self._take_unfinished()
            for r in rows:
                r.cancelled = True
        for r in rows:
            if not r.done:
                self._fail(r, error)

    def _take_unfinished(self) -> list[Row]:
        """Every row submitted and not yet released (the caller holds `_cond`); the inbox is emptied. list()
        copies in one C call: the loop thread may be changing the queues now."""
        rows = self._inbox + list(self._starting) + [r for q in self._waiting.values() for r in list(q)] + [
            r for running in self._running.values() for r in list(running.values())]
        self._inbox = []
        return rows

    def cancel(self, rows: list[Row]) -> None:
        """The rows' slots are freed at the next token boundary (nothing happens to finished rows)."""
        with self._cond:
            for r in rows:
                r.cancelled = True
            self._cond.notify()

    # ---- the loop -----------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._inbox) or any(self._waiting.values()) or any(self._running.values())

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:
            # A bug here, not an engine error (those fail their batch only): no row may wait forever, and
            # /health turns 503 as the thread is gone.
            with self._cond:
                rows = self._take_unfinished()
            for r in rows:
                self._fail(r, RuntimeError(f"the decoding loop stopped: {e!r}"))
            raise

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._busy() and not self._stopping:
                    self._cond.wait()
                if not self._busy() and self._stopping:
                    return
                for r in self._inbox:
                    self._waiting[r.engine].append(r)
                self._inbox = []
            for key in self.engines:
                self._step(key)
            self._publish()

    def _publish(self) -> None:
        self.snapshot = {"waiting": sum(len(q) for q in self._waiting.values()),
                         "running": sum(len(r) for r in self._running.values()),
                         "prefilling": sum(len(self._prefilling(e)) for e in self.engines.values()),
                         "free_slots": {k: len(e.free_slots()) for k, e in self.engines.items()},
                         "prefix": {k: e.prefix_stats() for k, e in self.engines.items() if hasattr(e, "prefix_stats")}}

    def _chunks(self, engine) -> bool:
        return self.prefill_chunk is not None and hasattr(engine, "prefill_step")

    @staticmethod
    def _prefilling(engine) -> list[int]:
        return engine.prefilling_slots() if hasattr(engine, "prefilling_slots") else []

    def _step(self, key: str) -> None:
        engine, waiting, running = self.engines[key], self._waiting[key], self._running[key]
        for row in list(running.values()):  # rows decoding or still prefilling
            if row.cancelled:
                self._finish(engine, running, row)
        if waiting:
            live = [r for r in waiting if not r.cancelled]
            waiting.clear()
            waiting.extend(live)
        free = engine.free_slots()
        admit = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        if admit:
            self._starting = admit
            if running and self._chunks(engine):  # rows decoding or prefilling: the new ones go in by chunks
                self._admit(engine, running, admit, free)
            else:  # nothing decodes: one whole prefill stalls no one
                self._prefill(engine, running, admit, free)
            self._starting = []
        pending = set(self._prefilling(engine))
        slots = sorted(s for s, r in running.items() if not r.cancelled and s not in pending)
        if slots:
            t = time.perf_counter()
            try:
                outs = engine.decode(slots)
            except Exception as e:  # noqa: BLE001
                for s in slots:
                    self._fail(running[s], e)
                    self._finish(engine, running, running[s])
                return
            self.metrics.observe_step("decode", len(slots), time.perf_counter() - t)
            self._deliver(engine, running, outs)
        if pending:
            self._prefill_chunk(engine, running, len(slots))

    def _prefill(self, engine, running: dict[int, Row], admit: list[Row], free: list[int]) -> None:
        """The rows' whole prompts in one forward (their first tokens delivered)."""
        t = time.perf_counter()
        try:
            outs = engine.prefill([r.prompt for r in admit], free[:len(admit)], [r.params for r in admit],
                                  [r.adapter for r in admit])
        except Exception as e:  # noqa: BLE001 - the rows' requests get the error; the server goes on
            # The engine takes a slot only after the forward succeeded: nothing to release here.
            for r in admit:
                self._fail(r, e)
            outs = []
        for r, o in zip(admit, outs):
            r.slot = o.slot
            running[o.slot] = r
        self.metrics.observe_step("prefill", len(admit), time.perf_counter() - t)
        self._deliver(engine, running, outs)

    def _admit(self, engine, running: dict[int, Row], admit: list[Row], free: list[int]) -> None:
        """Chunked prefill: the rows take their slots now; their prompts are computed by later steps."""
        try:
            slots = engine.admit([r.prompt for r in admit], free[:len(admit)], [r.params for r in admit],
                                 [r.adapter for r in admit])
        except Exception as e:  # noqa: BLE001 - refused before the engine changed anything
            for r in admit:
                self._fail(r, e)
            return
        for r, s in zip(admit, slots):
            r.slot = s
            running[s] = r
        self.metrics.observe_admitted(len(admit))

    def _prefill_chunk(self, engine, running: dict[int, Row], decoding: int) -> None:
        """One chunk of the admitted prompts: the step's budget after `decoding` rows (all that is left when
        none decodes); the rows it completes get their first tokens."""
        budget = prefill_budget(self.prefill_chunk, decoding) if decoding else None
        t = time.perf_counter()
        try:
            outs = engine.prefill_step(budget)
        except Exception as e:  # noqa: BLE001 - nothing advanced: the prefilling rows fail and free their slots
            for s in self._prefilling(engine):
                if s in running:
                    self._fail(running[s], e)
                    self._finish(engine, running, running[s])
            return
        self.metrics.observe_chunk(len(outs), decoding, time.perf_counter() - t)
        self._deliver(engine, running, outs)

    def _deliver(self, engine: DecodeEngine, running: dict[int, Row], outs: list[StepOutput]) -> None:
        for o in outs:
            row = running[o.slot]
            try:
                row.sink(o)
            except Exception:  # noqa: BLE001 - the request's side is gone (its event loop closed)
                row.cancelled = True
            if o.finished:
                self._finish(engine, running, row)

    def _finish(self, engine: DecodeEngine, running: dict[int, Row], row: Row) -> None:
        engine.release(row.slot)
        del running[row.slot]
        row.done = True

    def _fail(self, row: Row, error: Exception) -> None:
        try:
            row.sink(error)
        except Exception:  # noqa: BLE001
            row.cancelled = True
