"""marl-split-arith: per-role LoRA policies against one shared policy trained the same way, and the
per-role adapters swapped at evaluation. The recipe's learning goals measured, not asserted.

For every (setting, seed): `python -m launch train marl-split-arith train.seed=S` (per-role: one
adapter per agent) or `marl-split-arith-shared` (the second agent acts and learns with the first's
adapter), both from the base marl-split-arith-base (trained once by the recipe chain); from each
summary.json the greedy team success over 200 fixed evaluation episodes, for per-role runs the
success with the two adapters swapped (env.eval_swap), each agent's entropy, invalid answers and the
wall time. Goals (issue 12): per-role beats shared by >= 30 points of success; swapping the adapters
cuts success by >= 50% (relative).

    python bench/bench_split_arith.py [--seeds 3] [--settings per-role shared] [--steps N] [--parallel 2]
                                      [--out bench/results/split-arith-cpu.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from marl_runs import Rows, run_recipe  # noqa: E402
from record_losses import cpu_name, write_results  # noqa: E402

RECIPES = {"per-role": "marl-split-arith", "shared": "marl-split-arith-shared"}


def run_one(setting: str, seed: int, steps: int | None, runs: Path) -> dict:
    extra = [f"train.max_steps={steps}"] if steps else []
    s, wall = run_recipe(RECIPES[setting], f"split-arith-{setting}-s{seed}", runs, [f"train.seed={seed}", *extra])
    a = s["agents"]
    return {"setting": setting, "seed": seed, "steps": s["steps"], "success": s["success"],
            "swapped": s.get("success_swapped"), "first_entropy": a["first"]["entropy"],
            "second_entropy": a["second"]["entropy"], "second_invalid": a["second"]["invalid"], "wall_s": wall}


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def table(rows: list[dict]) -> str:
    lines = ["| policies | seed | steps | success | adapters swapped | entropy first / second (nats/token) | "
             "second's invalid answers | wall |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        swapped = "" if r["swapped"] is None else f"{r['swapped']:.3f}"
        lines.append(f"| {r['setting']} | {r['seed']} | {r['steps']} | {r['success']:.3f} | {swapped} | "
                     f"{r['first_entropy']:.3f} / {r['second_entropy']:.3f} | {r['second_invalid']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    per = [r for r in rows if r["setting"] == "per-role"]
    shared = [r for r in rows if r["setting"] == "shared"]
    lines.append("")
    if per and shared:
        gap = 100 * (_mean(r["success"] for r in per) - _mean(r["success"] for r in shared))
        lines.append(f"- per-role {_mean(r['success'] for r in per):.3f} vs shared {_mean(r['success'] for r in shared):.3f} "
                     f"(means over {len(per)} and {len(shared)} seeds): **{gap:+.1f} points** (goal >= +30)")
    if per:
        s, w = _mean(r["success"] for r in per), _mean(r["swapped"] for r in per)
        drop = 100 * (1 - w / s) if s else float("nan")
        lines.append(f"- adapters swapped: {s:.3f} -> {w:.3f}, **{drop:.0f}% lower** (goal >= 50%)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipes')")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-split-arith"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/split-arith-cpu.md"))
    args = ap.parse_args()
    out = Path(args.out)
    done = Rows(out)
    done.run_missing([({"setting": setting, "seed": seed},
                       lambda setting=setting, seed=seed: run_one(setting, seed, args.steps, Path(args.runs)))
                      for seed in range(1, args.seeds + 1) for setting in args.settings], args.parallel)
    done.rows.sort(key=lambda r: (r["setting"] != "per-role", r["seed"]))
    cmd = "python bench/bench_split_arith.py " + " ".join(sys.argv[1:])
    write_results(out, "# marl-split-arith: per-role adapters against one shared policy\n\n"
                  f"Command: `{cmd.strip()}` ({cpu_name()}, 1 thread per run, {args.parallel} at a time, 64 episodes per step; greedy "
                  "evaluation on 200 fixed episodes; operands 0..4, one message, then the answer)\n\n"
                  + table(done.rows) + "\n")


if __name__ == "__main__":
    main()
