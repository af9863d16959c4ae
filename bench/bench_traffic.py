"""marl-traffic over seeds: the recipe's goal measured, not asserted.

For every seed S: `python -m launch train marl-traffic train.seed=S` (the first run trains the base
marl-traffic-base through the recipe chain, so its wall time is that of `make train RECIPE=marl-traffic`
from nothing), and the same recipe for 1 step at lr 1e-12 (`train.max_steps=1 agents.tl_1.lr=1e-12`):
the base's own greedy figures on the same evaluation episodes, before RL. From each summary.json:
the greedy evaluation's mean waiting time and teleports (env.eval_metrics), SUMO's fixed-time programme
on the same episodes (summary baseline) and their ratio (eval_ratio). Goal (issue 12): mean waiting
time <= 0.7x fixed-time with no teleports.

    python bench/bench_traffic.py [--seeds 3] [--runs runs/bench-traffic] [--out bench/results/traffic-cpu.md]

Rows already in the JSON beside the table are kept (a rerun adds the missing ones); delete the runs
folder to measure the chain's wall time from nothing again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from marl_runs import run_recipe  # noqa: E402
from record_losses import cpu_name, write_results  # noqa: E402

RECIPE = "marl-traffic"
BEFORE_RL = ["train.max_steps=1", "agents.tl_1.lr=1e-12", "train.checkpoint_every=1"]


def run(name: str, runs: Path, overrides: list[str]) -> tuple[dict, float]:
    """`python -m launch train marl-traffic run.name=NAME ...` on one thread; its summary and wall time."""
    return run_recipe(RECIPE, name, runs, [f"data.cache_dir={runs / 'cache'}", *overrides])


def figures(s: dict) -> dict:
    return {"waiting": s["eval_metrics"]["mean_waiting_time"], "teleports": s["eval_metrics"]["teleports"],
            "fixed": s["baseline"]["mean_waiting_time"], "fixed_teleports": s["baseline"]["teleports"],
            "ratio": s["eval_ratio"]["mean_waiting_time"],
            "entropy": sum(a["entropy"] for a in s["agents"].values()) / len(s["agents"])}


def run_seed(seed: int, runs: Path) -> dict:
    chain = not (runs / "marl-traffic-base" / "summary.json").is_file()
    after, wall = run(f"traffic-s{seed}", runs, [f"train.seed={seed}"])
    before, wall_before = run(f"traffic-before-s{seed}", runs, [f"train.seed={seed}", *BEFORE_RL])
    return {"seed": seed, "after": figures(after), "before": figures(before), "wall_s": wall,
            "with_base": chain, "steps": after["steps"], "wall_before_s": wall_before}


def table(rows: list[dict]) -> str:
    lines = ["| seed | fixed-time (s) | base before RL (s, ratio) | after RL (s, ratio) | teleports (base, after, "
             "fixed) | entropy before / after (nats/token) | wall | goal (<= 0.7x, 0 teleports) |",
             "|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        ok = a["ratio"] <= 0.7 and a["teleports"] == 0
        wall = f"{r['wall_s'] / 60:.1f} min" + (" (base included)" if r["with_base"] else "")
        lines.append(f"| {r['seed']} | {a['fixed']:.1f} | {b['waiting']:.1f}, {b['ratio']:.3f} | "
                     f"{a['waiting']:.1f}, {a['ratio']:.3f} | {b['teleports']:g}, {a['teleports']:g}, "
                     f"{a['fixed_teleports']:g} | {b['entropy']:.3f} / {a['entropy']:.3f} | {wall} | "
                     f"{'met' if ok else 'not met'} |")
    if rows:
        n = len(rows)
        mean = lambda k, part: sum(r[part][k] for r in rows) / n  # noqa: E731
        lines += ["", f"- mean ratio to fixed-time: base before RL **{mean('ratio', 'before'):.3f}**, after RL "
                  f"**{mean('ratio', 'after'):.3f}**; goal met in {sum(r['after']['ratio'] <= 0.7 and r['after']['teleports'] == 0 for r in rows)} "
                  f"of {n} seeds; teleports after RL in all: {sum(r['after']['teleports'] for r in rows):g}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-traffic"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/traffic-cpu.md"))
    args = ap.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    store = out.with_suffix(".json")
    rows = json.loads(store.read_text()) if store.exists() else []
    for seed in range(1, args.seeds + 1):
        if not any(r["seed"] == seed for r in rows):
            rows.append(run_seed(seed, runs))
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(rows, indent=1))
            print(rows[-1], flush=True)
    cmd = "python bench/bench_traffic.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    write_results(out, "# marl-traffic over seeds (2x2grid, four LLM traffic lights, SUMO)\n\n"
                  f"Command: `{cmd.strip()}` ({cpu_name()}, 1 thread per run, one run at a time on a shared 2-core "
                  f"machine, load average {load:.1f} at the end: wall times are noisy). Greedy evaluation on 8 "
                  "fixed episodes per seed (600 s of traffic, 60 decisions per light); fixed-time: SUMO's own "
                  "programme on the same episodes (same demand and SUMO seed). Mean waiting time: per vehicle of "
                  "the demand, seconds halted plus seconds waiting to enter. Base before RL: the recipe for 1 "
                  "step at lr 1e-12 (the base's greedy policy on the same episodes).\n\n" + table(rows) + "\n")


if __name__ == "__main__":
    main()
