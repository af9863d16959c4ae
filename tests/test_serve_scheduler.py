"""serve.scheduler's chunked prefill (`--prefill-chunk`) and the prefix-cache switch (`--no-prefix-cache`), in
process, on small random models (gpt2 and llama styles): the tokens of every row equal those of the unchunked
scheduler and of independent references (a greedy argmax loop over full forwards, a plain-torch inversion
sampler), long prompts that arrive while a row decodes are computed in chunks between that row's tokens, a row
cancelled mid-prefill frees its slot, and /metrics reports the chunk and prefix-cache counters."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from model import GPT, GPTConfig
from model.generate import SamplingParams
from serve.metrics import Metrics
from serve.scheduler import DEFAULT_PREFILL_CHUNK, Row, Scheduler, prefill_budget
from tests.test_serve import greedy_reference, sampled_reference

V = 97
STYLES = ["gpt2", "llama"]
RUNNER = "runner"


def build(style: str) -> GPT:
    torch.manual_seed(0)
    kw = {"n_kv_head": 2} if style == "llama" else {}
    # A large init spreads the logits, so greedy choices are far from ties.
    return GPT(GPTConfig(style=style, vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=96, init_std=0.2,
                         kernels="torch", **kw)).eval()


def long_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in (30, 23, 37)]


LONG_PARAMS = [SamplingParams(temperature=0, max_new_tokens=8), SamplingParams(temperature=0.9, seed=11, max_new_tokens=8),
               SamplingParams(temperature=1.2, seed=12, max_new_tokens=8)]


class Recorder:
    """Sinks for rows: every token in arrival order, one list of (name, token) shared by all rows."""

    def __init__(self):
        self.events: list[tuple[str, int | None]] = []
        self.first = {}
        self.done = {}

    def sink(self, name: str, hold=None):
        """hold: called (on the scheduler's thread, which it blocks) after the row's first token."""
        self.first[name], self.done[name] = threading.Event(), threading.Event()

        def put(out):
            assert not isinstance(out, Exception), out
            self.events.append((name, out.token))
            if not self.first[name].is_set():
                self.first[name].set()
                if hold is not None:
                    hold()
            if out.finished:
                self.done[name].set()
        return put

    def mark(self, name: str) -> None:
        self.events.append((name, None))

    def tokens(self, name: str) -> list[int]:
        return [t for n, t in self.events if n == name and t is not None]


def serve_with_a_runner(model, prefill_chunk, prefix_cache=True):
    """A row that decodes 60 tokens; the three long prompts arrive together while the scheduler is held at
    the runner's first token (so, whatever the machine's speed, they arrive while it decodes).
    (the recorder, the scheduler's metrics text)"""
    metrics = Metrics()
    sched = Scheduler({"m": model}, 4, metrics, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
    rec = Recorder()
    submitted = threading.Event()
    sched.start()
    try:
        sched.submit([Row("m", [1, 2, 3, 4], SamplingParams(temperature=0, max_new_tokens=60), None,
                          rec.sink(RUNNER, hold=lambda: submitted.wait(60)))])
        assert rec.first[RUNNER].wait(60)
        rows = [Row("m", p, sp, None, rec.sink(f"long{i}")) for i, (p, sp) in enumerate(zip(long_prompts(), LONG_PARAMS))]
        rec.mark("submitted")
        sched.submit(rows)
        submitted.set()
        for name in rec.done:
            assert rec.done[name].wait(60), name
    finally:
        sched.stop()  # the rows' slots are released after their last token reached the sink
    assert sched.engines["m"].free_slots() == [0, 1, 2, 3]
    return rec, metrics.render(sched.snapshot)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in the metrics"
    return float(m.group(1))


@pytest.mark.parametrize("style", STYLES)
def test_chunked_rows_get_the_tokens_of_whole_prefills_between_the_runners_tokens(style):
    model = build(style)
    whole, whole_text = serve_with_a_runner(model, None)
    chunked, text = serve_with_a_runner(model, 8)
    # Independent references: full forwards, no cache, no engine.
    assert chunked.tokens(RUNNER) == greedy_reference(model, [1, 2, 3, 4], 60, None)
    for i, (prompt, sp) in enumerate(zip(long_prompts(), LONG_PARAMS)):
        want = (greedy_reference(model, prompt, 8, None) if sp.temperature == 0 else
                sampled_reference(model, prompt, 8, sp.temperature, sp.seed, -1))
        assert chunked.tokens(f"long{i}") == want == whole.tokens(f"long{i}"), i
    assert chunked.tokens(RUNNER) == whole.tokens(RUNNER)

    def runner_tokens_before_first_long(rec):
        events = rec.events[rec.events.index(("submitted", None)):]
        first_long = min(k for k, (n, _) in enumerate(events) if n.startswith("long"))
        return sum(n == RUNNER for n, _ in events[:first_long])

    # Whole: the long prompts are prefilled in the next step, after the held step's decode.
    assert runner_tokens_before_first_long(whole) == 1
    # Chunked: 90 prompt tokens at prefill_budget(8, 1) = 7 a step, oldest first: the first (30 tokens) needs
    # 5 steps, each of which decodes the runner first.
    assert prefill_budget(8, 1) == 7
    assert runner_tokens_before_first_long(chunked) >= 4
    assert metric(text, "serve_prefill_chunk_tokens") == 8
    assert metric(text, "serve_prefill_chunked_rows_total") == 3
    assert metric(text, "serve_prefill_chunks_with_decode_total") >= 90 // 7
    assert metric(text, 'serve_step_seconds_count{kind="prefill_chunk"}') == metric(text, "serve_prefill_chunks_total")
    assert metric(whole_text, "serve_prefill_chunks_total") == metric(whole_text, "serve_prefill_chunked_rows_total") == 0
    assert metric(whole_text, "serve_prefill_chunk_tokens") == 0
    # Every generated token is counted once, whichever step produced it.
    assert metric(text, "serve_generated_tokens_total") == metric(whole_text, "serve_generated_tokens_total") == 60 + 24


def test_prefix_cache_counters_and_the_cache_off():
    model = build("gpt2")
    on, text = serve_with_a_runner(model, DEFAULT_PREFILL_CHUNK)
    off, text_off = serve_with_a_runner(model, DEFAULT_PREFILL_CHUNK, prefix_cache=False)
    for name in [RUNNER, "long0", "long1", "long2"]:
        assert on.tokens(name) == off.tokens(name), name
    # 4 prompts looked up, none shares a block with another: no hit.
    assert metric(text, 'serve_prefix_cache_enabled{module="m"}') == 1
    assert metric(text, 'serve_prefix_cache_lookups_total{module="m"}') == 4
    assert metric(text, 'serve_prefix_cache_prompt_tokens_total{module="m"}') == 4 + 30 + 23 + 37
    assert metric(text, 'serve_prefix_cache_hits_total{module="m"}') == 0
    assert metric(text, 'serve_prefix_cache_blocks{module="m"}') > 0
    assert metric(text_off, 'serve_prefix_cache_enabled{module="m"}') == 0
    assert 'serve_prefix_cache_lookups_total{module="m"}' not in text_off

    # A repeated prompt: its whole 16-token blocks come from the cache (all but its last token computed).
    metrics = Metrics()
    sched = Scheduler({"m": model}, 2, metrics)
    prompt = long_prompts()[2]  # 37 tokens: 2 whole blocks
    got, done = [], threading.Event()
    # reported from the start, before any request (a replica that has served nothing yet)
    assert metric(metrics.render(sched.snapshot), 'serve_prefix_cache_lookups_total{module="m"}') == 0
    sched.start()
    try:
        for _ in range(2):
            done.clear()
            sched.submit([Row("m", prompt, SamplingParams(temperature=0, max_new_tokens=3), None,
                              lambda o: (got.append(o.token), o.finished and done.set()))])
            assert done.wait(60)
    finally:
        sched.stop()
    text = metrics.render(sched.snapshot)
    assert got[:3] == got[3:] == greedy_reference(model, prompt, 3, None)
    assert metric(text, 'serve_prefix_cache_lookups_total{module="m"}') == 2
    assert metric(text, 'serve_prefix_cache_hits_total{module="m"}') == 1
    assert metric(text, 'serve_prefix_cache_hit_tokens_total{module="m"}') == 32


def test_a_row_cancelled_while_prefilling_frees_its_slot():
    model = build("llama")
    sched = Scheduler({"m": model}, 3, Metrics(), prefill_chunk=2)  # 1 prompt token a step beside the runner
    engine = sched.engines["m"]
    rec = Recorder()
    admitted, cancelled = threading.Event(), threading.Event()
    doomed = Row("m", long_prompts()[2], SamplingParams(temperature=0, max_new_tokens=4), None, rec.sink("doomed"))

    def runner(out):  # the scheduler's thread waits here, once the doomed row is admitted, until it is cancelled
        first(out)
        if doomed.slot is not None and not admitted.is_set():
            admitted.set()
            assert cancelled.wait(60)

    first = rec.sink(RUNNER)
    sched.start()
    try:
        sched.submit([Row("m", [5, 6], SamplingParams(temperature=0, max_new_tokens=80), None, runner)])
        assert rec.first[RUNNER].wait(60)
        sched.submit([doomed])
        assert admitted.wait(60)
        assert engine.prefilling_slots() == [doomed.slot]
        sched.cancel([doomed])
        cancelled.set()
        assert rec.done[RUNNER].wait(60)
    finally:
        sched.stop()
    assert rec.tokens("doomed") == [] and doomed.done
    assert engine.free_slots() == [0, 1, 2] and engine.prefilling_slots() == []
    assert rec.tokens(RUNNER) == greedy_reference(model, [5, 6], 80, None)


def test_prefill_budget_and_bad_values():
    assert [prefill_budget(64, d) for d in (1, 16, 48, 60)] == [63, 48, 16, 16]  # a quarter at least
    assert prefill_budget(2, 5) == 1
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Scheduler({"m": build("gpt2")}, 2, Metrics(), prefill_chunk=0)
