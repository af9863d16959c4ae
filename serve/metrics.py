"""What the server counts (`GET /metrics`, Prometheus text format 0.0.4) and its one-line JSON request log.

    serve_requests_total{endpoint,status}   finished HTTP requests to the generation endpoints
    serve_requests_running                  requests being answered now
    serve_queue_length                      rows waiting for a KV slot
    serve_batch_size                        rows in the running batch (last step); histogram per decode step
    serve_kv_slots_free{module}             free KV-cache slots of each module's engine
    serve_generated_tokens_total            tokens the engines produced
    serve_tokens_per_second                 generated tokens per second over the last 10 s
    serve_time_to_first_token_seconds       histogram: request arrival -> first token
    serve_request_latency_seconds           histogram: request arrival -> last token
    serve_step_seconds{kind}                histogram: one prefill / prefill_chunk / decode step of an engine
    serve_prefilling_rows                   rows admitted whose prompt is still being computed by chunks
    serve_prefill_chunk_tokens              the step's token budget of chunked prefill (0: whole prefills)
    serve_prefill_chunked_rows_total        rows admitted to be prefilled by chunks (while other rows decoded)
    serve_prefill_chunks_total              chunked-prefill forwards (`DecodeEngine.prefill_step` calls)
    serve_prefill_chunks_with_decode_total  ... of them in an iteration that also decoded running rows
    serve_prefix_cache_enabled{module}      1 when the module's engine keeps a prefix KV cache, else 0
    serve_prefix_cache_lookups_total{module}, serve_prefix_cache_hits_total{module}: prompts looked up in the
        prefix cache and those that reused a cached prefix; serve_prefix_cache_prompt_tokens_total{module},
        serve_prefix_cache_hit_tokens_total{module}: their prompt tokens and those taken from the cache (not
        computed); serve_prefix_cache_blocks{module}: blocks held (only for modules with the cache on)
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import deque

__all__ = ["Histogram", "Metrics", "log_request"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {_num(self.sum)}", f"{name}_count{braces} {self.count}"]


def _num(v: float) -> str:
    if isinstance(v, int) or (math.isfinite(v) and v == int(v)):
        return str(int(v))
    return repr(float(v))


class Metrics:
    """Thread-safe: the scheduler thread records steps, the app's event loop records requests."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.running_requests = 0
        self.generated = 0
        self.batch_size = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.steps = {kind: Histogram(LATENCY_BUCKETS) for kind in ("prefill", "prefill_chunk", "decode")}
        self.prefill_chunk = 0  # the scheduler's step budget (set by the scheduler; 0: whole prefills)
        self.chunked_rows = 0
        self.chunks = 0
        self.chunks_with_decode = 0

    def observe_step(self, kind: str, rows: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated += rows
            self.steps[kind].observe(seconds)
            self._recent.append((now, rows))
            if kind == "decode":
                self.batch_size = rows
                self.batch.observe(rows)
            self._trim(now)

    def observe_admitted(self, rows: int) -> None:
        """Rows admitted for chunked prefill."""
        with self._lock:
            self.chunked_rows += rows

    def observe_chunk(self, rows: int, decoding: int, seconds: float) -> None:
        """One chunked-prefill forward that completed `rows` prompts (their first tokens), in an iteration
        that decoded `decoding` rows."""
        now = time.monotonic()
        with self._lock:
            self.generated += rows
            self.steps["prefill_chunk"].observe(seconds)
            self.chunks += 1
            self.chunks_with_decode += decoding > 0
            self._recent.append((now, rows))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def request_started(self) -> None:
        with self._lock:
            self.running_requests += 1

    def request_finished(self, endpoint: str, status: int, ttft: float | None, latency: float | None) -> None:
        with self._lock:
            self.running_requests -= 1
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if latency is not None:
                self.latency.observe(latency)

    def request_refused(self, endpoint: str, status: int) -> None:
        """A request answered with an error before it started."""
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def render(self, snapshot: dict) -> str:
        """The text of GET /metrics; `snapshot`: the scheduler's waiting/running/free_slots."""
        with self._lock:
            now = time.monotonic()
            self._trim(now)
            rate = sum(n for _, n in self._recent) / RATE_WINDOW_S
            out = ["# HELP serve_requests_total Finished generation requests by endpoint and HTTP status.",
                   "# TYPE serve_requests_total counter"]
            out += [f'serve_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP serve_requests_running Requests being answered.", "# TYPE serve_requests_running gauge",
                    f"serve_requests_running {self.running_requests}",
                    "# HELP serve_queue_length Rows waiting for a KV slot.", "# TYPE serve_queue_length gauge",
                    f"serve_queue_length {snapshot['waiting']}",
                    "# HELP serve_batch_size Rows in the running batch.", "# TYPE serve_batch_size gauge",
                    f"serve_batch_size {snapshot['running']}",
                    "# HELP serve_decode_batch_rows Rows per decode step.", "# TYPE serve_decode_batch_rows histogram",
                    *self.batch.lines("serve_decode_batch_rows"),
                    "# HELP serve_kv_slots_free Free KV-cache slots per module.", "# TYPE serve_kv_slots_free gauge",
                    *(f'serve_kv_slots_free{{module="{k}"}} {v}' for k, v in snapshot["free_slots"].items()),
                    "# HELP serve_generated_tokens_total Tokens generated.",
                    "# TYPE serve_generated_tokens_total counter", f"serve_generated_tokens_total {self.generated}",
                    "# HELP serve_tokens_per_second Generated tokens per second over the last 10 s.",
                    "# TYPE serve_tokens_per_second gauge", f"serve_tokens_per_second {_num(rate)}",
                    "# HELP serve_time_to_first_token_seconds Arrival to first token.",
                    "# TYPE serve_time_to_first_token_seconds histogram",
                    *self.ttft.lines("serve_time_to_first_token_seconds"),
                    "# HELP serve_request_latency_seconds Arrival to last token.",
                    "# TYPE serve_request_latency_seconds histogram",
                    *self.latency.lines("serve_request_latency_seconds"),
                    "# HELP serve_step_seconds One engine step.", "# TYPE serve_step_seconds histogram"]
            for kind, h in self.steps.items():
                out += h.lines("serve_step_seconds", f'kind="{kind}"')
            out += _prefill_lines(self, snapshot) + _prefix_lines(snapshot.get("prefix", {}))
        return "\n".join(out) + "\n"


def _prefill_lines(m: Metrics, snapshot: dict) -> list[str]:
    return ["# HELP serve_prefilling_rows Rows whose prompt is being computed by chunks.",
            "# TYPE serve_prefilling_rows gauge", f"serve_prefilling_rows {snapshot.get('prefilling', 0)}",
            "# HELP serve_prefill_chunk_tokens Token budget of a scheduler step with chunked prefill (0: off).",
            "# TYPE serve_prefill_chunk_tokens gauge", f"serve_prefill_chunk_tokens {m.prefill_chunk}",
            "# HELP serve_prefill_chunked_rows_total Rows admitted to be prefilled by chunks.",
            "# TYPE serve_prefill_chunked_rows_total counter", f"serve_prefill_chunked_rows_total {m.chunked_rows}",
            "# HELP serve_prefill_chunks_total Chunked-prefill forwards.",
            "# TYPE serve_prefill_chunks_total counter", f"serve_prefill_chunks_total {m.chunks}",
            "# HELP serve_prefill_chunks_with_decode_total Chunked-prefill forwards in a step that decoded rows.",
            "# TYPE serve_prefill_chunks_with_decode_total counter",
            f"serve_prefill_chunks_with_decode_total {m.chunks_with_decode}"]


PREFIX_COUNTERS = (("lookups", "Prompts looked up in the prefix cache."),
                   ("hits", "Prompts that reused a cached prefix."),
                   ("prompt_tokens", "Prompt tokens looked up."),
                   ("hit_tokens", "Prompt tokens whose keys and values came from the cache."))


def _prefix_lines(prefix: dict) -> list[str]:
    """The engines' prefix-cache counters (`DecodeEngine.prefix_stats`; None: the cache is off)."""
    out = ["# HELP serve_prefix_cache_enabled 1 when the module's engine keeps a prefix KV cache.",
           "# TYPE serve_prefix_cache_enabled gauge",
           *(f'serve_prefix_cache_enabled{{module="{k}"}} {int(st is not None)}' for k, st in prefix.items())]
    on = {k: st for k, st in prefix.items() if st is not None}
    for name, text in PREFIX_COUNTERS:
        out += [f"# HELP serve_prefix_cache_{name}_total {text}", f"# TYPE serve_prefix_cache_{name}_total counter",
                *(f'serve_prefix_cache_{name}_total{{module="{k}"}} {st[name]}' for k, st in on.items())]
    out += ["# HELP serve_prefix_cache_blocks Blocks the prefix cache holds.", "# TYPE serve_prefix_cache_blocks gauge",
            *(f'serve_prefix_cache_blocks{{module="{k}"}} {st["blocks"]}' for k, st in on.items())]
    return out


def log_request(**fields) -> None:
    """One JSON line per request on stderr (ts: Unix time); fields with None are left out."""
    record = {"ts": round(time.time(), 3), "event": "request", **{k: v for k, v in fields.items() if v is not None}}
    sys.stderr.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stderr.flush()
