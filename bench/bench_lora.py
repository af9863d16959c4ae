"""Decode speed of a batch whose rows use different LoRA adapters (agents.lora, one adapter per row in
one batched forward) against the same batch with no adapter, side by side in one run, and the
largest logit difference against the merged-weight models (W + alpha/r B A per adapter).

Workload: the default recipe's model size (gpt2 style, 4 layers, width 256, 8 heads, vocabulary
4096), a batch of B rows (default 32) with random prompts of 32 tokens, prefilled, then S greedy
decode steps (default 64) through `model.generate.DecodeEngine`; tokens/s = B * S / time of the
decode steps (prefill excluded), median of interleaved rounds, in wall time and in process CPU time.
Cases, each on the same prompts:

    plain GPT           the model without adapters (the baseline of the ratios)
    adapters, base rows the model with N adapters added, every row without one (peft's layers idle)
    per-row auto        row b uses adapter b mod N, agents.lora's default method (dense or bmm per layer)
    per-row dense       every adapter's x A^T at once, other adapters' columns masked, one GEMM with B
    per-row bmm         stacked A/B gathered per row, two batched matmuls per layer
    per-row group       each adapter on its own rows (index_select, two matmuls, index_add)

Adapters: rank 8, alpha 16, on q_proj/k_proj/v_proj/o_proj (the recipe default), A as peft
initialises it, B random N(0, 0.05) (peft's B = 0 would make every adapter the base). Accuracy: the
batch's full sequences (prompt + generated) under per-row adapters against each row run alone
through a plain GPT holding that adapter's merged weights (agents.lora.merged_state_dict), float32;
and whether each row's greedy tokens equal those of its merged model generating alone.

    python bench/bench_lora.py [--threads N] [--rounds 5] [--batch 32] [--steps 64] [--adapters 8 ...]
                               [--rank 8] [--quick] [--out bench/results/lora-cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from record_losses import cpu_name, write_results  # noqa: E402  (bench/ is this script's first path entry)

from agents.lora import ROW_METHODS, adapter_names, add_adapters, merged_state_dict, row_adapters  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model.generate import DecodeEngine, SamplingParams  # noqa: E402

PROMPT_LEN = 32


def decode_time(model, prompts, steps, adapters, method=None):
    """(wall s, CPU s) of `steps` decode steps after prefilling `prompts`; and the generated tokens."""
    context = None if method is None else (lambda names: row_adapters(model, names, method=method))
    engine = DecodeEngine(model, max_slots=len(prompts), max_len=PROMPT_LEN + steps + 1, row_context=context)
    outs = engine.prefill(prompts, params=SamplingParams(temperature=0, max_new_tokens=steps + 1), adapters=adapters)
    tokens = [[o.token] for o in outs]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        for o in engine.decode():
            tokens[o.slot].append(o.token)
    return time.perf_counter() - t0, time.process_time() - c0, tokens


def measure(plain, n_adapters, args, prompts, steps, rounds):
    """The cases of one adapter count: median (wall, CPU) s per case, max |logit diff| per method vs
    the merged-weight models, the base's distance from them, and rows whose greedy tokens equal their
    merged model's alone."""
    adapted = add_adapters(copy.deepcopy(plain), {f"agent{i}": dict(rank=args.rank, alpha=2.0 * args.rank)
                                                  for i in range(n_adapters)})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    names = adapter_names(adapted)
    rows = [names[b % len(names)] for b in range(len(prompts))]
    cases = {"plain GPT (no adapter)": (plain, None, None),
             "adapters added, every row base": (adapted, None, None),
             **{f"per-row adapters, {m}": (adapted, rows, m) for m in ROW_METHODS}}
    generated = {}
    for name, (m, ad, method) in cases.items():  # warm-up; the tokens for the accuracy check
        generated[name] = decode_time(m, prompts, steps, ad, method)[2]
    times = {name: [] for name in cases}
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            m, ad, method = cases[name]
            times[name].append(decode_time(m, prompts, steps, ad, method)[:2])
    med = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for name, ts in times.items()}

    # Accuracy: the full sequences (prompt + generated), per-row adapters vs each row's merged model alone.
    seqs = torch.tensor([p + t[:-1] for p, t in zip(prompts, generated["per-row adapters, auto"])])
    merged = {}
    for n in names:
        merged[n] = copy.deepcopy(plain)
        merged[n].load_state_dict(merged_state_dict(adapted, n))
    diffs, same = {}, 0
    with torch.no_grad():
        ref = torch.cat([merged[n](seqs[b:b + 1]) for b, n in enumerate(rows)])
        base_gap = (plain(seqs) - ref).abs().max().item()
        for method in ROW_METHODS:
            with row_adapters(adapted, rows, method=method):
                diffs[method] = (adapted(seqs) - ref).abs().max().item()
        for b, n in enumerate(rows):
            alone = merged[n].generate([prompts[b]], max_new_tokens=steps + 1, temperature=0)[0][PROMPT_LEN:]
            same += alone == generated["per-row adapters, auto"][b]
    return med, diffs, base_gap, same, seqs.shape[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--adapters", type=int, nargs="+", default=[8], help="distinct adapters in the batch")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, 8 steps (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora-cpu.md"))
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/bench_lora.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rounds, steps = (2, 8) if args.quick else (args.rounds, args.steps)
    load = os.getloadavg()[0]

    torch.manual_seed(0)
    if args.quick:
        cfg = GPTConfig(vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=128)
    else:
        cfg = GPTConfig(vocab_size=4096, n_layer=4, n_head=8, d_model=256, max_seq_len=256)
    plain = GPT(cfg).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(args.batch)]

    tokens = args.batch * steps
    lines = ["# Per-row LoRA adapters in one decode batch vs the same batch without adapters\n",
             f"Command: `{command.strip()}`  ",
             f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads (torch's default here: "
             f"{default_threads}), {platform.system()}, torch {torch.__version__}, Python "
             f"{platform.python_version()}, {os.cpu_count()} CPUs, 1-minute load average {load:.1f} at the start "
             "(other processes share the CPUs)  ",
             f"Model: gpt2 style, {cfg.n_layer} layers, width {cfg.d_model}, {cfg.n_head} heads, vocabulary "
             f"{cfg.vocab_size}; batch {args.batch} rows, prompts of {PROMPT_LEN} tokens, {steps} greedy decode "
             f"steps timed (prefill excluded); N adapters of rank {args.rank} (alpha {2 * args.rank}) on "
             f"q/k/v/o_proj, row b uses adapter b mod N; tokens/s = {tokens} tokens / median of {rounds} "
             "interleaved round(s); CPU s = process CPU time; ratios against the plain GPT of the same N.\n",
             "| N | case | median s | tokens/s | ratio (wall) | median CPU s | tokens/s (CPU) | ratio (CPU) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for n in args.adapters:
        med, diffs, base_gap, same, positions = measure(plain, n, args, prompts, steps, rounds)
        base_w, base_c = med["plain GPT (no adapter)"]
        for name, (w, c) in med.items():
            lines.append(f"| {n} | {name} | {w:.3f} | {tokens / w:,.0f} | {base_w / w:.3f}x | {c:.3f} | "
                         f"{tokens / c:,.0f} | {base_c / c:.3f}x |")
        w, c = med["per-row adapters, auto"]
        summary += [f"N={n}: per-row adapters (default method auto) / no adapter: **{base_w / w:.3f}x** in "
                    f"tokens/s ({base_c / c:.3f}x in CPU time); goal >= 0.75x",
                    f"N={n}: max |logit difference| vs the merged-weight model of each row (float32, {args.batch} "
                    f"rows x {positions} positions): auto **{diffs['auto']:.2e}**, "
                    + ", ".join(f"{m} {diffs[m]:.2e}" for m in ROW_METHODS[1:])
                    + f"; goal <= 1e-4 (the adapters move the logits by up to {base_gap:.2f} from the base)",
                    f"N={n}: greedy tokens equal to each row's merged model generating alone: {same}/{args.batch} rows"]
    lines += ["", *[f"- {x}" for x in summary], ""]
    write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
