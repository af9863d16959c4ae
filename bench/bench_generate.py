"""`make bench-generate`: tokens/s of DecodeEngine's continuous batching against the static-batch
decoder that GPT.generate used to be (bench/static_generate.py), on the same requests.

Workloads, 16 requests each, greedy (so both decoders must emit the same tokens; checked):
  - ragged: prompt lengths spread 8..64 and max_new_tokens spread 8..128. The static decoder
    left-pads all prompts into one batch and decodes every row until the largest budget (it can
    stop a row only at eos); the engine retires each request at its own budget.
  - equal: 16 prompts of 32 tokens, 64 new tokens each: the same work for both, the engine's
    overhead (per-row bookkeeping, logprob and entropy of every token) at equal batch.
Tokens/s counts the requested new tokens only (the same for both decoders). Rounds interleave the
decoders, alternating which goes first; medians over the rounds are reported with the ratios, in
wall-clock time and, less sensitive to other processes on a shared machine, in CPU time.

    python bench/bench_generate.py [--rounds 5] [--style gpt2|llama] [--threads N] [--quick]
                                   [--out bench/results/generate-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from record_losses import cpu_name, write_results  # noqa: E402
from static_generate import static_generate  # noqa: E402

from model import GPT, DecodeEngine, GPTConfig, SamplingParams  # noqa: E402

N_REQUESTS = 16


def model_config(style: str, quick: bool) -> GPTConfig:
    if quick:
        return GPTConfig(style=style, vocab_size=256, n_layer=2, n_head=4, d_model=64, max_seq_len=64,
                         n_kv_head=2 if style == "llama" else None)
    # The default recipe's model (recipes/gpt-tiny.yaml: 4 layers, width 256, 8 heads, 4096 tokens);
    # the llama style with grouped kv heads (8 query heads on 2 kv heads).
    return GPTConfig(style=style, vocab_size=4096, n_layer=4, n_head=8, d_model=256, max_seq_len=256,
                     n_kv_head=2 if style == "llama" else None)


def workloads(quick: bool, vocab: int):
    """name -> (prompts, max_new_tokens per request)."""
    g = torch.Generator().manual_seed(0)
    lo_p, hi_p, lo_n, hi_n, eq_p, eq_n = (4, 16, 2, 24, 8, 12) if quick else (8, 64, 8, 128, 32, 64)
    lens = torch.linspace(lo_p, hi_p, N_REQUESTS).round().long().tolist()
    news = torch.linspace(lo_n, hi_n, N_REQUESTS).round().long()
    news = news[torch.randperm(N_REQUESTS, generator=g)].tolist()  # budgets unrelated to prompt lengths
    ragged = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    equal = [torch.randint(0, vocab, (eq_p,), generator=g).tolist() for _ in range(N_REQUESTS)]
    return {"ragged": (ragged, news), "equal": (equal, [eq_n] * N_REQUESTS)}


def run_static(model, prompts, news):
    out = static_generate(model, prompts, max(news), temperature=0)
    return [seq[len(p):len(p) + n] for seq, p, n in zip(out, prompts, news)]


def run_engine(model, prompts, news, slots=N_REQUESTS):
    engine = DecodeEngine(model, max_slots=slots, max_len=max(len(p) for p in prompts) + max(news))
    out = engine.generate(prompts, [SamplingParams(temperature=0, max_new_tokens=n) for n in news])
    return [c.tokens for c in out]


METHODS = {"static": run_static, "engine": run_engine,
           "engine, 8 slots": lambda m, p, n: run_engine(m, p, n, slots=8)}


def step_costs(model, prompt_len: int, quick: bool) -> dict[int, float]:
    """CPU milliseconds of one DecodeEngine.decode step by number of running rows."""
    out = {}
    for b in (1, 2, 4, 8, 16):
        engine = DecodeEngine(model, b, max_len=model.config.max_seq_len)
        engine.prefill([[1] * prompt_len] * b, list(range(b)), SamplingParams(temperature=0, max_new_tokens=1000))
        times = []
        for _ in range(3 if quick else 30):
            c0 = time.process_time()
            engine.decode()
            times.append(time.process_time() - c0)
        out[b] = 1e3 * statistics.median(times)
    return out



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--style", choices=["gpt2", "llama"], default=None, help="default: both")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny model and budgets, one round (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate-cpu.md"))
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    styles = [args.style] if args.style else ["gpt2", "llama"]
    command = "python bench/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)

    lines = ["# Decoding: DecodeEngine (continuous batching) vs the static-batch GPT.generate\n",
             f"Command: `{command.strip()}` (`make bench-generate`)  ",
             f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads (torch's default here: "
             f"{default_threads}), {platform.system()}, "
             f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
             f"1-minute load average {os.getloadavg()[0]:.1f} at the start (other processes share the CPUs)  ",
             f"{N_REQUESTS} greedy requests per workload; tokens/s = requested new tokens / wall time, "
             f"median of {rounds} interleaved round(s); CPU s = process CPU time (all threads).\n"]
    ratios = []
    for style in styles:
        torch.manual_seed(0)
        cfg = model_config(style, args.quick)
        model = GPT(cfg).eval()
        loads = workloads(args.quick, cfg.vocab_size)
        times = {(w, m): [] for w in loads for m in METHODS}
        same = {}
        for w, (prompts, news) in loads.items():  # warm-up, and the static decoder's tokens as reference
            ref = run_static(model, prompts, news)
            got = run_engine(model, prompts, news)
            same[w] = sum(a == b for a, b in zip(ref, got))
        for r in range(rounds):
            for w, (prompts, news) in loads.items():
                order = list(METHODS) if r % 2 == 0 else list(METHODS)[::-1]
                for name in order:
                    t0, c0 = time.perf_counter(), time.process_time()
                    METHODS[name](model, prompts, news)
                    times[(w, name)].append((time.perf_counter() - t0, time.process_time() - c0))
        kv = f", {cfg.n_kv_head} kv heads" if cfg.n_kv_head != cfg.n_head else ""
        lines += [f"\n## {style}: {cfg.n_layer} layers, width {cfg.d_model}, {cfg.n_head} heads{kv}, "
                  f"vocabulary {cfg.vocab_size}\n",
                  "| workload | decoder | new tokens | median s | tokens/s | vs static | median CPU s | "
                  "vs static (CPU) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]

        def med(w, name, i, times=times):
            return statistics.median(t[i] for t in times[(w, name)])

        for w, (_, news) in loads.items():
            tokens = sum(news)
            for name in METHODS:
                t, c = med(w, name, 0), med(w, name, 1)
                lines.append(f"| {w} | {name} | {tokens} | {t:.3f} | {tokens / t:,.0f} | "
                             f"{med(w, 'static', 0) / t:.2f}x | {c:.3f} | {med(w, 'static', 1) / c:.2f}x |")
        for w in loads:
            ratio = med(w, "static", 0) / med(w, "engine", 0)
            cpu = med(w, "static", 1) / med(w, "engine", 1)
            ratios.append(f"ratio {w}: engine / static = {ratio:.2f}x in tokens/s ({cpu:.2f}x in CPU time; "
                          f"{style}; same tokens for {same[w]}/{N_REQUESTS} requests)")
        lines.append("")
        lines += [f"- ratio {x.split('ratio ', 1)[1]}" for x in ratios[-len(loads):]]
        prompts, news = loads["ragged"]
        lines.append(f"- ragged: prompt lengths {min(map(len, prompts))}..{max(map(len, prompts))}, "
                     f"max_new_tokens {min(news)}..{max(news)}; the static decoder computes "
                     f"{N_REQUESTS * max(news)} tokens for {sum(news)} requested")
        cached = 8 if args.quick else 64
        steps = step_costs(model, cached, quick=args.quick)
        lines.append(f"- one engine decode step (CPU ms, median) with B running rows at {cached} cached positions: "
                     + ", ".join(f"B={b}: {ms:.2f}" for b, ms in steps.items())
                     + " (what retiring rows saves per step)")
    lines += ["", *ratios, ""]
    write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
