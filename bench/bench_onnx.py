"""ONNX Runtime against PyTorch eager: decode-step time and validation perplexity, side by side.

Two models:
  - the default recipe's trained model (gpt-tiny, 4.3M parameters; trained here first when --run is
    not given): perplexity on the first --val-tokens of its validation split (windows of its
    sequence length) through PyTorch, PyTorch with int8 weight-only layers (model/quantize.py), the
    ONNX fp32 model and its int8 copy; and the decode step of each;
  - a GPT-2-124M-shaped model (12 layers, width 768, 50,304 tokens; random weights, seed 0): the
    decode step only (perplexity of random weights means nothing).
Decode step: batch 1, a 64-token prompt prefilled, then the median over 64 one-token steps (the
KV cache fed back each step), rounds interleaved between the engines, median of the rounds. PyTorch
runs `GPT.forward` with its preallocated KVCache and the reference ops (`kernels="torch"`, what
the export traces); ORT runs `launch.onnx_export.OrtDecoder` on its CPU provider. Both on
--threads threads.

    python bench/bench_onnx.py [--run runs/<name>] [--threads 2] [--rounds 5] [--quick]
                               [--out bench/results/onnx-cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from marl_runs import run_recipe  # noqa: E402
from record_losses import cpu_name, write_results  # noqa: E402

from launch.onnx_export import OrtDecoder, write_onnx_folder  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model.quantize import quantize_int8_weight_only  # noqa: E402
from trainer.consolidate import load_run_model  # noqa: E402

GOALS = ("ORT fp32 decode step >= 1.5x PyTorch eager; ORT int8 >= 1.8x ORT fp32 with perplexity within +3%; "
         "PyTorch int8 weight-only (model/quantize.py) perplexity within +1%")


def val_tokens(meta: dict, n: int) -> np.ndarray:
    from trainer.loop import _prepare_data
    from trainer.schema import Recipe

    recipe = Recipe.model_validate(meta["config"])
    return np.asarray(_prepare_data(recipe, main_first=True).val_tokens[:n], np.int64)


def perplexity(logits_of, tokens: np.ndarray, seq: int) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `seq` + 1 tokens."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - seq - 1, seq):
        w = tokens[start:start + seq + 1]
        logits = torch.from_numpy(np.asarray(logits_of(w[:-1]), np.float32))
        nll += torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(w[1:]), reduction="sum").item()
        count += seq
    return math.exp(nll / count)


def eager_step_ms(model: GPT, ctx: int, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cache = model.new_kv_cache(1, ctx + steps + 1)
        x = model(torch.randint(0, model.config.vocab_size, (1, ctx), generator=g), kv_cache=cache)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            x = model(x[:, -1:].argmax(-1), kv_cache=cache)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ort_step_ms(dec: OrtDecoder, vocab: int, ctx: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    last = dec.prefill([rng.integers(0, vocab, ctx).tolist()])[:, -1]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        last = dec.step(last.argmax(-1).tolist())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def int8_copy(model: GPT) -> GPT:
    q = copy.deepcopy(model)
    quantize_int8_weight_only(q)
    return q


def step_times(model: GPT, folder: Path, threads: int, rounds: int, ctx: int, steps: int) -> dict[str, float]:
    """Median decode-step ms of PyTorch eager (fp32 and int8 weight-only) and ORT (fp32, int8)."""
    decs = {v: OrtDecoder(folder, v, threads=threads) for v in ("fp32", "int8")}
    torch_int8 = int8_copy(model)
    names = ["eager", "fp32", "int8", "torch-int8"]
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 4:] + names[:r % 4]:
            if name in decs:
                ms = ort_step_ms(decs[name], model.config.vocab_size, ctx, steps)
            else:
                ms = eager_step_ms(model if name == "eager" else torch_int8, ctx, steps)
            runs[name].append(ms)
    return {k: statistics.median(v) for k, v in runs.items()}


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a trained single-model run (default: train gpt-tiny first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--val-tokens", type=int, default=16384)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, no 124M model")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "onnx-cpu.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    run = a.run
    if run is None:
        overrides = ["train.max_steps=4"] if a.quick else []
        print("training gpt-tiny (the default recipe) first ...", flush=True)
        run_recipe("gpt-tiny", "onnx-bench", work / "runs", overrides)
        run = work / "runs" / "onnx-bench"
    model, meta = load_run_model(run)
    seq = meta["config"]["data"]["seq_len"]  # the length it was trained on (learned positions beyond are untrained)
    tokens = val_tokens(meta, 2 * seq + 2 if a.quick else a.val_tokens)
    folder = work / "tiny"
    manifest = write_onnx_folder(model, folder, None, int8=True)
    ctx, steps = (8, 8) if a.quick else (64, 64)
    rounds = 1 if a.quick else a.rounds
    fp32, int8 = OrtDecoder(folder, threads=a.threads), OrtDecoder(folder, "int8", threads=a.threads)
    torch_int8 = int8_copy(model)
    with torch.no_grad():
        ppl = {"eager": perplexity(lambda w: model(torch.from_numpy(w)[None])[0].numpy(), tokens, seq),
               "torch-int8": perplexity(lambda w: torch_int8(torch.from_numpy(w)[None])[0].numpy(), tokens, seq),
               "fp32": perplexity(lambda w: fp32.prefill([w.tolist()])[0], tokens, seq),
               "int8": perplexity(lambda w: int8.prefill([w.tolist()])[0], tokens, seq)}
    rows = [{"model": f"gpt-tiny trained ({model.num_params() / 1e6:.1f}M)", "ppl": ppl,
             "attention": manifest["attention"], **step_times(model, folder, a.threads, rounds, ctx, steps)}]
    if not a.quick:
        torch.manual_seed(0)
        big = GPT(GPTConfig(style="gpt2", vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                            kernels="torch", dropout=0.0)).eval()
        big_manifest = write_onnx_folder(big, work / "big", None, int8=True)
        rows.append({"model": f"GPT-2-124M shape, random ({big.num_params() / 1e6:.0f}M)", "ppl": None,
                     "attention": big_manifest["attention"], **step_times(big, work / "big", a.threads, rounds, ctx, steps)})
    lines = [f"Decode step (ms, batch 1, {ctx}-token context, median of {steps} steps x {rounds} rounds) and "
             f"validation perplexity ({len(tokens):,} tokens). Goals: {GOALS}.", "",
             "| model | ORT attention | eager ms | ORT fp32 ms | ORT int8 ms | torch int8-wo ms | fp32 / eager | "
             "int8 / fp32 | ppl eager | ppl ORT fp32 | ppl ORT int8 (vs fp32) | ppl torch int8-wo (vs eager) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["ppl"]
        ppl_cells = (f"{p['eager']:.3f} | {p['fp32']:.3f} | {p['int8']:.3f} ({100 * (p['int8'] / p['fp32'] - 1):+.2f}%) | "
                     f"{p['torch-int8']:.3f} ({100 * (p['torch-int8'] / p['eager'] - 1):+.2f}%)" if p else "- | - | - | -")
        lines.append(f"| {r['model']} | {r['attention']} | {r['eager']:.2f} | {r['fp32']:.2f} | {r['int8']:.2f} | {r['torch-int8']:.2f} | "
                     f"{r['eager'] / r['fp32']:.2f}x | {r['fp32'] / r['int8']:.2f}x | {ppl_cells} |")
    if a.quick:
        print("\n".join(lines), flush=True)
    else:
        cmd = ("python bench/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        write_results(a.out, f"# ONNX Runtime vs PyTorch eager\n\n`{cmd}` on {cpu_name()}, {a.threads} threads, "
                      f"torch {torch.__version__}, onnxruntime {ort_version()}.\n\n" + "\n".join(lines) + "\n")
        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
