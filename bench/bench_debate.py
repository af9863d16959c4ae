"""The debate-arith recipe over several seeds: single / vote / debate accuracy on the held-out problems per
fine-tuning iteration (mean and spread over seeds), the single-agent self-training baseline beside it, the
agents' diversity, and the issue's goals met or missed (`python bench/bench_debate.py`, writes
bench/results/debate-cpu.md and .json).

    python bench/bench_debate.py --seeds 0 1 2 --runs runs/bench-debate [--recipe debate-arith-30] [--args key=value ...]

Each seed is one `python -m launch train <recipe> train.seed=<seed>` (its own held-out set, training
problems, sampling and data order; recipe debate-arith unless --recipe names another debate recipe, e.g.
debate-arith-30); the base (the recipe's `recipe:...-base`, in the same output folder) is
pretrained by the first run and shared by the others, so the spread is that of the debate and fine-tuning,
not of the pretraining. A seed whose run already has a summary.json is read, not rerun.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.recipe import parse_override  # noqa: E402

OUT = "bench/results/debate-cpu"
KEYS = ["single", "vote", "debate", "diversity", "baseline/single", "baseline/vote"]


def run_seed(seed: int, runs: Path, extra: list[str], recipe: str = "debate-arith") -> tuple[dict, float | None, list[str]]:
    name = f"{recipe}-s{seed}"
    cmd = [sys.executable, "-m", "launch", "train", recipe, f"run.name={name}", f"train.seed={seed}",
           f"run.output_dir={runs}", "train.progress=false", "tracking.wandb=disabled", *extra]
    summary = runs / name / "summary.json"
    took = None
    if summary.is_file():
        _check_reused(runs / name, seed, extra)
    else:
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        took = time.perf_counter() - t0
    return json.loads(summary.read_text()), took, cmd


def _check_reused(run: Path, seed: int, extra: list[str]) -> None:
    """A finished run is read rather than rerun only when it is this seed's run with these overrides (a run
    copied in by hand once carried the recipe's default seed under another seed's name)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    # parsed as the CLI parses them, so `debate.kl_base=0` matches the run's 0.0
    for path, value in [(["train", "seed"], seed), *map(parse_override, extra)]:
        got = cfg
        for part in path:
            got = got.get(part) if isinstance(got, dict) else None
        if got != value:
            raise SystemExit(f"bench_debate: {run} was trained with {'.'.join(path)}={got!r}, not {value!r}: "
                             "move it away or name another --runs folder")


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(summaries: dict[int, dict]) -> tuple[list[dict], dict]:
    iterations = sorted({r["iteration"] for s in summaries.values() for r in s["per_iteration"]})
    table = []
    for it in iterations:
        row = {"iteration": it}
        for k in KEYS:
            vals = [r[k] for s in summaries.values() for r in s["per_iteration"] if r["iteration"] == it
                    and r.get(k) is not None]
            if vals:
                row[k] = spread(vals)
        table.append(row)
    first, last = table[0], table[-1]
    goals = {"debate_minus_single_before": first["debate"]["mean"] - first["single"]["mean"],
             "diversity_ratio": last["diversity"]["mean"] / first["diversity"]["mean"] if first["diversity"]["mean"]
             else None}
    goals["debate_beats_single_by_5_before"] = goals["debate_minus_single_before"] >= 0.05
    goals["diversity_kept_80"] = goals["diversity_ratio"] is not None and goals["diversity_ratio"] >= 0.8
    if "baseline/vote" in last:
        goals["debate_minus_baseline_after"] = last["debate"]["mean"] - last["baseline/vote"]["mean"]
        goals["beats_baseline_by_2_after"] = goals["debate_minus_baseline_after"] >= 0.02
    return table, goals


def markdown(table: list[dict], goals: dict, summaries: dict, times: dict, cmd: str,
             recipe: str = "debate-arith") -> str:
    def cell(v):
        return "-" if v is None else f"{v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})"

    lines = [f"# {recipe} on CPU ({platform.processor() or platform.machine()}), seeds "
             f"{', '.join(str(s) for s in summaries)}", "",
             f"Command: `{cmd}`", "",
             "Accuracy on each seed's 500 held-out problems, mean (min-max over seeds). single: each agent's "
             "round-1 accuracy, mean of agents; vote: majority of round 1; debate: majority after round 2; "
             "diversity: agent pairs whose round-1 answers differ. baseline: single-agent self-training (one agent "
             "fine-tuned on the majority of its own 6 samples per problem), single = mean accuracy of 3 samples, "
             "vote = their majority.", "",
             "| iteration | " + " | ".join(KEYS) + " |", "|" + "---|" * (len(KEYS) + 1)]
    for r in table:
        lines.append(f"| {r['iteration']} | " + " | ".join(cell(r.get(k)) for k in KEYS) + " |")
    lines += ["", "Per seed (debate, baseline vote, diversity at each iteration):", ""]
    for seed, s in summaries.items():
        lines.append(f"- seed {seed}: " + "; ".join(
            f"it {r['iteration']}: {r['debate']:.3f} / {r.get('baseline/vote') or 0:.3f} / {r['diversity']:.3f}"
            for r in s["per_iteration"]) + (f" ({times[seed]:.0f} s)" if times.get(seed) else ""))
    lines += ["", "Goals (on the means):", ""]
    g = goals
    lines.append(f"- debate beats the single agent by >= 5 points before fine-tuning: "
                 f"{100 * g['debate_minus_single_before']:+.1f} points: "
                 f"{'met' if g['debate_beats_single_by_5_before'] else 'missed'}")
    if "debate_minus_baseline_after" in g:
        lines.append(f"- after K iterations multi-agent fine-tuning (debate) beats single-agent self-training "
                     f"(its vote) by >= 2 points: {100 * g['debate_minus_baseline_after']:+.1f} points: "
                     f"{'met' if g['beats_baseline_by_2_after'] else 'missed'}")
    if g["diversity_ratio"] is not None:
        lines.append(f"- diversity stays >= 80% of its starting value: {100 * g['diversity_ratio']:.0f}%: "
                     f"{'met' if g['diversity_kept_80'] else 'missed'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/bench-debate")
    ap.add_argument("--recipe", default="debate-arith", help="the debate recipe (debate-arith, debate-arith-30)")
    ap.add_argument("--args", nargs="*", default=[], help="extra recipe overrides (key=value)")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    runs = Path(a.runs).resolve()
    summaries, times = {}, {}
    for seed in a.seeds:
        summaries[seed], times[seed], _ = run_seed(seed, runs, a.args, a.recipe)
    table, goals = aggregate(summaries)
    cmd = "python bench/bench_debate.py " + shlex.join(["--seeds", *map(str, a.seeds), "--runs", a.runs]
                                                       + (["--recipe", a.recipe] if a.recipe != "debate-arith" else [])
                                                       + (["--out", a.out] if a.out != OUT else [])
                                                       + (["--args", *a.args] if a.args else []))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "table": table, "goals": goals, "seconds": times,
                                                    "runs": {s: v["per_iteration"] for s, v in summaries.items()}},
                                                   indent=1))
    text = markdown(table, goals, summaries, times, cmd, a.recipe)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
