"""The continuous-batching loop: one background thread drives one `model.generate.DecodeEngine` per loaded
module (a LoRA base shared by several agents is one module, one engine; its rows carry their adapters).

Each iteration, for every engine with work: rows whose request was cancelled (a client that went away, a
stop string found) are released; waiting rows are admitted into the free slots with one prefill; then every
running row gets one token with one decode step, and rows that finished are released at once. So requests
join and leave the running batch at token boundaries and a KV slot lives exactly as long as its row. When
nothing is waiting or running, the thread sleeps on a condition until a request arrives.

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


class Scheduler:
    def __init__(self, modules: dict[str, torch.nn.Module], max_slots: int, metrics: Metrics,
                 threads: int | None = None, engines: dict | None = None):
        # engines: ready ones with DecodeEngine's interface instead (serve.ort's OrtEngine), by module key
        self.engines = engines if engines is not None else {
            key: DecodeEngine(m, max_slots=max_slots, prefix_cache=True) for key, m in modules.items()}
        self.metrics = metrics
        self.threads = threads
        self._cond = threading.Condition()
        self._inbox: list[Row] = []
        self._waiting: dict[str, deque[Row]] = {k: deque() for k in self.engines}
        self._running: dict[str, dict[int, Row]] = {k: {} for k in self.engines}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="serve-scheduler", daemon=True)
        # What /health and /metrics read from other threads (replaced, never mutated, by this loop).
        self.snapshot = {"waiting": 0, "running": 0, "free_slots": {k: max_slots for k in self.engines}}

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
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self._thread.ident is not None and not self._thread.is_alive():  # started, then crashed
                raise RuntimeError("the decoding loop has stopped")
            self._inbox.extend(rows)
            self._cond.notify()

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
                rows = self._inbox + [r for q in self._waiting.values() for r in q] + [
                    r for running in self._running.values() for r in running.values()]
                self._inbox = []
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
                         "free_slots": {k: len(e.free_slots()) for k, e in self.engines.items()}}

    def _step(self, key: str) -> None:
        engine, waiting, running = self.engines[key], self._waiting[key], self._running[key]
        for row in list(running.values()):
            if row.cancelled:
                self._finish(engine, running, row)
        if waiting:
            live = [r for r in waiting if not r.cancelled]
            waiting.clear()
            waiting.extend(live)
        free = engine.free_slots()
        admit = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        if admit:
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
        slots = sorted(s for s, r in running.items() if not r.cancelled)
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
