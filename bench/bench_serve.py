"""`make bench-serve`: the server's continuous batching under load, measured as `vllm bench serve` does.

Two servers (`python -m serve RUN`, real uvicorn processes on loopback ports), side by side: the default
(chunked prefill, `--prefill-chunk 64`) and `--prefill-chunk 0` (whole prefills), and the same 16 requests
(ragged prompts, 128 new tokens each unless <|endoftext|> comes first, seeded sampling at temperature 0.8),
streamed (`stream_options.include_usage` for exact token counts):
  - sequential: the 16 requests one at a time (each alone on the server: the "lone request" figures);
  - concurrent: 16 clients sending them at the same moment.
The phases alternate for --rounds rounds, each phase on one server then the other. Per request: TTFT (sent ->
first text chunk), TPOT ((end - first chunk) / (output tokens - 1)), the gaps between text chunks (ITL),
end-to-end latency; per phase: output tokens/s over the phase's wall time. Goals (issue 14), on the default
server: concurrent tokens/s >= 4x sequential; p99 TPOT at 16 concurrent <= 2x the lone request's (its median
TPOT in the sequential phase). The clients are one asyncio loop of httpx streams in this process; each server
runs in its own process with --threads torch threads.

Load test (--parts load): Poisson arrivals at several rates (--rates) of the same kind of requests against
one server, and a shared-prefix multi-agent trace (--agents agents, each with its own ~330-character system
prefix, every request that prefix plus a short turn), each request streamed: p50/p99 TTFT, TPOT, e2e, output
tokens/s, in `vllm bench serve`'s fields.
Router (--parts router): one router per policy (`--replicas 3 --policy P`, one torch thread per replica), all
up side by side; --pairs pairs, each one shared-prefix trace (--router-requests requests, its own seed and its
own agents, so no replica has its prefixes cached when it starts) run under `--policy cache_aware` and
`--policy round_robin` with the same requests and arrival times, the order alternating (A B, B A, ...): the
router's prefix-hit rate (goal >= 2x round-robin's), p99 TTFT (goal <= 0.5x: the median of the pairs' ratios,
and the p99 pooled over all pairs' requests), the busiest / least-busy replica's mean requests in flight (each
request counted on its replica, from the `x-replica` header, over its e2e time; goal <= 1.5x), and where the
TTFT comes from (requests that found their prefix in their replica's cache or not; the queue each found).

Prefix cache (--parts prefix): the decoding engine alone in this process on the trace's prompts, one at a
time in arrival order, with its prefix cache off and on (side by side, two passes each, the second counted):
prefill ms per request (the server's share of TTFT) and the share of prompt tokens whose keys came from the
cache. The servers of the other parts run with the cache on (serving's default).
Chunked prefill (--parts chunked): the engine alone, continuous batching over 8 slots of the 16 ragged prompts
(64 new tokens) interleaved with 16 of the trace's long prompts (16 new tokens), so long prompts join while
other rows decode: the gaps between consecutive tokens of a request (what a running row waits per token), with
whole prefills against at most --prefill-chunk prompt tokens per step (`DecodeEngine.stream(prefill_chunk=)`);
then served: the two servers of the first part (with --no-prefix-cache), a mix of those short prompts and the
trace's long ones arriving Poisson at 24 req/s: TPOT, the gaps between text chunks, the long prompts' TTFT.
Detokenisation (--parts text): serve.text.ChoiceText alone on the run's tokenizer, fed a completion token by
token at several lengths: microseconds per token, against decoding the whole completion after every token.

    python bench/bench_serve.py [--run runs/gpt-tiny] [--parts basic,load,router,prefix,chunked,text] [--rounds 3] [--threads 1]
                                [--max-tokens 128] [--rates 4,16,64] [--pairs 8] [--router-requests 240]
                                [--out bench/results/serve-cpu.md]
Each part replaces its own section of the results file and its own key of the .json beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from record_losses import cpu_name, write_marked_section  # noqa: E402

from launch.multiproc import free_port  # noqa: E402
from serve.procs import ServerDidNotStart, launch_server  # noqa: E402

N_CLIENTS = 16
PROMPTS = [  # 16 prompts of ragged lengths
    "def main(", "import os\nimport sys\n\n", "class Config:\n    def __init__(self", "# Copyright 2001 ",
    "for i in range(", "    return self._", "\"\"\"Utilities for parsing", "if __name__ == '__main__':\n    ",
    "def __repr__(self):\n        return ", "try:\n    import", "with open(path) as f:\n    for line in f:\n        ",
    "x = [", "    @property\n    def name(self):\n        ", "raise ValueError(", "async def fetch(url",
    "from collections import namedtuple\n\nPoint = namedtuple(",
]


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def timed_request(client: httpx.AsyncClient, url: str, model: str, req: dict, t0: float | None = None) -> dict:
    """One streamed completion (req: prompt, max_tokens, seed; seeded sampling at T=0.8): TTFT (sent -> first
    chunk with text; with none, the first chunk), TPOT ((end - first) / (output tokens - 1)), e2e, the gaps between consecutive text
    chunks, the replica that answered (the router's x-replica header) and start/end relative to t0."""
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0.8,
            "seed": req["seed"], "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    t0 = start if t0 is None else t0
    first = usage = last = any_chunk = rid = None
    gaps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        replica = r.headers.get("x-replica")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = rid or chunk.get("id")
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"]:
                now = time.perf_counter()
                any_chunk = any_chunk or now
                if any(c["text"] for c in chunk["choices"]):
                    if first is not None:
                        gaps.append(now - last)
                    first, last = first or now, now
    end = time.perf_counter()
    first = first or any_chunk  # a text that is empty (<|endoftext|> first): its first chunk
    if usage is None or first is None:
        raise RuntimeError("no usage chunk or no choice")
    n = usage["completion_tokens"]
    return {"ttft": first - start, "e2e": end - start, "tokens": n, "tpot": (end - first) / (n - 1) if n > 1 else None,
            "gaps": gaps, "replica": None if replica is None else int(replica), "start": start - t0, "end": end - t0,
            "id": rid}


def one_request(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int):
    return timed_request(client, url, model, {"prompt": PROMPTS[i], "max_tokens": max_tokens, "seed": i})


async def phase(url: str, model: str, concurrent: bool, max_tokens: int) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=N_CLIENTS)) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, model, i, max_tokens) for i in range(N_CLIENTS)))
        else:
            results = [await one_request(client, url, model, i, max_tokens) for i in range(N_CLIENTS)]
        return time.perf_counter() - start, list(results)


def latency_fields(results: list[dict]) -> dict:
    """vllm bench serve's mean/median/p99 of TTFT, TPOT and e2e latency (ms), and p99/max of the gaps between
    consecutive text chunks of a request (what a streaming client waits per token)."""
    out = {}
    for key, name in (("ttft", "ttft"), ("tpot", "tpot"), ("e2e", "e2el")):
        vals = [r[key] * 1000 for r in results if r[key] is not None]
        out.update({f"mean_{name}_ms": statistics.mean(vals), f"median_{name}_ms": statistics.median(vals),
                    f"p99_{name}_ms": percentile(vals, 99)})
    gaps = [g * 1000 for r in results for g in r["gaps"]]
    if gaps:
        out.update({"p99_itl_ms": percentile(gaps, 99), "max_itl_ms": max(gaps)})
    return out


def summarise(walls: list[float], results: list[dict], rounds: int) -> dict:
    """vllm bench serve's fields (milliseconds), over every request of every round."""
    tokens = sum(r["tokens"] for r in results)
    out = {"num_prompts": len(results), "rounds": rounds, "duration": sum(walls), "total_output_tokens": tokens,
           "request_throughput": len(results) / sum(walls), "output_throughput": tokens / sum(walls),
           "output_throughput_per_round": [sum(r["tokens"] for r in results[k * N_CLIENTS:(k + 1) * N_CLIENTS]) / w
                                           for k, w in enumerate(walls)]}
    return {**out, **latency_fields(results)}


