"""`make bench-serve`: the server's continuous batching under load, measured as `vllm bench serve` does.

One server (`python -m serve RUN`, a real uvicorn process on a loopback port) and the same 16 requests
(ragged prompts, 128 new tokens each unless <|endoftext|> comes first, seeded sampling at temperature 0.8),
streamed (`stream_options.include_usage` for exact token counts):
  - sequential: the 16 requests one at a time (each alone on the server: the "lone request" figures);
  - concurrent: 16 clients sending them at the same moment.
The phases alternate for --rounds rounds. Per request: TTFT (sent -> first text chunk), TPOT ((end - first
chunk) / (output tokens - 1)), end-to-end latency; per phase: output tokens/s over the phase's wall time.
Goals (issue 14): concurrent tokens/s >= 4x sequential; p99 TPOT at 16 concurrent <= 2x the lone request's
(its median TPOT in the sequential phase). The clients are one asyncio loop of httpx streams in this
process; the server runs in its own process with --threads torch threads.

    python bench/bench_serve.py [--run runs/gpt-tiny] [--rounds 3] [--threads 1] [--max-tokens 128]
                                [--out bench/results/serve-cpu.md]   (also writes the .json beside it)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from record_losses import cpu_name, write_results  # noqa: E402

from launch.multiproc import free_port  # noqa: E402

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


async def one_request(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPTS[i], "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    if usage is None or first is None:
        raise RuntimeError(f"request {i}: no usage chunk or no text")
    n = usage["completion_tokens"]
    return {"ttft": first - start, "e2e": end - start, "tokens": n,
            "tpot": (end - first) / (n - 1) if n > 1 else None}


async def phase(url: str, model: str, concurrent: bool, max_tokens: int) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=N_CLIENTS)) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, model, i, max_tokens) for i in range(N_CLIENTS)))
        else:
            results = [await one_request(client, url, model, i, max_tokens) for i in range(N_CLIENTS)]
        return time.perf_counter() - start, list(results)


def summarise(walls: list[float], results: list[dict], rounds: int) -> dict:
    """vllm bench serve's fields (milliseconds), over every request of every round."""
    tokens = sum(r["tokens"] for r in results)
    out = {"num_prompts": len(results), "rounds": rounds, "duration": sum(walls), "total_output_tokens": tokens,
           "request_throughput": len(results) / sum(walls), "output_throughput": tokens / sum(walls),
           "output_throughput_per_round": [sum(r["tokens"] for r in results[k * N_CLIENTS:(k + 1) * N_CLIENTS]) / w
                                           for k, w in enumerate(walls)]}
    for key, name in (("ttft", "ttft"), ("tpot", "tpot"), ("e2e", "e2el")):
        vals = [r[key] * 1000 for r in results if r[key] is not None]
        out.update({f"mean_{name}_ms": statistics.mean(vals), f"median_{name}_ms": statistics.median(vals),
                    f"p99_{name}_ms": percentile(vals, 99)})
    return out


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


def start_server(run: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "serve", str(run), "--port", str(port), "--max-slots",
                             str(N_CLIENTS), "--threads", str(threads)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: run `python -m serve {run}` to see why")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/gpt-tiny", help="a trained run (default: `make train`'s runs/gpt-tiny)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's decoding loop")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu.md"))
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise SystemExit(f"{run}: no trained run there; train it first (`make train` writes runs/gpt-tiny)")
    command = "python bench/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0]
    proc, url = start_server(run, args.threads)
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(phase(url, model, True, 8))  # warm-up: first forwards, allocations
        walls: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        results: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
        for k in range(args.rounds):
            order = ("sequential", "concurrent") if k % 2 == 0 else ("concurrent", "sequential")
            for name in order:
                wall, res = asyncio.run(phase(url, model, name == "concurrent", args.max_tokens))
                walls[name].append(wall)
                results[name].extend(res)
                print(f"round {k + 1} {name}: {sum(r['tokens'] for r in res)} tokens in {wall:.2f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    floor = engine_floor(run, args.threads)
    seq = summarise(walls["sequential"], results["sequential"], args.rounds)
    con = summarise(walls["concurrent"], results["concurrent"], args.rounds)
    throughput_ratio = statistics.median(con["output_throughput_per_round"]) / statistics.median(
        seq["output_throughput_per_round"])
    tpot_ratio = con["p99_tpot_ms"] / seq["median_tpot_ms"]
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backend": "serve (this repo)",
              "command": command, "run": str(run), "model_id": model, "max_concurrency": N_CLIENTS,
              "max_tokens": args.max_tokens, "server_threads": args.threads, "machine": cpu_name(),
              "load_average_at_start": load, "sequential": seq, "concurrent": con,
              "throughput_ratio": throughput_ratio, "p99_tpot_vs_lone": tpot_ratio, "engine_alone": floor,
              "goals": {"throughput_ratio_min": 4.0, "p99_tpot_vs_lone_max": 2.0}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    report["json"] = out.with_suffix(".json").name
    write_results(out, markdown(report))
    return 0


def markdown(r: dict) -> str:
    def row(name, s):
        return (f"| {name} | {s['total_output_tokens']:,} | {s['output_throughput']:,.0f} | {s['median_ttft_ms']:.1f} | "
                f"{s['p99_ttft_ms']:.1f} | {s['median_tpot_ms']:.2f} | {s['p99_tpot_ms']:.2f} | "
                f"{s['median_e2el_ms']:.0f} | {s['p99_e2el_ms']:.0f} |")

    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    seq, con = r["sequential"], r["concurrent"]
    return "\n".join([
        "# Serving: 16 concurrent clients against one at a time", "",
        f"Command: `{r['command']}` (`make bench-serve`)  ",
        f"Machine: {r['machine']}, server with {r['server_threads']} torch thread(s), {platform.system()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, 1-minute load average {r['load_average_at_start']:.1f} "
        "at the start (other processes share the CPUs)  ",
        f"Run `{r['run']}` (model `{r['model_id']}`), 16 streamed requests of ragged prompts, up to {r['max_tokens']} "
        f"new tokens each (seeded sampling, T=0.8), {seq['rounds']} rounds of each phase, interleaved. "
        f"Raw figures: {r['json']}.", "",
        "| phase | output tokens | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | e2e p50 ms | "
        "e2e p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("one at a time", seq), row("16 concurrent", con), "",
        f"- tokens/s, 16 concurrent / one at a time (median of rounds): **{r['throughput_ratio']:.2f}x** "
        f"(goal >= 4x: {met(r['throughput_ratio'] >= 4)})",
        f"- p99 TPOT at 16 concurrent / a lone request's median TPOT: **{r['p99_tpot_vs_lone']:.2f}x** "
        f"(goal <= 2x: {met(r['p99_tpot_vs_lone'] <= 2)})",
        f"- the engine alone in one process (no server), same sampling: a decode step of 16 rows takes "
        f"{r['engine_alone']['step_ms_16_rows']:.2f} ms, of 1 row {r['engine_alone']['step_ms_1_rows']:.2f} ms: "
        f"**{r['engine_alone']['ratio']:.2f}x**, the lowest TPOT ratio 16 clients can get here (each waits for a "
        "16-row step per token)", ""])


if __name__ == "__main__":
    sys.exit(main())
