"""How replicas agree, side by side: every sync strategy at the same token budget (`make bench-sync`).

Each strategy trains the same model on the same data with R replicas (4 by default, one process
each, through the real launcher) for the same number of steps and tokens; the table gives the bytes
each rank sent to synchronise (counted in the send wrapper of `agents.sync.ring`), the wall time, the
final validation loss (the mean of the replicas' own losses on the whole validation split, and
each's) and the replicas' consensus distance. `allreduce` is DeepSpeed's own all-reduce over every
rank (gloo: its bytes are not counted by us); the `ring` row sends what a bandwidth-optimal
all-reduce sends, the reference for the byte ratios. `fedavg-local` trains every replica on its own
non-IID shard and never averages: the local-only models FedAvg must beat.

    python bench/bench_sync.py --steps 100          # 4 replicas, gpt-tiny (default 200 steps)
    python bench/bench_sync.py --replicas 8 --steps 100 --out bench/results/sync-cpu-r8.md

Writes bench/results/sync-cpu[-rN].md and a plot of validation loss against bytes sent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record_losses import subprocess_env  # bench/ is this script's first path entry

REPO = Path(__file__).resolve().parent.parent

# label -> (recipe, overrides); every recipe trains gpt-tiny with a global batch of 32 sequences.
def strategies(r: int) -> dict[str, tuple[str, list[str]]]:
    rep = [f"sync.replicas={r}"]
    return {
        "allreduce": ("gpt-tiny-ring", ["sync.strategy=allreduce", "sync.replicas=null"]),
        "ring": ("gpt-tiny-ring", rep),
        "ring+int8 (EF)": ("gpt-tiny-int8-ef", rep),
        "ring+topk 1% (EF)": ("gpt-tiny-ring", [*rep, "sync.compress=topk", "sync.compress_ratio=0.01"]),
        "ring+topk 2% (EF)": ("gpt-tiny-ring", [*rep, "sync.compress=topk", "sync.compress_ratio=0.02"]),
        "ring+powersgd r4 (EF)": ("gpt-tiny-ring", [*rep, "sync.compress=powersgd", "sync.compress_rank=4"]),
        "ring+powersgd r16 (EF)": ("gpt-tiny-ring", [*rep, "sync.compress=powersgd", "sync.compress_rank=16"]),
        # Top-k of each replica's own AdamW update (diloco with one local step, outer lr 1, no
        # momentum), not of the gradient: the residual is then kept in update space (see docs/sync.md).
        "local AdamW + topk 2% of updates (EF)": ("gpt-tiny-diloco", [
            *rep, "sync.every=1", "sync.outer.lr=1.0", "sync.outer.momentum=0.0", "sync.outer.nesterov=false",
            "sync.compress=topk", "sync.compress_ratio=0.02"]),
        # The last ranks serve: r workers (one replica each) plus the servers.
        "parameter_server (1 server)": ("gpt-tiny-ps", [f"launch.procs_per_node={r + 1}"]),
        f"parameter_server async k={r - 1} (2 servers)": ("gpt-tiny-ps-async", [
            f"launch.procs_per_node={r + 2}", f"sync.staleness={r - 1}"]),
        "local_sgd H=8": ("gpt-tiny-localsgd", rep),
        "diloco H=32": ("gpt-tiny-diloco", rep),
        "gossip (exponential)": ("gpt-tiny-gossip", rep),
        f"hybrid ({max(2, r // 2)} x diloco H=16)": ("gpt-tiny-hybrid", [f"sync.replicas={max(2, r // 2)}"]),
        "fedavg H=16, Dir(0.1)": ("gpt-tiny-fedavg-noniid", rep),
        "fedavg-local, Dir(0.1)": ("gpt-tiny-fedavg-noniid", [*rep, "sync.every=1000000"]),
    }


def run(label, recipe, overrides, r, steps, root, cache, extra) -> dict:
    name = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    cmd = [sys.executable, "-m", "launch", "train", recipe, f"launch.procs_per_node={r}", *overrides,
           f"parallel.micro_batch={32 // r}", f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 8)}",
           "train.checkpoint_every=null", "train.sample_tokens=0", "train.progress=false", "tracking.wandb=disabled",
           f"run.name={name}", f"run.output_dir={root}", f"data.cache_dir={cache}", *extra]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{label} failed ({out.returncode}): {out.stderr[-2000:]}")
    rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if "loss" in x]
    evals = [x for x in rows if "val_loss" in x]
    sent = {x["step"]: x.get("comm_bytes", 0) for x in train}
    # The final evaluation's whole validation split (val_loss_full; runs before it existed: val_loss).
    final = evals[-1].get("val_loss_full", evals[-1]["val_loss"])
    return {"label": label, "wall_s": wall, "val_loss": final,
            "val_replicas": evals[-1].get("val_loss_full_replicas", evals[-1].get("val_loss_replicas")), "comm_bytes": train[-1].get("comm_bytes"),
            "consensus": train[-1].get("consensus_dist"),
            "curve": [(sent.get(x["step"], 0), x["val_loss"]) for x in evals]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. a smaller model)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=str(REPO / ".cache" / "data"))
    args = ap.parse_args()
    r = args.replicas
    out = Path(args.out or REPO / "bench" / "results" / ("sync-cpu.md" if r == 4 else f"sync-cpu-r{r}.md"))
    todo = {k: v for k, v in strategies(r).items() if not args.only or k in args.only}
    # Every run's figures are kept beside the table, so a rerun of some rows (--only) keeps the others.
    store = out.with_suffix(".json")
    kept = json.loads(store.read_text()) if args.only and store.exists() else {}
    if kept and kept.get("steps") != args.steps:
        raise SystemExit(f"{store} holds {kept.get('steps')}-step runs: rerun every row with --steps {args.steps}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (recipe, overrides) in todo.items():
            res = run(label, recipe, overrides, r, args.steps, Path(tmp), args.cache, args.extra)
            results.append(res)
            print(f"{label:28s} val {res['val_loss']:.4f}  bytes {res['comm_bytes'] or 0:>14,}  "
                  f"wall {res['wall_s']:.0f} s", flush=True)
    by = {**kept.get("results", {}), **{x["label"]: x for x in results}}
    results = [by[k] for k in strategies(r) if k in by]
    store.write_text(json.dumps({"steps": args.steps, "replicas": r, "results": by}, indent=1))
    write(out, results, args, r)
    return 0


def write(out: Path, results: list[dict], args, r: int) -> None:
    by = {x["label"]: x for x in results}
    ref_loss = by["allreduce"]["val_loss"] if "allreduce" in by else None
    ref_bytes = by["ring"]["comm_bytes"] if "ring" in by else None
    lines = [f"# Sync strategies side by side, {r} replicas (CPU)", "",
             f"Command: `python bench/bench_sync.py --replicas {r} --steps {args.steps}"
             + (f" --extra {' '.join(args.extra)}" if args.extra else "") + "`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one process per "
             f"replica (gloo); gpt-tiny, global batch 32 x 128 tokens, {args.steps} steps for every strategy.", "",
             "| strategy | bytes sent / rank | vs ring | wall s | final val loss | vs allreduce | consensus dist |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for x in results:
        b = x["comm_bytes"]
        ratio = f"{ref_bytes / b:.1f}x fewer" if ref_bytes and b else ("-" if b is None else "none sent")
        rel = f"{(x['val_loss'] / ref_loss - 1) * 100:+.2f}%" if ref_loss else "-"
        cons = f"{x['consensus']:.2e}" if x["consensus"] is not None else "-"
        lines.append(f"| {x['label']} | {b if b is not None else 'gloo (not counted)':>} | {ratio} | {x['wall_s']:.0f} | "
                     f"{x['val_loss']:.4f} | {rel} | {cons} |")
    fed, local = by.get("fedavg H=16, Dir(0.1)"), by.get("fedavg-local, Dir(0.1)")
    if fed and local and local["val_replicas"]:
        best_local = min(local["val_replicas"])
        lines += ["", f"FedAvg on the Dirichlet(0.1) split: the averaged model's validation loss {fed['val_loss']:.4f}; "
                  f"the local-only models' {', '.join(f'{v:.4f}' for v in local['val_replicas'])} (best {best_local:.4f}): "
                  + ("FedAvg beats every local-only model" if fed["val_loss"] < best_local else
                     "FedAvg does NOT beat every local-only model")
                  + (f"; against IID allreduce (the allreduce row) {(fed['val_loss'] / ref_loss - 1) * 100:+.2f}%"
                     if ref_loss else "")
                  + "."]
    out.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for x in results:
            if x["comm_bytes"]:
                xs, ys = zip(*[(max(b, 1) / 2**20, v) for b, v in x["curve"]])
                ax.plot(xs, ys, marker="o", ms=3, label=x["label"])
        ax.set_xscale("log")
        ax.set_xlabel("MiB sent per rank to synchronise (log)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{r} replicas, same token budget")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:  # pragma: no cover
        pass
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