def engine_floor(run: Path, threads: int, steps: int = 60) -> dict:
    """The decoding engine alone, in this process (no HTTP, no scheduler): ms per decode step with 1 row and
    with 16 rows, sampled as the requests are. Their ratio is the lowest p99-TPOT ratio batching 16 clients
    can reach on this machine: a 16-row step is what each concurrent client waits for per token."""
    import torch

    from model.generate import DecodeEngine, SamplingParams
    from serve.loader import load_run

    torch.set_num_threads(threads)
    module = next(iter(load_run(run).modules.values()))
    out = {}
    for rows in (1, N_CLIENTS):
        engine = DecodeEngine(module, max_slots=N_CLIENTS)
        params = [SamplingParams(temperature=0.8, seed=i, max_new_tokens=steps + 20) for i in range(rows)]
        engine.prefill([[1] * 8] * rows, list(range(rows)), params)
        for _ in range(5):
            engine.decode()
        start = time.perf_counter()
        for _ in range(steps):
            engine.decode()
        out[f"step_ms_{rows}_rows"] = (time.perf_counter() - start) / steps * 1000
    out["ratio"] = out[f"step_ms_{N_CLIENTS}_rows"] / out["step_ms_1_rows"]
    return out


_SCALARS = re.compile(r"\[\s*(?:[-\w.+]+\s*,\s*)*[-\w.+]+\s*\]")  # a JSON list of numbers/true/false/null


def dump_json(obj) -> str:
    """json.dumps(indent=1), each list of plain numbers on one line (the router's per-request figures)."""
    return _SCALARS.sub(lambda m: re.sub(r"\s+", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]"),
                        json.dumps(obj, indent=1)) + "\n"


def start_server(run: Path, threads: int, *extra: str, log=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = launch_server([str(run), "--max-slots", str(N_CLIENTS), "--threads", str(threads), *extra], port,
                             log=log, timeout=120, poll=0.2, cwd=ROOT, env=env)
    except ServerDidNotStart as e:
        raise SystemExit(f"{e}: run `python -m serve {run}` to see why") from None
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def servers(run: Path, threads: int, configs: dict[str, list[str]], stop_s: float = 60, log_dir: Path | None = None):
    """One server per config (its extra arguments), all up together and warmed up (first forwards,
    allocations); yields ({config: url}, the model's id); every one is stopped at the end. `log_dir`: each
    server's stdout and stderr (its JSON request log; a router's includes its replicas') to log_dir/<config>.log."""
    procs, urls = [], {}
    with contextlib.ExitStack() as logs:
        try:
            for name, extra in configs.items():
                log = logs.enter_context(open(log_dir / f"{name}.log", "w")) if log_dir else None
                proc, urls[name] = start_server(run, threads, *extra, log=log)
                procs.append(proc)
            model = httpx.get(next(iter(urls.values())) + "/v1/models", timeout=10).json()["data"][0]["id"]
            for url in urls.values():
                asyncio.run(phase(url, model, True, 8))
            yield urls, model
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(stop_s)


BASIC = ("<!-- bench-serve: basic -->", "<!-- /bench-serve: basic -->")
LOAD = ("<!-- bench-serve: load -->", "<!-- /bench-serve: load -->")
ROUTER = ("<!-- bench-serve: router -->", "<!-- /bench-serve: router -->")
PREFIX = ("<!-- bench-serve: prefix -->", "<!-- /bench-serve: prefix -->")
CHUNKED = ("<!-- bench-serve: chunked -->", "<!-- /bench-serve: chunked -->")
TEXT = ("<!-- bench-serve: text -->", "<!-- /bench-serve: text -->")
PARTS = ("basic", "load", "router", "prefix", "chunked", "text")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/gpt-tiny", help="a trained run (default: `make train`'s runs/gpt-tiny)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts: {', '.join(PARTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's decoding loop")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rates", default="4,16,64", help="load: Poisson arrival rates, requests/s")
    p.add_argument("--requests", type=int, default=48, help="load, prefix: requests per rate / of the trace")
    p.add_argument("--router-requests", type=int, default=240, help="router: requests per trace (per pair)")
    p.add_argument("--router-warmup", type=int, default=0,
                   help="router: requests of each pair's trace sent first under each policy and not counted (0: the "
                        "measured trace starts with cold caches)")
    p.add_argument("--pairs", type=int, default=8,
                   help="router: pairs of runs, each one trace under every policy, the order alternating")
    p.add_argument("--policies", default=ROUTER_POLICIES,
                   help="router: the policies compared (cache_aware and round_robin; least_loaded may be added)")
    p.add_argument("--agents", type=int, default=6, help="agents (shared prefixes) of the multi-agent trace")
    p.add_argument("--trace-rate", type=float, default=12.0, help="arrivals/s of the shared-prefix trace")
    p.add_argument("--agent-tools", type=int, default=0,
                   help="router: tool definitions appended to each agent's prefix (~45 tokens each; 0: ~110-token prefixes)")
    p.add_argument("--cache-slack", type=int, default=None, help="router: the cache_aware slack (default: the server's)")
    p.add_argument("--router-log", default=None,
                   help="router: a folder for each router's log (its replicas' JSON request lines: id, ttft_s, ...)")
    p.add_argument("--prefill-chunk", type=int, default=32, help="chunked: prompt tokens per engine step")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu.md"))
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise SystemExit(f"{run}: no trained run there; train it first (`make train` writes runs/gpt-tiny)")
    command = "python bench/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    stored = json.loads(js.read_text()) if js.exists() else {}
    if "basic" in parts:
        report = basic(run, args, command)
        stored.update(report)  # the basic part's fields stay at the top level, as before
        js.write_text(dump_json(stored))
        report["json"] = js.name
        write_marked_section(out, f"{BASIC[0]}\n{markdown(report)}{BASIC[1]}\n", *BASIC)
    if "load" in parts:
        report = load_test(run, args, command)
        stored["load"] = report
        js.write_text(dump_json(stored))
        write_marked_section(out, f"{LOAD[0]}\n{load_markdown(report, js.name)}{LOAD[1]}\n", *LOAD)
    if "router" in parts:
        report = router_test(run, args, command)
        stored["router"] = report
        js.write_text(dump_json(stored))
        write_marked_section(out, f"{ROUTER[0]}\n{router_markdown(report, js.name)}{ROUTER[1]}\n", *ROUTER)
    if "prefix" in parts:
        report = prefix_test(run, args, command)
        stored["prefix"] = report
        js.write_text(dump_json(stored))
        write_marked_section(out, f"{PREFIX[0]}\n{prefix_markdown(report, js.name)}{PREFIX[1]}\n", *PREFIX)
    if "chunked" in parts:
        report = chunked_test(run, args, command)
        stored["chunked"] = report
        js.write_text(dump_json(stored))
        write_marked_section(out, f"{CHUNKED[0]}\n{chunked_markdown(report, js.name)}{CHUNKED[1]}\n", *CHUNKED)
    if "text" in parts:
        report = text_test(run, command)
        stored["text"] = report
        js.write_text(dump_json(stored))
        write_marked_section(out, f"{TEXT[0]}\n{text_markdown(report, js.name)}{TEXT[1]}\n", *TEXT)
    print(out.read_text())
    return 0


BASIC_SERVERS = {"chunked": [], "whole": ["--prefill-chunk", "0"]}  # the default (64-token steps), and off


def scheduler_burst(run: Path, threads: int, rounds: int = 4) -> dict:
    """The serving loop alone in this process (serve.scheduler, no HTTP): the 16 requests of the first part
    submitted 2 ms apart (as the 16 clients' requests arrive), with chunked prefill at the server's default
    budget and without; wall seconds until the last token, median of `rounds` alternating runs each."""
    import threading

    import torch

    from model.generate import SamplingParams
    from serve.loader import load_run
    from serve.metrics import Metrics
    from serve.scheduler import DEFAULT_PREFILL_CHUNK, Row, Scheduler

    torch.set_num_threads(threads)
    loaded = load_run(run)
    served = next(iter(loaded.models.values()))
    prompts = [served.tokenizer.encode(p).ids for p in PROMPTS]

    def burst(chunk):
        sched = Scheduler(loaded.modules, N_CLIENTS, Metrics(), prefill_chunk=chunk)
        done = threading.Semaphore(0)
        sched.start()
        start, cpu = time.perf_counter(), time.process_time()
        for i, ids in enumerate(prompts):
            sched.submit([Row(served.module_key, ids, SamplingParams(temperature=0.8, seed=i, max_new_tokens=128),
                              None, lambda o: o.finished and done.release())])
            time.sleep(0.002)
        for _ in prompts:
            done.acquire()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        sched.stop()
        return wall, cpu, sched.metrics.chunks

    walls: dict[str, list[float]] = {"chunked": [], "whole": []}
    cpus: dict[str, list[float]] = {"chunked": [], "whole": []}
    chunks = []
    for k in range(rounds + 1):  # the first round warms up
        for name, chunk in (("chunked", DEFAULT_PREFILL_CHUNK), ("whole", None)):
            wall, cpu, n = burst(chunk)
            if k:
                walls[name].append(wall)
                cpus[name].append(cpu)
                chunks += [n] if chunk else []
    # CPU seconds (this process's): the work done, much less moved than wall time by other load on the cores
    return {"walls_s": walls, "cpu_s": cpus, "median_s": {k: statistics.median(v) for k, v in walls.items()},
            "median_cpu_s": {k: statistics.median(v) for k, v in cpus.items()}, "chunk_forwards_per_burst": chunks}


def basic(run: Path, args, command: str) -> dict:
    """Both phases on two servers side by side (each alive throughout, the phases of each round alternating
    between them): the default one (chunked prefill) and one with --prefill-chunk 0 (whole prefills)."""
    load = os.getloadavg()[0]
    walls: dict[tuple[str, str], list[float]] = {}
    results: dict[tuple[str, str], list[dict]] = {}
    with servers(run, args.threads, BASIC_SERVERS) as (urls, model):
        for k in range(args.rounds):
            cfgs = list(BASIC_SERVERS) if k % 2 == 0 else list(BASIC_SERVERS)[::-1]
            for name in ("sequential", "concurrent") if k % 2 == 0 else ("concurrent", "sequential"):
                for cfg in cfgs:
                    wall, res = asyncio.run(phase(urls[cfg], model, name == "concurrent", args.max_tokens))
                    walls.setdefault((cfg, name), []).append(wall)
                    results.setdefault((cfg, name), []).extend(res)
                    print(f"round {k + 1} {cfg} {name}: {sum(r['tokens'] for r in res)} tokens in {wall:.2f} s",
                          flush=True)
    floor = engine_floor(run, args.threads)
    burst = scheduler_burst(run, args.threads)
    by_cfg = {}
    for cfg in BASIC_SERVERS:
        seq = summarise(walls[(cfg, "sequential")], results[(cfg, "sequential")], args.rounds)
        con = summarise(walls[(cfg, "concurrent")], results[(cfg, "concurrent")], args.rounds)
        by_cfg[cfg] = {"server_args": BASIC_SERVERS[cfg], "sequential": seq, "concurrent": con,
                       "throughput_ratio": statistics.median(con["output_throughput_per_round"]) / statistics.median(
                           seq["output_throughput_per_round"]),
                       "p99_tpot_vs_lone": con["p99_tpot_ms"] / seq["median_tpot_ms"]}
    # The default server's figures at the top level, as before; the whole-prefill server's under its key.
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backend": "serve (this repo)",
            "command": command, "run": str(run), "model_id": model, "max_concurrency": N_CLIENTS,
            "max_tokens": args.max_tokens, "server_threads": args.threads, "machine": cpu_name(),
            "load_average_at_start": load, **by_cfg["chunked"], "whole_prefill": by_cfg["whole"],
            "engine_alone": floor, "scheduler_alone": burst, "goals": {"throughput_ratio_min": 4.0, "p99_tpot_vs_lone_max": 2.0}}


