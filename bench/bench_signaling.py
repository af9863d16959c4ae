"""marl-signaling over seeds and entropy weights: the recipe's learning goal measured, not asserted.

For every (alpha setting, seed): `python -m launch train marl-signaling train.seed=S ...` (300 steps,
the base `marl-signaling-base` trained once by the recipe chain), then from its summary.json the
greedy team success over 200 evaluation episodes, the lowest per-object success (`success_by`,
env.eval_group_by: target), the success with the message blanked (chance 0.1), each agent's entropy
at the end and the wall time. Goal (issue 12): success >= 0.99 on every object in at least 9 of 10
seeds; blanked, success at chance.

    python bench/bench_signaling.py [--seeds 10] [--other-seeds 3] [--parallel 1]
                                    [--settings recipe speaker-only none]
                                    [--out bench/results/signaling-cpu.md]

Rows already in the JSON beside the table are kept (reruns add the missing ones).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from marl_runs import Rows, run_recipe  # noqa: E402
from record_losses import cpu_name, write_results  # noqa: E402

SETTINGS = {
    "recipe": [],  # speaker alpha 0.001, listener alpha 0.001
    "speaker-only": ["agents.listener.alpha=0.0"],
    "none": ["agents.speaker.alpha=0.0", "agents.listener.alpha=0.0"],
}


def run_one(setting: str, seed: int, runs: Path) -> dict:
    s, wall = run_recipe("marl-signaling", f"signaling-{setting}-s{seed}", runs, [f"train.seed={seed}", *SETTINGS[setting]])
    return {"setting": setting, "seed": seed, "success": s["success"], "min_by_object": s["success_min_by"],
            "blanked": s["success_with_eval_options"], "speaker_entropy": s["agents"]["speaker"]["entropy"],
            "listener_entropy": s["agents"]["listener"]["entropy"], "wall_s": wall}


def table(rows: list[dict], seeds: int) -> str:
    lines = ["| alpha (speaker, listener) | seed | success | lowest per object | message blanked | "
             "entropy speaker / listener (nats/token) | wall |", "|---|---:|---:|---:|---:|---:|---:|"]
    alphas = {"recipe": "0.001, 0.001", "speaker-only": "0.001, 0", "none": "0, 0"}
    for r in rows:
        lines.append(f"| {alphas[r['setting']]} | {r['seed']} | {r['success']:.3f} | {r['min_by_object']:.2f} | "
                     f"{r['blanked']:.3f} | {r['speaker_entropy']:.3f} / {r['listener_entropy']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    lines.append("")
    for setting in alphas:
        mine = [r for r in rows if r["setting"] == setting]
        if mine:
            ok = sum(r["min_by_object"] >= 0.99 for r in mine)
            lines.append(f"- alpha {alphas[setting]}: every object >= 0.99 in **{ok} of {len(mine)} seeds**; "
                         f"mean success {sum(r['success'] for r in mine) / len(mine):.3f}, blanked "
                         f"{sum(r['blanked'] for r in mine) / len(mine):.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds of the recipe's setting")
    ap.add_argument("--other-seeds", type=int, default=3, help="seeds of the other settings")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-signaling"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/signaling-cpu.md"))
    args = ap.parse_args()
    out = Path(args.out)
    done = Rows(out)
    done.run_missing([({"setting": setting, "seed": seed}, lambda setting=setting, seed=seed: run_one(setting, seed, Path(args.runs)))
                      for setting in args.settings
                      for seed in range(1, (args.seeds if setting == "recipe" else args.other_seeds) + 1)], args.parallel)
    rows = sorted(done.rows, key=lambda r: (list(SETTINGS).index(r["setting"]), r["seed"]))
    cmd = "python bench/bench_signaling.py " + " ".join(sys.argv[1:])
    write_results(out, "# marl-signaling over seeds and entropy weights\n\n"
                  f"Command: `{cmd.strip()}` ({cpu_name()}, 1 thread per run, 300 steps of 64 episodes; "
                  "greedy evaluation on 200 fixed episodes)\n\n" + table(rows, args.seeds) + "\n")


if __name__ == "__main__":
    main()
