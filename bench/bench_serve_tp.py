"""Tensor-parallel serving against one process: decode tokens/s and memory per rank (`python -m serve RUN --tp N`).

For each N in --tp (default 1,2) one server starts on a loopback port with the same total torch threads
(--cores, shared out: N ranks x cores/N threads), and the same requests are sent: greedy, --max-tokens new
tokens each (<|endoftext|> may end one sooner), first one client at a time (batch 1), then --clients clients
at once. Figures: output tokens/s over each phase's wall time; every rank's parameter bytes (the server's
`loaded` line: this rank's shard, a tied tensor once) and resident memory (VmRSS of each rank's process after
the phases). The texts of every N are compared with N=1's (they must be equal: greedy decoding of the same
model). On a CPU with few cores TP is slower, not faster: every layer adds two all-reduces and every step a
gather of the logits between processes that share the same cores; what TP buys is memory per rank.

    python bench/bench_serve_tp.py [--run runs/gpt-tiny] [--tp 1,2] [--cores 2] [--clients 8] [--requests 8]
                                   [--max-tokens 128] [--out bench/results/serve-tp-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launch.multiproc import free_port  # noqa: E402
from serve.procs import ServerDidNotStart, launch_server  # noqa: E402

PROMPTS = ["def main(argv):\n", "import os\n\nclass ", "    return self.", "x = [", "# Copyright", "for i in ",
           "if __name__ == ", "@property\n    def "]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, run: str, tp: int, threads: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._f = open(log, "w")
        try:
            self.proc = launch_server([run, "--tp", str(tp), "--threads", str(threads)], self.port, self._f, 300,
                                      poll=0.2, cwd=REPO)
        except ServerDidNotStart as e:
            raise SystemExit(f"{e}: {log.read_text()[-2000:]}") from None
        self.loaded = next(json.loads(x) for x in log.read_text().splitlines() if '"loaded"' in x)
        self.model = self.loaded["models"][0]

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        r = httpx.post(self.url + "/v1/completions", timeout=600,
                       json={"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["text"], body["usage"]["completion_tokens"]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self._f.close()


def full_parameter_mib(run: str) -> float:
    """The unpartitioned model's parameter memory (what one process holds without --tp)."""
    from trainer.consolidate import load_run_model

    model = load_run_model(run)[0]
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20


def measure(server: Server, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list[str]]:
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: server.complete(p, max_tokens), prompts))
    wall = time.perf_counter() - t
    return sum(n for _, n in results) / wall, [text for text, _ in results]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/gpt-tiny")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--cores", type=int, default=2, help="torch threads in all, shared out over the ranks")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default="bench/results/serve-tp-cpu.md")
    args = p.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    load_before = os.getloadavg()[0]
    rows, texts = [], {}
    for tp in [int(x) for x in args.tp.split(",")]:
        threads = max(1, args.cores // tp)
        server = Server(args.run, tp, threads, Path(f"/tmp/bench_serve_tp_{tp}.log"))
        try:
            server.complete(prompts[0], 8)  # warm-up
            alone = [measure(server, [q], 1, args.max_tokens) for q in prompts]
            batch1 = sum(r for r, _ in alone) / len(alone)
            together, got = measure(server, prompts, args.clients, args.max_tokens)
            texts[tp] = ([t for _, (t,) in alone], got)
            pids = [server.proc.pid] + _children(server.proc.pid)
            rss = [_rss_mib(pid) for pid in pids]
            info = server.loaded["tp"] or {"parameter_bytes_per_rank": None}
        finally:
            server.close()
        param = info["parameter_bytes_per_rank"]
        param_mib = full_parameter_mib(args.run) if param is None else sum(param.values()) / 2 ** 20
        rows.append({"tp": tp, "threads": threads, "batch1": batch1, "together": together, "param_mib": param_mib,
                     "rss": rss})
        print(json.dumps(rows[-1]), flush=True)
    load_after = os.getloadavg()[0]
    base = rows[0]
    same = {tp: texts[tp] == texts[rows[0]["tp"]] for tp in texts}
    lines = [f"# Tensor-parallel serving on CPU ({args.run})", "",
             f"`python bench/bench_serve_tp.py --run {args.run} --tp {args.tp} --cores {args.cores} --clients "
             f"{args.clients} --requests {args.requests} --max-tokens {args.max_tokens}` on {platform.node() or 'this host'}"
             f" ({cpu_name()}, {args.cores} torch threads in all), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load_before:.1f} before, "
             f"{load_after:.1f} after (other processes on the same cores slow TP's collectives most).", "",
             f"Greedy, {args.max_tokens} new tokens a request, {args.requests} requests: one at a time (batch 1), "
             f"then {args.clients} clients at once. Parameter memory: this rank's tensors (a tied tensor once); "
             "RSS: each rank's process after the runs (rank 0 also holds the HTTP server and its imports).", "",
             "| tp | threads per rank | batch 1 tokens/s | vs tp=1 | concurrent tokens/s | vs tp=1 | parameters per rank (MiB) "
             "| RSS per rank (MiB) | texts = tp=1's |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        pm = f"{r['param_mib']:.2f}"
        lines.append(f"| {r['tp']} | {r['threads']} | {r['batch1']:.1f} | {r['batch1'] / base['batch1']:.2f}x | "
                     f"{r['together']:.1f} | {r['together'] / base['together']:.2f}x | {pm} | "
                     f"{', '.join(f'{x:.0f}' for x in r['rss'])} | {'yes' if same[r['tp']] else 'NO'} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