def markdown(r: dict) -> str:
    def row(name, s):
        return (f"| {name} | {s['total_output_tokens']:,} | {s['output_throughput']:,.0f} | {s['median_ttft_ms']:.1f} | "
                f"{s['p99_ttft_ms']:.1f} | {s['median_tpot_ms']:.2f} | {s['p99_tpot_ms']:.2f} | "
                f"{s.get('p99_itl_ms', float('nan')):.2f} | {s['median_e2el_ms']:.0f} | {s['p99_e2el_ms']:.0f} |")

    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    seq, con, whole = r["sequential"], r["concurrent"], r["whole_prefill"]
    floor, burst = r["engine_alone"], r["scheduler_alone"]
    return "\n".join([
        "# Serving: 16 concurrent clients against one at a time", "",
        f"Command: `{r['command']}` (`make bench-serve`)  ",
        f"Machine: {r['machine']}, servers with {r['server_threads']} torch thread(s), {platform.system()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, 1-minute load average {r['load_average_at_start']:.1f} "
        "at the start (other processes share the CPUs)  ",
        f"Run `{r['run']}` (model `{r['model_id']}`), 16 streamed requests of ragged prompts, up to {r['max_tokens']} "
        f"new tokens each (seeded sampling, T=0.8), {seq['rounds']} rounds of each phase, interleaved, on two servers "
        "side by side: the default (chunked prefill, 64-token steps) and `--prefill-chunk 0` (whole prefills). "
        f"ITL: the gaps between a request's consecutive text chunks. Raw figures: {r['json']}.", "",
        "| server, phase | output tokens | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | "
        "ITL p99 ms | e2e p50 ms | e2e p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("chunked, one at a time", seq), row("chunked, 16 concurrent", con),
        row("whole, one at a time", whole["sequential"]), row("whole, 16 concurrent", whole["concurrent"]), "",
        f"- tokens/s, 16 concurrent / one at a time (median of rounds): **{r['throughput_ratio']:.2f}x** "
        f"(goal >= 4x: {met(r['throughput_ratio'] >= 4)}; whole prefills {whole['throughput_ratio']:.2f}x)",
        f"- p99 TPOT at 16 concurrent / a lone request's median TPOT: **{r['p99_tpot_vs_lone']:.2f}x** "
        f"(goal <= 2x: {met(r['p99_tpot_vs_lone'] <= 2)}; whole prefills {whole['p99_tpot_vs_lone']:.2f}x)",
        f"- the engine alone in one process (no server), same sampling: a decode step of 16 rows takes "
        f"{floor['step_ms_16_rows']:.2f} ms, of 1 row {floor['step_ms_1_rows']:.2f} ms: **{floor['ratio']:.2f}x**, the "
        "lowest TPOT ratio 16 clients can get here (each waits for a 16-row step per token)",
        f"- the serving loop alone (no HTTP), the 16 requests submitted 2 ms apart, median of 4: "
        f"{burst['median_s']['chunked']:.2f} s to the last token ({burst['median_cpu_s']['chunked']:.2f} CPU s) with "
        f"chunked prefill ({statistics.median(burst['chunk_forwards_per_burst']):.0f} chunk forwards), "
        f"{burst['median_s']['whole']:.2f} s ({burst['median_cpu_s']['whole']:.2f} CPU s) with whole prefills", ""])


# ---- load test: Poisson arrivals, a shared-prefix multi-agent trace; the router ---------------------------

ROLES = ["planner", "coder", "reviewer", "tester", "searcher", "writer", "critic", "summariser"]
WORDS = ["parse", "the", "config", "file", "and", "return", "a", "dict", "of", "values", "for", "each", "key",
         "check", "errors", "in", "input", "list", "sort", "by", "name", "then", "write", "output"]


def agent_prefix(a: int, tools: int = 0) -> str:
    """Agent a's system prefix (~330 characters, ~110 tokens of runs/gpt-tiny), distinct from its first line;
    `tools`: that many tool definitions of its own appended (~45 tokens each: an agent with a long system
    prompt, as agents with tool schemas have)."""
    head = (f"# agent {a}: {ROLES[a % len(ROLES)]}. Reads the task, splits it into steps and hands each step "
            f"to a worker.\nimport json\nimport os\n\nTOOLS = {{'search': search, 'read': read_file, 'write': "
            f"write_file}}\n\ndef plan_{a}(task, memory):\n    steps = []\n    for line in task.splitlines():\n"
            f"        if line.strip():\n            steps.append(line)\n    return steps\n")
    return head + "".join(
        f"\ndef tool_{a}_{j}(path, {WORDS[(a + j) % len(WORDS)]}):\n    \"\"\"{WORDS[(a * 7 + j) % len(WORDS)]} the "
        f"{WORDS[(a + 3 * j) % len(WORDS)]} and return a dict.\"\"\"\n    return read_file(path).get({j})\n"
        for j in range(tools))


def basic_requests(n: int, max_tokens: int) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i} for i in range(n)]


def trace_requests(n: int, agents: int, seed: int = 0, first_agent: int = 0, tools: int = 0) -> list[dict]:
    """The multi-agent trace: each request from a random agent (numbered first_agent, first_agent + 1, ...),
    its prefix (with `tools` tool definitions) plus one turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = first_agent + rng.randrange(agents)
        turn = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        out.append({"prompt": f"{agent_prefix(a, tools)}\n# turn {i}: {turn}\n", "max_tokens": 32, "seed": i, "agent": a})
    return out


async def poisson_run(url: str, model: str, reqs: list[dict], rate: float, seed: int = 0) -> tuple[float, list[dict]]:
    """Send `reqs` with exponential inter-arrival times of mean 1/rate (all at once when rate is inf)."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        t0 = time.perf_counter()
        tasks, at = [], 0.0
        for req in reqs:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed_request(client, url, model, req, t0)))
            at += rng.expovariate(rate) if rate != float("inf") else 0.0
        results = await asyncio.gather(*tasks)
        return time.perf_counter() - t0, list(results)


