"""One HTTP request in flight: its rows in the scheduler (a prompt x n choices each), their text, usage and
timings, and the way it ends early (client gone, server error).

The scheduler thread hands each row's `StepOutput` to `Job._sink`, which moves it onto the event loop through
the app's `LoopHandoff` (one wake-up of the loop for all the tokens of a step, not one per token); `events()` turns tokens into text deltas per choice (serve.text) and, when a
choice ends on a stop string before the engine ends its row, cancels the row so its slot is freed at the
next token boundary."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from functools import partial

from model.generate import StepOutput

from .protocol import GenerationRequest
from .scheduler import Row, Scheduler
from .text import ChoiceText

__all__ = ["ClientGone", "Job", "LoopHandoff"]

_CANCELLED = object()


class LoopHandoff:
    """Items from other threads onto one event loop's queues. `call_soon_threadsafe` writes to the loop's
    wake-up pipe on every call; here a call is made only when no drain is pending, so the 16 tokens of a
    16-row step cost one wake-up (measured with bench/bench_serve.py: a few percent of tokens/s at 16
    clients on 2 cores)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._pending = False

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._pending:
                return
            self._pending = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._pending = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class ClientGone(Exception):
    """The client disconnected before the request finished."""


class Job:
    def __init__(self, req: GenerationRequest, scheduler: Scheduler, handoff: LoopHandoff, started: float):
        self.req, self.scheduler, self.handoff, self.started = req, scheduler, handoff, started
        self.queue: asyncio.Queue = asyncio.Queue()
        m = req.model
        self.choices = [ChoiceText(m.tokenizer, req.stop) for _ in range(len(req.prompts) * req.n)]
        self.rows = [Row(m.module_key, req.prompts[i // req.n], req.params[i], m.adapter, partial(self._sink, i))
                     for i in range(len(self.choices))]
        self.first_token: float | None = None
        self.finished: float | None = None
        self.client_gone = False

    # ---- scheduler thread -----------------------------------------------------------------------------

    def _sink(self, index: int, item: StepOutput | Exception) -> None:
        self.handoff.put(self.queue, (index, item))

    # ---- event loop ----------------------------------------------------------------------------------

    def submit(self) -> None:
        self.scheduler.submit(self.rows)

    def cancel(self, client_gone: bool = False) -> None:
        """Free every unfinished row's slot; with client_gone, `events()` stops with ClientGone."""
        self.scheduler.cancel([r for r in self.rows if not r.done])
        if client_gone:
            self.client_gone = True
            self.queue.put_nowait((None, _CANCELLED))

    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason or None) until every choice has finished."""
        open_choices = len(self.choices)
        try:
            while open_choices:
                index, item = await self.queue.get()
                if item is _CANCELLED:
                    raise ClientGone()
                if isinstance(item, Exception):
                    raise item
                choice = self.choices[index]
                if choice.finish_reason is not None:
                    continue  # tokens after a stop string, until the scheduler saw the cancel
                if self.first_token is None:
                    self.first_token = time.perf_counter()
                delta = choice.add(item.token, item.finish_reason if item.finished else None)
                if choice.finish_reason is not None:
                    open_choices -= 1
                    if not item.finished:
                        self.scheduler.cancel([self.rows[index]])
                yield index, delta, choice.finish_reason
            self.finished = time.perf_counter()
        finally:
            if open_choices:
                self.cancel()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.req.prompts)
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.started
