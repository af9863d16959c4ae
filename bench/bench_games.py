"""OpenSpiel's own CFR and XFP beside our LLM self-play on the same games: NashConv against iterations
and against wall time (`python bench/bench_games.py`, writes bench/results/games-cpu.md).

    python bench/bench_games.py --games kuhn_poker leduc_poker matrix_brps --budget 60 \
        --runs runs/game-kuhn runs/game-leduc runs/game-rps-biased

CFR (`cfr.CFRSolver`, vanilla CFR, average policy) and XFP (`fictitious_play.XFPSolver`, exact best
responses) run on one thread until `--budget` seconds or `--iterations`; NashConv of their average
policy (`exploitability.nash_conv`) is measured at 1, 2, 5, 10, 20, 50, ... iterations (the time spent
measuring is not counted). Ours: the NashConv rows of each run's metrics.jsonl (step, training seconds;
the run's own evaluation time is not counted either), read, not rerun: train them with
`make train RECIPE=game-kuhn` etc. first.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def checkpoints(limit: int) -> list[int]:
    out, base = [], 1
    while base <= limit:
        out += [n for n in (base, 2 * base, 5 * base) if n <= limit]
        base *= 10
    return out


def run_solver(kind: str, game_name: str, budget: float, iterations: int) -> list[dict]:
    """[{iteration, seconds, nash_conv}] of OpenSpiel's `kind` (cfr or xfp) on the game, or (psro) our
    tabular double oracle (agents.games.psro with a perfect fit: each target is the next table)."""
    from open_spiel.python.algorithms import cfr, exploitability, fictitious_play

    from agents.envs.games import load_game

    game = load_game(game_name)
    if kind == "cfr":
        solver = cfr.CFRSolver(game)
        step, average = solver.evaluate_and_update_policy, solver.average_policy
    elif kind == "xfp":
        solver = fictitious_play.XFPSolver(game)
        step, average = solver.iteration, solver.average_policy
    else:
        from agents.games.psro import Population, psro_iteration
        from agents.games.tables import InfoStates, tabular_policy

        space = InfoStates(game)
        pop, held = Population(game, space), [space.uniform()]

        def step():
            held[0] = psro_iteration(pop, held[0])[0]

        def average():
            return tabular_policy(game, space, held[0])
    marks, rows, spent = set(checkpoints(iterations)), [], 0.0
    for it in range(1, iterations + 1):
        t0 = time.perf_counter()
        step()
        spent += time.perf_counter() - t0
        if it in marks or spent >= budget:
            rows.append({"iteration": it, "seconds": spent, "nash_conv": exploitability.nash_conv(game, average())})
        if spent >= budget:
            break
    return rows


def our_rows(run_dir: Path) -> tuple[str, str, list[dict]]:
    """(game, label, [{iteration (step), seconds (training), nash_conv}]) from one of our runs; the label
    names the run and its method (rl.best_response: rl = self-play, exact = XFP with the LLM average,
    psro = PSRO with the LLM fitted to the meta-equilibrium)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = cfg.get("rl", {})
    method = (f"XFP, LLM fitted to the {rl.get('average_weighting', 'uniform')} average of exact best responses"
              if rl.get("best_response") == "exact" else
              "PSRO (double oracle), LLM fitted to the population's Nash mixture"
              if rl.get("best_response") == "psro" else
              f"self-play, {rl.get('average_weighting', 'uniform')} average, {cfg['optim'].get('optimizer', 'adamw')}")
    return cfg["env"]["args"]["game"], f"{run_dir.name}: {method}", [
        {"iteration": r["step"], "seconds": r["train_s"], "nash_conv": r["nash_conv"]}
        for r in rows if r.get("nash_conv") is not None]


def table(title: str, series: dict[str, list[dict]]) -> list[str]:
    lines = [f"### {title}", "", "| method | iterations (steps) | seconds | NashConv |", "|---|---:|---:|---:|"]
    for name, rows in series.items():
        for r in rows:
            lines.append(f"| {name} | {r['iteration']} | {r['seconds']:.2f} | {r['nash_conv']:.4f} |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--games", nargs="+", default=["kuhn_poker", "leduc_poker", "matrix_brps"])
    p.add_argument("--budget", type=float, default=60.0, help="seconds per solver and game")
    p.add_argument("--iterations", type=int, default=100000)
    p.add_argument("--runs", nargs="*", default=[], help="our run directories (their metrics.jsonl)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "games-cpu.md"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    ours: dict[str, list[tuple[str, list[dict]]]] = {}
    for run in args.runs:
        game, label, rows = our_rows(Path(run))
        ours.setdefault(game, []).append((label, rows))
    command = "python bench/bench_games.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [f"# OpenSpiel CFR and XFP beside LLM self-play ({platform.processor() or platform.machine()})", "",
             f"`{command}`", "",
             "NashConv (OpenSpiel's exploitability.nash_conv) of each method's average policy. CFR: vanilla CFR; "
             "XFP: extensive-form fictitious play with exact best responses (both OpenSpiel's Python solvers, "
             "one thread, measuring time not counted); tabular PSRO: our double oracle (agents.games.psro: "
             "exact best responses, the population's meta-game solved by LP) with tables, no LLM. Ours: the recipe's run; self-play: one step = one batch of "
             "self-play episodes and one optimizer step of the GPT policy; XFP (rl.best_response: exact): one "
             "step = one distillation step of the GPT toward the XFP target (the average of the best responses so "
             "far), an XFP iteration (exact best responses to the GPT's table) every rl.average_every steps; PSRO "
             "(rl.best_response: psro): one step = one distillation step toward the population's Nash mixture, a PSRO "
             "iteration (exact best responses to that mixture join the population) every rl.average_every steps; "
             "seconds = training seconds on the "
             "shared 2-core machine (other jobs were running).", ""]
    summary = ["| game | method | final NashConv | iterations (steps) | seconds |", "|---|---|---:|---:|---:|"]
    for game in args.games:
        series = {}
        for kind in ("cfr", "xfp", "psro"):
            print(f"{game}: {kind} ...", flush=True)
            label = "tabular PSRO (double oracle, ours)" if kind == "psro" else f"OpenSpiel {kind.upper()}"
            series[label] = run_solver(kind, game, args.budget, args.iterations)
        for name, rows in ours.get(game, []):
            series[f"ours ({name})"] = rows
        lines += table(game, series)
        for name, rows in series.items():
            if rows:
                last = rows[-1]
                summary.append(f"| {game} | {name} | {last['nash_conv']:.4f} | {last['iteration']} | "
                               f"{last['seconds']:.1f} |")
    lines[6:6] = ["## Final figures", "", *summary, ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