def stats(wall: float, results: list[dict], rate: float | None = None) -> dict:
    """vllm bench serve's fields (milliseconds)."""
    tokens = sum(r["tokens"] for r in results)
    out = {"request_rate": rate, "num_prompts": len(results), "duration": wall, "completed": len(results),
           "total_output_tokens": tokens, "request_throughput": len(results) / wall, "output_throughput": tokens / wall}
    return {**out, **latency_fields(results)}


def load_test(run: Path, args, command: str) -> dict:
    load = os.getloadavg()[0]
    rates = [float(r) for r in args.rates.split(",")]
    with servers(run, args.threads, {"server": []}) as (urls, model):
        url = urls["server"]
        poisson = []
        for rate in rates:
            wall, res = asyncio.run(poisson_run(url, model, basic_requests(args.requests, 64), rate))
            poisson.append(stats(wall, res, rate))
            print(f"poisson {rate}/s: {poisson[-1]['output_throughput']:.0f} tokens/s", flush=True)
        wall, res = asyncio.run(poisson_run(url, model, trace_requests(args.requests, args.agents), args.trace_rate))
        trace = stats(wall, res, args.trace_rate)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "run": str(run),
            "model_id": model, "machine": cpu_name(), "server_threads": args.threads, "load_average_at_start": load,
            "max_tokens": 64, "poisson": poisson, "shared_prefix_trace": {"agents": args.agents, **trace}}


ROUTER_POLICIES = "cache_aware,round_robin"  # --policies: the goals' subject and baseline (least_loaded may join)
SUBJECT, BASELINE = "cache_aware", "round_robin"


def pair_orders(pairs: int, policies: list[str]) -> list[list[str]]:
    """The order of the policies in each pair: rotated by one each pair (A B, B A, ...; A B C, B C A, C A B, ...),
    so that over len(policies) pairs each policy runs in every position once and a drift of the machine's
    load weighs on all of them."""
    n = len(policies)
    return [[policies[(k + i) % n] for i in range(n)] for k in range(pairs)]


def annotate(res: list[dict], reqs: list[dict], history: list[dict] = ()) -> None:
    """Per request of one run (in place): its `agent`; `queue`, the other requests in flight on its replica
    when it was sent; `cold`, whether no earlier request of its agent on that replica had its first token
    before it was sent. The engine stores a prompt's prefix blocks after its prefill, so a cold request found
    no copy of its agent's prefix in its replica's cache (barring eviction): a cache miss, seen from the client.
    `history`: earlier requests on the same servers (annotated, times on the same clock), e.g. a warm-up."""
    for req, r in zip(reqs, res):
        r["agent"] = req["agent"]
    for r in res:
        same = [o for o in [*history, *res] if o is not r and o["replica"] == r["replica"]]
        r["queue"] = sum(1 for o in same if o["start"] <= r["start"] < o["end"])
        r["cold"] = not any(o["agent"] == r["agent"] and o["start"] + o["ttft"] <= r["start"] for o in same)


def run_stats(r: dict, rate: float, replicas: int = 3) -> dict:
    """One policy's figures over `r` = {"wall", "results", "lookups", "hits", "spills"} (one run, or several
    pooled: walls and counts summed, results concatenated): vllm bench serve's fields, the router's prefix hits,
    and each replica's mean requests in flight (its requests' e2e seconds / the wall seconds)."""
    res, wall = r["results"], r["wall"]
    busy = [sum(x["e2e"] for x in res if x["replica"] == i) / wall for i in range(replicas)]
    get = lambda k: r.get(k, 0)  # noqa: E731  (made-up runs in the tests may lack the newer counters)
    return {**stats(wall, res, rate), "prefix_lookups": r["lookups"], "prefix_hits": r["hits"],
            "prefix_hit_rate": r["hits"] / r["lookups"] if r["lookups"] else 0.0, "spills": r["spills"],
            "spills_to_holder": get("spills_to_holder"),
            "replica_cache": {k: get(f"cache_{k}") for k in CACHE_COUNTS},
            "replica_cache_hit_rate": get("cache_hits") / get("cache_lookups") if get("cache_lookups") else None,
            "replica_cache_token_hit_rate": (get("cache_hit_tokens") / get("cache_prompt_tokens")
                                             if get("cache_prompt_tokens") else None),
            "mean_in_flight_per_replica": busy,
            "routed_per_replica": [sum(1 for x in res if x["replica"] == i) for i in range(replicas)],
            "in_flight_ratio": max(busy) / min(busy) if min(busy) > 0 else float("inf"),
            "cold_requests": sum(1 for x in res if x["cold"])}


def ttft_breakdown(res: list[dict]) -> dict:
    """Where one policy's TTFT comes from (see annotate): warm and cold requests apart, the queue each found on
    its replica, and the slowest 1% (TTFT >= the p99): how many of those were cold, what queue they found."""
    ms = lambda rs: [x["ttft"] * 1000 for x in rs]  # noqa: E731
    warm, cold = [x for x in res if not x["cold"]], [x for x in res if x["cold"]]
    p99 = percentile(ms(res), 99)
    tail = [x for x in res if x["ttft"] * 1000 >= p99]
    part = lambda rs: ({"requests": len(rs), "median_ttft_ms": statistics.median(ms(rs)),  # noqa: E731
                        "p99_ttft_ms": percentile(ms(rs), 99)} if rs else {"requests": 0})
    by_queue = {}
    for q in range(4):
        rs = [x for x in res if min(x["queue"], 3) == q]
        if rs:
            by_queue[f"{q}+" if q == 3 else str(q)] = part(rs)
    return {"warm": part(warm), "cold": part(cold), "cold_share": len(cold) / len(res),
            "mean_queue": statistics.mean(x["queue"] for x in res), "by_queue": by_queue,
            "tail": {"requests": len(tail), "cold": sum(1 for x in tail if x["cold"]),
                     "mean_queue": statistics.mean(x["queue"] for x in tail)}}


def router_summary(pairs: list[dict], policies: list[str], rate: float, replicas: int = 3) -> dict:
    """The figures of the pairs (each {"order", ..., "runs": {policy: {"wall", "results", "lookups", "hits",
    "spills"}}}, results annotated): per pair each policy's run_stats and its ratios to round-robin's; per policy
    the pooled figures over every pair's requests; the ratios to round-robin per pair, their median and pooled.
    The headline p99 TTFT ratio is the median of the pairs' ratios (each pair: one trace, both policies)."""
    out_pairs = []
    for p in pairs:
        entry = {k: v for k, v in p.items() if k != "runs"}
        entry.update({pol: run_stats(p["runs"][pol], rate, replicas) for pol in policies})
        base = entry[BASELINE]
        for pol in policies:
            if pol != BASELINE:
                entry[f"{pol}_vs_round_robin"] = {
                    "p99_ttft": entry[pol]["p99_ttft_ms"] / base["p99_ttft_ms"],
                    "hit_rate": entry[pol]["prefix_hit_rate"] / base["prefix_hit_rate"] if base["prefix_hit_rate"] else None}
        out_pairs.append(entry)
    pooled, requests = {}, {}
    for pol in policies:
        runs = [p["runs"][pol] for p in pairs]
        res = [x for r in runs for x in r["results"]]
        pooled[pol] = {**run_stats({"wall": sum(r["wall"] for r in runs), "results": res,
                                    **{k: sum(r.get(k, 0) for r in runs)
                                       for k in (*ROUTER_COUNTS, *(f"cache_{c}" for c in CACHE_COUNTS))}}, rate, replicas),
                       "in_flight_ratio_per_pair": [e[pol]["in_flight_ratio"] for e in out_pairs],
                       "ttft_breakdown": ttft_breakdown(res)}
        requests[pol] = {"pair": [k for k, r in enumerate(runs) for _ in r["results"]],
                         "ttft_ms": [round(x["ttft"] * 1000, 2) for x in res], "replica": [x["replica"] for x in res],
                         "agent": [x["agent"] for x in res], "queue": [x["queue"] for x in res],
                         "cold": [int(x["cold"]) for x in res],
                         **({"id": [x["id"] for x in res]} if all(x.get("id") for x in res) else {})}
    base = pooled[BASELINE]
    vs = {}
    for pol in policies:
        if pol == BASELINE:
            continue
        per_pair = [e[f"{pol}_vs_round_robin"]["p99_ttft"] for e in out_pairs]
        p, bw, pw = pooled[pol], base["ttft_breakdown"]["warm"], pooled[pol]["ttft_breakdown"]["warm"]
        vs[pol] = {"p99_ttft_per_pair": per_pair, "p99_ttft_median_of_pairs": statistics.median(per_pair),
                   "p99_ttft_pooled": p["p99_ttft_ms"] / base["p99_ttft_ms"],
                   "median_ttft_pooled": p["median_ttft_ms"] / base["median_ttft_ms"],
                   "warm_p99_ttft_pooled": pw["p99_ttft_ms"] / bw["p99_ttft_ms"] if pw["requests"] and bw["requests"] else None,
                   "hit_rate_per_pair": [e[f"{pol}_vs_round_robin"]["hit_rate"] for e in out_pairs],
                   "hit_rate_pooled": p["prefix_hit_rate"] / base["prefix_hit_rate"] if base["prefix_hit_rate"] else None,
                   "replica_cache_hit_rate_pooled": (p["replica_cache_hit_rate"] / base["replica_cache_hit_rate"]
                                                     if p["replica_cache_hit_rate"] is not None and base["replica_cache_hit_rate"] else None),
                   "replica_cache_token_hit_rate_pooled": (
                       p["replica_cache_token_hit_rate"] / base["replica_cache_token_hit_rate"]
                       if p["replica_cache_token_hit_rate"] is not None and base["replica_cache_token_hit_rate"] else None)}
    ca = vs[SUBJECT]
    return {"pairs": out_pairs, "policies": pooled, "vs_round_robin": vs,
            "hit_rate_vs_round_robin": ca["hit_rate_pooled"], "p99_ttft_vs_round_robin": ca["p99_ttft_median_of_pairs"],
            "p99_ttft_vs_round_robin_per_pair": ca["p99_ttft_per_pair"],
            "p99_ttft_vs_round_robin_pooled": ca["p99_ttft_pooled"],
            "in_flight_ratio": pooled[SUBJECT]["in_flight_ratio"],
            "in_flight_ratio_median_of_pairs": statistics.median(pooled[SUBJECT]["in_flight_ratio_per_pair"]),
            "requests": requests}


ROUTER_COUNTS = ("lookups", "hits", "spills", "spills_to_holder")  # the router's /health prefix_* counters
CACHE_COUNTS = ("lookups", "hits", "prompt_tokens", "hit_tokens")  # the replicas' serve_prefix_cache_*_total


def cache_counts(metrics: str) -> dict:
    """The replicas' own prefix-cache counters in a router's /metrics text, summed over replicas (the router
    relabels each replica's serve_prefix_cache_*_total with `replica`): what their caches really held,
    evictions included."""
    return {k: sum(float(v) for v in re.findall(rf"^serve_prefix_cache_{k}_total\{{[^}}]*\}} (\S+)$", metrics, re.M))
            for k in CACHE_COUNTS}


def replica_cache(url: str) -> dict:
    return cache_counts(httpx.get(url + "/metrics", timeout=10).text)


def regime(run: Path, agents: int, tools: int = 0, slots: int = N_CLIENTS) -> dict:
    """How the trace's agents' prefixes compare with one replica's prefix cache (serving's default budget:
    slots x the model's context, in 16-token blocks): the whole 16-token blocks each agent's prefix fills."""
    import yaml
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    context = yaml.safe_load((run / "config.yaml").read_text())["model"]["max_seq_len"]
    tokens = [len(tok.encode(agent_prefix(a, tools)).ids) for a in range(agents)]
    blocks = sum(t // 16 for t in tokens)
    cache = slots * context // 16
    return {"prefix_tokens_mean": statistics.mean(tokens), "prefix_blocks_all_agents": blocks,
            "cache_blocks_per_replica": cache, "prefixes_vs_one_cache": blocks / cache}


def router_test(run: Path, args, command: str) -> dict:
    """Every policy's router (3 replicas each) up throughout, side by side; --pairs pairs, each one trace
    (seed k: agents' turns and Poisson arrival times) run once under every policy, the order alternating
    between pairs. Pair k's agents are numbered from k * agents: prefixes no replica has seen, so each pair
    starts with cold caches and a cold router index, as on fresh servers."""
    policies = args.policies.split(",")
    if SUBJECT not in policies or BASELINE not in policies or len(set(policies)) != len(policies):
        raise SystemExit(f"--policies: {SUBJECT} and {BASELINE}, each once (and least_loaded if wanted)")
    load = os.getloadavg()
    slack = ["--cache-slack", str(args.cache_slack)] if args.cache_slack else []
    configs = {pol: ["--replicas", "3", "--policy", pol, *slack] for pol in policies}
    pairs = []
    # (the warm-up's prompts are no agent's prefix)
    log_dir = Path(args.router_log) if args.router_log else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    with servers(run, 1, configs, stop_s=120, log_dir=log_dir) as (urls, model):
        for k, order in enumerate(pair_orders(args.pairs, policies)):
            reqs = trace_requests(args.router_warmup + args.router_requests, args.agents, seed=k,
                                  first_agent=k * args.agents, tools=args.agent_tools)
            warm, reqs = reqs[:args.router_warmup], reqs[args.router_warmup:]
            pair = {"order": order, "seed": k, "first_agent": k * args.agents, "load_average": os.getloadavg()[0],
                    "runs": {}}
            for pol in order:
                url = urls[pol]
                history = []
                if warm:  # not counted: the caches and the router's index warm, then the measured trace
                    t_warm = time.perf_counter()
                    history = asyncio.run(poisson_run(url, model, warm, args.trace_rate, seed=1000 + k))[1]
                    annotate(history, warm)
                before, cache0 = httpx.get(url + "/health", timeout=10).json(), replica_cache(url)
                t_run = time.perf_counter()
                wall, res = asyncio.run(poisson_run(url, model, reqs, args.trace_rate, seed=k))
                after, cache1 = httpx.get(url + "/health", timeout=10).json(), replica_cache(url)
                for h in history:  # onto the measured run's clock
                    h["start"], h["end"] = h["start"] + t_warm - t_run, h["end"] + t_warm - t_run
                annotate(res, reqs, history)
                if not log_dir:  # a request's id serves only to find it in the logs
                    for x in res:
                        x.pop("id", None)
                run_ = pair["runs"][pol] = {
                    "wall": wall, "results": res,
                    **{k2: after.get(f"prefix_{k2}", 0) - before.get(f"prefix_{k2}", 0) for k2 in ROUTER_COUNTS},
                    **{f"cache_{k2}": cache1[k2] - cache0[k2] for k2 in CACHE_COUNTS}}
                s = latency_fields(res)
                print(f"router pair {k + 1}/{args.pairs} {pol}: hits {run_['hits']}/{run_['lookups']} "
                      f"(spills {run_['spills']}, to a holder {run_['spills_to_holder']}), replica cache hits "
                      f"{run_['cache_hits']}/{run_['cache_lookups']}, TTFT p50 {s['median_ttft_ms']:.1f} "
                      f"p99 {s['p99_ttft_ms']:.1f} ms", flush=True)
            pairs.append(pair)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "run": str(run),
            "machine": cpu_name(), "replicas": 3, "replica_threads": 1, "agents": args.agents,
            "rate": args.trace_rate, "cache_slack": args.cache_slack, "requests_per_trace": args.router_requests,
            "num_pairs": args.pairs, "policy_order": policies, "load_average_at_start": load[0],
            "agent_tools": args.agent_tools, "warmup_requests": args.router_warmup,
            "regime": regime(run, args.agents, args.agent_tools),
            "load_averages_at_start": list(load), "load_averages_at_end": list(os.getloadavg()),
            **router_summary(pairs, policies, args.trace_rate),
            "goals": {"hit_rate_vs_round_robin_min": 2.0, "p99_ttft_vs_round_robin_max": 0.5, "in_flight_ratio_max": 1.5}}


def _row(name: str, s: dict) -> str:
    return (f"| {name} | {s['num_prompts']} | {s['total_output_tokens']:,} | {s['output_throughput']:,.0f} | "
            f"{s['median_ttft_ms']:.1f} | {s['p99_ttft_ms']:.1f} | {s['median_tpot_ms']:.2f} | {s['p99_tpot_ms']:.2f} | "
            f"{s['median_e2el_ms']:.0f} | {s['p99_e2el_ms']:.0f} |")


HEADER = ["| | requests | output tokens | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | "
          "e2e p50 ms | e2e p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


def load_markdown(r: dict, json_name: str) -> str:
    t = r["shared_prefix_trace"]
    return "\n".join([
        "# Serving under load: Poisson arrivals and a shared-prefix multi-agent trace", "",
        f"Command: `{r['command']}` (`make bench-serve ARGS=\"--parts load\"`)  ",
        f"Machine: {r['machine']}, {os.cpu_count()} CPUs shared (1-minute load average {r['load_average_at_start']:.1f} "
        f"at the start), one server with {r['server_threads']} torch thread(s), 16 KV slots. Run `{r['run']}`. "
        f"Streamed requests, seeded sampling at T=0.8. Raw figures: {json_name} (`load`).", "",
        f"Poisson arrivals: the 16 ragged prompts of the first section in turn, up to {r['max_tokens']} new tokens.", "",
        *HEADER, *(_row(f"{s['request_rate']:g} req/s", s) for s in r["poisson"]), "",
        f"Shared-prefix trace: {t['agents']} agents, each request one agent's ~330-character (~110-token) system "
        f"prefix plus a 4-12 word turn, up to 32 new tokens, Poisson at {t['request_rate']:g} req/s.", "",
        *HEADER, _row("trace", t), ""])


def router_markdown(r: dict, json_name: str) -> str:
    pols = list(r["policies"])
    others = [p for p in pols if p != BASELINE]
    ca, rr = r["policies"][SUBJECT], r["policies"][BASELINE]
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    hit_ratio, p99r, per_pair = r["hit_rate_vs_round_robin"], r["p99_ttft_vs_round_robin"], r["p99_ttft_vs_round_robin_per_pair"]
    n = r["num_pairs"]
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    loads = r["load_averages_at_start"], r["load_averages_at_end"]
    pair_rows = [
        f"| {k + 1} | {' '.join(e['order'])} | {e['load_average']:.1f} | "
        + " | ".join(f"{e[p]['median_ttft_ms']:.1f} / {e[p]['p99_ttft_ms']:.1f}" for p in pols) + " | "
        + " | ".join(f"{e[f'{p}_vs_round_robin']['p99_ttft']:.2f}x" for p in others) + " | "
        + " | ".join(f"{e[p]['prefix_hit_rate']:.2f}" for p in pols) + " | "
        + " | ".join(f"{e[p]['in_flight_ratio']:.2f}x" for p in pols) + " |"
        for k, e in enumerate(r["pairs"])]

    def why_row(name, b):
        w, c, t = b["warm"], b["cold"], b["tail"]
        cold = f"{c['median_ttft_ms']:.1f} / {c['p99_ttft_ms']:.1f}" if c["requests"] else "-"
        warm = f"{w['median_ttft_ms']:.1f} / {w['p99_ttft_ms']:.1f}" if w["requests"] else "-"
        q = ", ".join(f"{k}: {v['median_ttft_ms']:.1f} / {v['p99_ttft_ms']:.1f} ({v['requests']})"
                      for k, v in b["by_queue"].items())
        return (f"| {name} | {c['requests']} ({b['cold_share']:.0%}) | {warm} | {cold} | {b['mean_queue']:.2f} | {q} | "
                f"{t['cold']} of {t['requests']}, {t['mean_queue']:.1f} |")

    g = r.get("regime")
    fits = (f"The {r['agents']} agents' prefixes (~{g['prefix_tokens_mean']:.0f} tokens each) fill "
            f"{g['prefix_blocks_all_agents']} whole 16-token blocks: {g['prefixes_vs_one_cache']:.2f}x one replica's "
            f"prefix cache ({g['cache_blocks_per_replica']} blocks, serving's default budget of 16 slots x the "
            f"model's context) and {g['prefixes_vs_one_cache'] / 3:.2f}x the 3 replicas' together, before the "
            "blocks of each request's own turn and answer. " if g else "")
    rate = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [
        f"# Router: 3 replicas, cache-aware against round-robin on the shared-prefix trace ({r['agents']} agents)", "",
        f"Command: `{r['command']}` (`make bench-serve ARGS=\"--parts router\"`)  ",
        f"Machine: {r['machine']}, {os.cpu_count()} CPUs shared by the routers, their replicas (1 torch thread each) "
        f"and the clients (load averages 1/5/15 min: {fmt(loads[0])} at the start, {fmt(loads[1])} at the end). "
        f"Run `{r['run']}`, the shared-prefix trace of the load section with {r['agents']} agents (each request one "
        f"agent's ~{g['prefix_tokens_mean'] if g else 110:.0f}-token prefix"
        + (f" ({r['agent_tools']} tool definitions appended to the usual ~110 tokens)" if r.get("agent_tools") else "")
        + f" plus a turn, up to 32 new tokens), {r['requests_per_trace']} requests per trace, Poisson at "
        f"{r['rate']:g} req/s. {fits}One router per policy ({', '.join(pols)}; 3 replicas each, cache slack "
        f"{r['cache_slack'] or 'the default'}), all up throughout; {n} pairs, each one trace (its own seed and its "
        f"own {r['agents']} agents: prefixes no replica has cached when the pair starts) run under every policy "
        "with the same requests and arrival times, the order alternating between pairs"
        + (f"; under each policy the trace's first {r['warmup_requests']} requests are sent first and not counted "
           "(the caches and the router's index warm: the measured requests see a server in its steady state)"
           if r.get("warmup_requests") else "") + ". Raw figures, with every "
        f"request's TTFT, replica, queue and cold flag: {json_name} (`router`).", "",
        f"Pooled over the {n} pairs ({ca['num_prompts']} requests per policy):", "",
        *HEADER, *(_row(p, r["policies"][p]) for p in pols), "",
        "| | prefix hits (router) | hit rate | spills (to a holder) | replicas' caches: prompts with a hit | prompt "
        "tokens from the caches | requests per replica | mean in flight per replica | busiest / least busy (pooled; "
        "per pair median, max) |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|",
        *(f"| {p} | {s['prefix_hits']} / {s['prefix_lookups']} | {s['prefix_hit_rate']:.2f} | {s['spills']} "
          f"({s.get('spills_to_holder', 0)}) | {rate(s.get('replica_cache_hit_rate'))} | "
          f"{rate(s.get('replica_cache_token_hit_rate'))} | "
          f"{', '.join(map(str, s['routed_per_replica']))} | {', '.join(f'{b:.2f}' for b in s['mean_in_flight_per_replica'])} | "
          f"{s['in_flight_ratio']:.2f}x; {statistics.median(s['in_flight_ratio_per_pair']):.2f}x, "
          f"{max(s['in_flight_ratio_per_pair']):.2f}x |" for p, s in r["policies"].items()), "",
        "Per pair (TTFT in ms):", "",
        "| pair | order | load | " + " | ".join(f"{p} TTFT p50 / p99" for p in pols) + " | "
        + " | ".join(f"{p} / round_robin p99" for p in others) + " | "
        + " | ".join(f"{p} hit rate" for p in pols) + " | " + " | ".join(f"{p} busiest / least" for p in pols) + " |",
        "|---|---|---:|" + "---:|" * (3 * len(pols) + len(others)), *pair_rows, "",
        "Where the TTFT comes from, pooled: a *cold* request is one whose replica had not yet finished a prefill "
        "of its agent when it was sent (so its prefix was not in that replica's cache: a miss); *queue*: the "
        "requests already in flight on its replica when it was sent (from each request's `x-replica`, send and "
        "end times).", "",
        "| | cold requests | warm TTFT p50 / p99 ms | cold TTFT p50 / p99 ms | mean queue | TTFT p50 / p99 ms by queue "
        "(requests) | slowest 1%: cold, mean queue |", "|---|---:|---:|---:|---:|---|---:|",
        *(why_row(p, r["policies"][p]["ttft_breakdown"]) for p in pols), "",
        f"- prefix-hit rate, cache-aware / round-robin, pooled: **{hit_ratio:.2f}x** (goal >= 2x: {met(hit_ratio >= 2)}; "
        f"per pair {fmt(r['vs_round_robin'][SUBJECT]['hit_rate_per_pair'])})"
        if hit_ratio is not None else "- prefix-hit rate of round-robin: 0 (no ratio)",
        f"- the replicas' own prefix caches (serve_prefix_cache_*_total, evictions included), cache-aware / "
        f"round-robin, pooled: prompts with a hit **{rate(r['vs_round_robin'][SUBJECT].get('replica_cache_hit_rate_pooled'))}x** "
        f"({rate(ca.get('replica_cache_hit_rate'))} against {rate(rr.get('replica_cache_hit_rate'))}), prompt tokens "
        f"from the cache {rate(r['vs_round_robin'][SUBJECT].get('replica_cache_token_hit_rate_pooled'))}x",
        f"- p99 TTFT, cache-aware / round-robin: median of the {n} pairs' ratios **{p99r:.2f}x** (goal <= 0.5x: "
        f"{met(p99r <= 0.5)}); per pair {fmt(per_pair)} ({sum(x <= 0.5 for x in per_pair)} of {n} <= 0.5x, "
        f"{sum(x < 1 for x in per_pair)} of {n} < 1x); pooled p99 **{r['p99_ttft_vs_round_robin_pooled']:.2f}x** "
        f"({ca['p99_ttft_ms']:.1f} against {rr['p99_ttft_ms']:.1f} ms); median TTFT pooled "
        f"{r['vs_round_robin'][SUBJECT]['median_ttft_pooled']:.2f}x",
        f"- p99 TTFT of the warm requests alone (prefix in the replica's cache), cache-aware / round-robin, pooled: "
        f"**{r['vs_round_robin'][SUBJECT]['warm_p99_ttft_pooled']:.2f}x**"
        if r["vs_round_robin"][SUBJECT]["warm_p99_ttft_pooled"] is not None else "- no warm requests",
        f"- busiest / least-busy replica's mean requests in flight, cache-aware: pooled **{r['in_flight_ratio']:.2f}x**, "
        f"median of pairs {r['in_flight_ratio_median_of_pairs']:.2f}x (goal <= 1.5x: {met(r['in_flight_ratio'] <= 1.5)}; "
        f"round-robin pooled {rr['in_flight_ratio']:.2f}x)",
        *(f"- {p} / round-robin: p99 TTFT median of pairs {v['p99_ttft_median_of_pairs']:.2f}x (per pair "
          f"{fmt(v['p99_ttft_per_pair'])}), pooled {v['p99_ttft_pooled']:.2f}x; hit rate {v['hit_rate_pooled']:.2f}x"
          for p, v in r["vs_round_robin"].items() if p != SUBJECT), ""]
    return "\n".join(lines)


def prefix_test(run: Path, args, command: str) -> dict:
    """The engine alone on the shared-prefix trace's prompts (see the module docstring): per request one
    prefill, timed, then its release (the cache keeps the prompt's blocks), cache off and on in turn."""
    import torch

    from model.generate import DecodeEngine, SamplingParams
    from serve.loader import load_run

    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    loaded = load_run(run)
    served = next(iter(loaded.models.values()))
    module = loaded.modules[served.module_key]
    prompts = [served.tokenizer.encode(r["prompt"]).ids for r in trace_requests(args.requests, args.agents)]
    params = SamplingParams(temperature=0.8, seed=0, max_new_tokens=1)
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "run": str(run),
           "machine": cpu_name(), "threads": args.threads, "load_average_at_start": load, "agents": args.agents,
           "requests": len(prompts), "mean_prompt_tokens": statistics.mean(map(len, prompts)), "cache": {}}
    for k in range(2):  # the first pass warms up allocations and kernels
        for on in (False, True):
            engine = DecodeEngine(module, max_slots=N_CLIENTS, prefix_cache=on)
            times = []
            for ids in prompts:
                start = time.perf_counter()
                slot = engine.prefill([ids], params=params)[0].slot
                times.append((time.perf_counter() - start) * 1000)
                engine.release(slot)
            if k == 1:
                out["cache"]["on" if on else "off"] = {
                    "median_prefill_ms": statistics.median(times), "p99_prefill_ms": percentile(times, 99),
                    "mean_prefill_ms": statistics.mean(times), "prefix": engine.prefix_stats()}
    # The cost where nothing is shared: the first part's 16 ragged prompts continuously batched to 128 new
    # tokens each (no end of text), cache off and on alternately; median wall time of 4 after a warm-up.
    ragged = [served.tokenizer.encode(p).ids for p in PROMPTS]
    sampling = [SamplingParams(temperature=0.8, seed=i, max_new_tokens=128) for i in range(N_CLIENTS)]
    walls: dict[bool, list[float]] = {False: [], True: []}
    for k in range(5):
        for on in (False, True):
            engine = DecodeEngine(module, max_slots=N_CLIENTS, prefix_cache=on)
            start = time.perf_counter()
            engine.generate(ragged, sampling)
            if k:
                walls[on].append(time.perf_counter() - start)
    out["unshared"] = {"off_s": statistics.median(walls[False]), "on_s": statistics.median(walls[True]),
                       "tokens": N_CLIENTS * 128}
    off, on = out["cache"]["off"], out["cache"]["on"]
    out["p99_prefill_on_vs_off"] = on["p99_prefill_ms"] / off["p99_prefill_ms"]
    out["median_prefill_on_vs_off"] = on["median_prefill_ms"] / off["median_prefill_ms"]
    return out


def chunked_test(run: Path, args, command: str) -> dict:
    """The engine alone (see the module docstring): token gaps with whole and with chunked prefills,
    5 alternating rounds after a warm-up, the median of each round's figures."""
    import torch

    from model.generate import DecodeEngine, SamplingParams
    from serve.loader import load_run

    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    loaded = load_run(run)
    served = next(iter(loaded.models.values()))
    module = loaded.modules[served.module_key]
    longs = [served.tokenizer.encode(r["prompt"]).ids for r in trace_requests(N_CLIENTS, args.agents)]
    shorts = [served.tokenizer.encode(p).ids for p in PROMPTS]
    prompts = [p for pair in zip(shorts, longs) for p in pair]
    params = [SamplingParams(temperature=0.8, seed=i, max_new_tokens=64 if i % 2 == 0 else 16)
              for i in range(len(prompts))]

    def gaps(chunk):
        engine = DecodeEngine(module, max_slots=8)
        last: dict[int, float] = {}
        out: list[float] = []
        start = time.perf_counter()
        for i, _ in engine.stream(prompts, params, prefill_chunk=chunk):
            t = time.perf_counter()
            if i in last:
                out.append((t - last[i]) * 1000)
            last[i] = t
        return {"p50_gap_ms": percentile(out, 50), "p99_gap_ms": percentile(out, 99), "max_gap_ms": max(out),
                "wall_s": time.perf_counter() - start}

    rounds: dict[str, list[dict]] = {"whole": [], "chunked": []}
    for k in range(6):
        for name, chunk in (("whole", None), ("chunked", args.prefill_chunk)):
            g = gaps(chunk)
            if k:
                rounds[name].append(g)
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in rounds.items()}
    served = served_chunked(run, args)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "run": str(run),
            "machine": cpu_name(), "threads": args.threads, "load_average_at_start": load, "slots": 8,
            "prefill_chunk": args.prefill_chunk, "mean_long_prompt_tokens": statistics.mean(map(len, longs)),
            "rounds": rounds, "median": med,
            "p99_gap_chunked_vs_whole": med["chunked"]["p99_gap_ms"] / med["whole"]["p99_gap_ms"], "served": served}


MIXED_RATE = 24.0  # requests/s of the served mixed workload


def mixed_requests(n: int, agents: int) -> list[dict]:
    """Short prompts with 64 new tokens interleaved with the trace's long prompts (16 new tokens)."""
    longs = trace_requests(n // 2, agents)
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append({"prompt": PROMPTS[(i // 2) % len(PROMPTS)], "max_tokens": 64, "seed": i, "long": False})
        else:
            out.append({**longs[i // 2], "max_tokens": 16, "seed": i, "long": True})
    return out


def served_chunked(run: Path, args) -> dict:
    """Two servers side by side, the default (chunked prefill, --prefill-chunk 64) and --prefill-chunk 0, both
    with --no-prefix-cache (the trace's prompts would mostly hit it, leaving little to chunk): the
    mixed workload (32 requests, Poisson at MIXED_RATE req/s) on each in turn, --rounds alternating rounds; per
    server the figures over every request of every round (the long prompts' TTFT on its own)."""
    reqs = mixed_requests(32, args.agents)
    res: dict[str, list[dict]] = {"chunked": [], "whole": []}
    configs = {cfg: [*extra, "--no-prefix-cache"] for cfg, extra in BASIC_SERVERS.items()}  # long prompts in full
    with servers(run, args.threads, configs) as (urls, model):
        for k in range(args.rounds):
            for cfg in list(BASIC_SERVERS) if k % 2 == 0 else list(BASIC_SERVERS)[::-1]:
                _, out = asyncio.run(poisson_run(urls[cfg], model, reqs, MIXED_RATE, seed=k))
                for req, r in zip(reqs, out):
                    r["long"] = req["long"]
                res[cfg].extend(out)
                print(f"served mixed, round {k + 1} {cfg}: p99 ITL {latency_fields(out)['p99_itl_ms']:.1f} ms", flush=True)
    out = {"requests": len(reqs), "rate": MIXED_RATE, "rounds": args.rounds}
    for cfg, rs in res.items():
        longs = [r["ttft"] * 1000 for r in rs if r["long"]]
        out[cfg] = {**latency_fields(rs), "long_median_ttft_ms": statistics.median(longs),
                    "long_p99_ttft_ms": percentile(longs, 99)}
    out["p99_itl_chunked_vs_whole"] = out["chunked"]["p99_itl_ms"] / out["whole"]["p99_itl_ms"]
    out["p99_tpot_chunked_vs_whole"] = out["chunked"]["p99_tpot_ms"] / out["whole"]["p99_tpot_ms"]
    return out


def chunked_markdown(r: dict, json_name: str) -> str:
    rows = [f"| {name} | {m['p50_gap_ms']:.2f} | {m['p99_gap_ms']:.2f} | {m['max_gap_ms']:.1f} | {m['wall_s']:.2f} |"
            for name, m in (("whole prompts", r["median"]["whole"]),
                            (f"chunks of {r['prefill_chunk']} tokens", r["median"]["chunked"]))]
    return "\n".join([
        "# Chunked prefill: the engine's token gaps while long prompts join", "",
        f"Command: `{r['command']}` (`make bench-serve ARGS=\"--parts chunked\"`)  ",
        f"Machine: {r['machine']}, {os.cpu_count()} CPUs shared (1-minute load average {r['load_average_at_start']:.1f} "
        f"at the start), {r['threads']} torch thread(s). Run `{r['run']}`, first the engine alone (no HTTP): 8 slots, the 16 ragged prompts (64 new tokens) interleaved with 16 trace prompts of "
        f"{r['mean_long_prompt_tokens']:.0f} tokens on average (16 new tokens), seeded sampling; gaps between a "
        f"request's consecutive tokens, median of 5 rounds (whole and chunked alternating). Raw figures: {json_name} "
        "(`chunked`).", "",
        "| prefill | gap p50 ms | gap p99 ms | gap max ms | wall s |", "|---|---:|---:|---:|---:|", *rows, "",
        f"- p99 gap, chunked / whole: **{r['p99_gap_chunked_vs_whole']:.2f}x**", "", *served_markdown(r["served"])])


def served_markdown(sv: dict) -> list[str]:
    def row(name, m):
        return (f"| {name} | {m['median_tpot_ms']:.2f} | {m['p99_tpot_ms']:.2f} | {m['p99_itl_ms']:.1f} | "
                f"{m['max_itl_ms']:.1f} | {m['long_median_ttft_ms']:.1f} | {m['long_p99_ttft_ms']:.1f} | "
                f"{m['median_e2el_ms']:.0f} |")

    return [
        f"Served (two servers side by side, 16 KV slots each, `--no-prefix-cache` so that each long prompt is computed "
        f"in full): {sv['requests']} streamed requests, the ragged short "
        f"prompts (64 new tokens) interleaved with the long trace prompts (16 new tokens), Poisson at {sv['rate']:g} "
        f"req/s, {sv['rounds']} rounds alternating between the servers; ITL: gaps between a request's consecutive "
        "text chunks.", "",
        "| server | TPOT p50 ms | TPOT p99 ms | ITL p99 ms | ITL max ms | long TTFT p50 ms | long TTFT p99 ms | "
        "e2e p50 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("chunked (`--prefill-chunk 64`, the default)", sv["chunked"]), row("whole (`--prefill-chunk 0`)", sv["whole"]),
        "", f"- served p99 ITL, chunked / whole: **{sv['p99_itl_chunked_vs_whole']:.2f}x**; p99 TPOT "
        f"**{sv['p99_tpot_chunked_vs_whole']:.2f}x**", ""]


def prefix_markdown(r: dict, json_name: str) -> str:
    off, on = r["cache"]["off"], r["cache"]["on"]
    st = on["prefix"]
    return "\n".join([
        "# Prefix cache: the engine on the shared-prefix trace, cache off against on", "",
        f"Command: `{r['command']}` (`make bench-serve ARGS=\"--parts prefix\"`)  ",
        f"Machine: {r['machine']}, {os.cpu_count()} CPUs shared (1-minute load average {r['load_average_at_start']:.1f} "
        f"at the start), {r['threads']} torch thread(s). Run `{r['run']}`, the {r['requests']} prompts of the trace above "
        f"({r['agents']} agents, {r['mean_prompt_tokens']:.0f} tokens on average), one at a time, each prefilled and "
        f"released (no HTTP). Raw figures: {json_name} (`prefix`).", "",
        "| prefix cache | prefill p50 ms | prefill p99 ms | prefill mean ms | prompts with a hit | prompt tokens from the cache |",
        "|---|---:|---:|---:|---:|---:|",
        f"| off | {off['median_prefill_ms']:.2f} | {off['p99_prefill_ms']:.2f} | {off['mean_prefill_ms']:.2f} | - | - |",
        f"| on | {on['median_prefill_ms']:.2f} | {on['p99_prefill_ms']:.2f} | {on['mean_prefill_ms']:.2f} | "
        f"{st['hits']} / {st['lookups']} | {st['token_hit_rate']:.1%} ({st['hit_tokens']:,} of {st['prompt_tokens']:,}) |", "",
        f"- prefill time with the cache on / off: p50 **{r['median_prefill_on_vs_off']:.2f}x**, p99 "
        f"**{r['p99_prefill_on_vs_off']:.2f}x**",
        f"- where nothing is shared (the first part's 16 ragged prompts, continuously batched in the engine to "
        f"{r['unshared']['tokens']:,} tokens, median of 4): {r['unshared']['off_s'] * 1000:.0f} ms with the cache off, "
        f"{r['unshared']['on_s'] * 1000:.0f} ms on (**{r['unshared']['on_s'] / r['unshared']['off_s']:.2f}x**)", ""])


TEXT_LENGTHS = (256, 1024, 4096)


def text_test(run: Path, command: str, repeats: int = 3) -> dict:
    """Detokenisation alone (see the module docstring): the best of `repeats` passes per length. The text is
    this repository's model/*.py, encoded with the run's tokenizer (a completion's tokens, as the engine would
    emit them); the choice has a stop string that never occurs, so it is searched for and held back as usual."""
    from tokenizers import Tokenizer

    from serve.text import ChoiceText

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    ids = tok.encode("".join(p.read_text() for p in sorted((ROOT / "model").glob("*.py")))).ids
    rows = []
    for n in TEXT_LENGTHS:
        x = ids[:n]
        incremental = whole = float("inf")
        for _ in range(repeats):
            c = ChoiceText(tok, stop=["\x00never\x00"])
            start = time.perf_counter()
            for i, token in enumerate(x):
                c.add(token, "length" if i == n - 1 else None)
            incremental = min(incremental, time.perf_counter() - start)
            assert c.text == tok.decode(x)
            start = time.perf_counter()
            for i in range(1, n + 1):
                tok.decode(x[:i])
            whole = min(whole, time.perf_counter() - start)
        rows.append({"tokens": n, "incremental_us_per_token": incremental / n * 1e6,
                     "whole_decoding_us_per_token": whole / n * 1e6, "ratio": whole / incremental})
    return {"command": command, "machine": f"{cpu_name()}, {platform.system()}, Python {platform.python_version()}",
            "run": str(run), "repeats": repeats, "lengths": rows}


def text_markdown(r: dict, json_name: str) -> str:
    rows = [f"| {x['tokens']:,} | {x['incremental_us_per_token']:.1f} | {x['whole_decoding_us_per_token']:.1f} | "
            f"{x['ratio']:.1f}x |" for x in r["lengths"]]
    return "\n".join([
        "# Detokenisation: a streamed choice's text, token by token", "",
        f"Command: `{r['command']}` (`make bench-serve ARGS=\"--parts text\"`)  ",
        f"Machine: {r['machine']}. Run `{r['run']}`'s tokenizer; the completion is model/*.py's text, fed one token "
        f"at a time to `serve.text.ChoiceText` (with a stop string that never occurs), best of {r['repeats']} passes. Raw "
        f"figures: {json_name} (`text`).", "",
        "| completion tokens | ChoiceText us per token (incremental window) | decoding the whole completion per token, "
        "us per token | ratio |",
        "|---:|---:|---:|---:|", *rows, ""])


if __name__ == "__main__":
    sys.exit(main())
