"""Reference controllers of the traffic env (agents.envs.traffic) over seeds: what an LLM policy has to beat.

For each net and seed, one episode of
    fixed-time    SUMO's own programme (the net's tlLogic; sumo-rl's fixed_ts=True)
    max-queue     every light picks the green phase with the most halted vehicles on its lanes, read
                  from the text observation (agents.envs.traffic_baselines.max_queue)
    max-vehicles  the same with the vehicles on the lanes (halted or not)
    random        a uniformly random phase (the env's random_action; the random-play corpus)
on the same net, demand and SUMO seed, and per controller: the mean waiting time per vehicle (halted in
the network + waiting to be inserted), its ratio to fixed-time on the same seed, teleports, vehicles
left waiting to enter, wall time per episode. The goal of issue 12 for the LLM recipe: mean waiting
time <= 0.7x fixed-time with no teleports. Then the same ratios under other episode settings (how the
defaults were picked) and the speed of one episode on libsumo against TraCI.

    python bench/bench_traffic_baselines.py [--seeds 5] [--nets single-intersection 2x2grid]
                                            [--out bench/results/traffic-baselines-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from record_losses import cpu_name, write_results  # noqa: E402

from agents.envs.traffic import TrafficEnv  # noqa: E402
from agents.envs.traffic_baselines import fixed_time, max_queue, play, random_policy  # noqa: E402

DEFAULTS = {"num_seconds": 1200, "delta_time": 10}  # TrafficEnv's defaults
SWEEP = [{"num_seconds": 600, "delta_time": 5}, {"num_seconds": 1200, "delta_time": 10},
         {"num_seconds": 1800, "delta_time": 15}, {"num_seconds": 3600, "delta_time": 10}]
GOAL = 0.7


def run_controllers(net: str, seed: int, settings: dict) -> dict[str, dict]:
    env = TrafficEnv(net=net, **settings)
    try:
        return {"fixed-time": fixed_time(seed=seed, net=net, **settings),
                "max-queue": play(env, max_queue, seed=seed),
                "max-vehicles": play(env, lambda o: max_queue(o, "vehicles"), seed=seed),
                "random": play(env, act=random_policy(np.random.default_rng(seed)), seed=seed)}
    finally:
        env.close()


def main_table(net: str, seeds: list[int], runs: dict[int, dict[str, dict]]) -> str:
    lines = [f"### {net}, {DEFAULTS['num_seconds']} s per episode, a decision every {DEFAULTS['delta_time']} s "
             f"({DEFAULTS['num_seconds'] // DEFAULTS['delta_time']} decisions)\n",
             "| controller | mean waiting time (s), mean over seeds | per seed | ratio to fixed-time (mean, worst) "
             "| teleports (all seeds) | left to enter (mean) | wall s / episode | goal (<= 0.7x, 0 teleports, "
             "every seed) |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for name in ("fixed-time", "max-queue", "max-vehicles", "random"):
        rows = [runs[s][name] for s in seeds]
        ratios = [r["mean_waiting_time"] / runs[s]["fixed-time"]["mean_waiting_time"] for r, s in zip(rows, seeds)]
        teleports = sum(r["teleports"] for r in rows)
        met = "-" if name == "fixed-time" else (
            "met" if all(x <= GOAL for x in ratios) and teleports == 0 else "not met")
        lines.append(f"| {name} | {statistics.mean(r['mean_waiting_time'] for r in rows):.1f} | "
                     f"{' '.join(format(r['mean_waiting_time'], '.1f') for r in rows)} | "
                     f"{statistics.mean(ratios):.2f}, {max(ratios):.2f} | {teleports} | "
                     f"{statistics.mean(r['backlog'] for r in rows):.1f} | "
                     f"{statistics.mean(r['wall_s'] for r in rows):.2f} | {met} |")
    vehicles = sorted({runs[s][n]["vehicles"] == runs[s]["fixed-time"]["vehicles"] for s in seeds for n in runs[s]})
    lines.append(f"\nSame demand for every controller on a seed (vehicles due): {vehicles == [True]}; "
                 f"vehicles per episode: {', '.join(str(runs[s]['fixed-time']['vehicles']) for s in seeds)}.\n")
    return "\n".join(lines)


def sweep_table(nets: list[str], seeds: list[int]) -> str:
    lines = ["| net | seconds | delta_time | decisions | fixed-time (s) | max-queue / fixed | "
             "max-vehicles / fixed | random / fixed | teleports (max-queue, max-vehicles, random) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for net in nets:
        for settings in SWEEP:
            runs = [run_controllers(net, s, settings) for s in seeds]
            fixed = [r["fixed-time"]["mean_waiting_time"] for r in runs]

            def ratio(name, runs=runs, fixed=fixed):
                return statistics.mean(r[name]["mean_waiting_time"] / f for r, f in zip(runs, fixed))

            tp = [sum(r[n]["teleports"] for r in runs) for n in ("max-queue", "max-vehicles", "random")]
            lines.append(f"| {net} | {settings['num_seconds']} | {settings['delta_time']} | "
                         f"{settings['num_seconds'] // settings['delta_time']} | {statistics.mean(fixed):.1f} | "
                         f"{ratio('max-queue'):.2f} | {ratio('max-vehicles'):.2f} | {ratio('random'):.2f} | "
                         f"{', '.join(map(str, tp))} |")
    return "\n".join(lines) + "\n"


def speed_table(nets: list[str], repeats: int = 5) -> str:
    """Episodes of max-vehicles on libsumo, then on TraCI (another env's episode holding libsumo):
    the fastest and the median of `repeats` (the machine is shared)."""
    lines = ["| net | backend | wall s / episode, fastest (reset included) | median | decisions |",
             "|---|---|---:|---:|---:|"]
    for net in nets:
        for backend in ("libsumo", "traci"):
            holder = None
            if backend == "traci":
                holder = TrafficEnv(net="single-intersection", num_seconds=60)
                holder.reset(seed=0)
            env = TrafficEnv(net=net, **DEFAULTS)
            walls = []
            for _ in range(repeats):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    obs, _ = env.reset(seed=0)
                    used, steps = env.backend, 0
                    while env.agents:
                        obs, *_ = env.step({a: max_queue(obs[a], "vehicles") for a in env.agents})
                        steps += 1
                    walls.append(time.perf_counter() - start)
            lines.append(f"| {net} | {used} | {min(walls):.2f} | {statistics.median(walls):.2f} | {steps} |")
            env.close()
            if holder is not None:
                holder.close()
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--nets", nargs="+", default=["single-intersection", "2x2grid"])
    ap.add_argument("--out", default=str(ROOT / "bench/results/traffic-baselines-cpu.md"))
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    sections = []
    for net in args.nets:
        runs = {s: run_controllers(net, s, DEFAULTS) for s in seeds}
        sections.append(main_table(net, seeds, runs))
        print(sections[-1], flush=True)
    sweep = sweep_table(args.nets, seeds)
    print(sweep, flush=True)
    speed = speed_table(args.nets)
    cmd = "python bench/bench_traffic_baselines.py " + " ".join(sys.argv[1:])
    text = ("# Traffic env: fixed-time vs heuristic vs random (agents.envs.traffic)\n\n"
            f"Command: `{cmd.strip()}` ({cpu_name()}, one process, libsumo; seeds {seeds[0]}-{seeds[-1]}; "
            f"{time.perf_counter() - start:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end, on a "
            "shared machine: wall times are noisy)\n\n"
            "Mean waiting time: per vehicle of the demand, seconds halted in the network (speed < 0.1 m/s) plus "
            "seconds waiting to be inserted, vehicles still driving or waiting at the end included (the env's "
            "final `mean_waiting_time`). Ratio: to fixed-time on the same seed. Goal of issue 12 for the LLM "
            "recipe: <= 0.7x fixed-time with no teleports.\n\n"
            + "\n".join(sections)
            + "\n## Episode settings (mean ratio over the same seeds)\n\n" + sweep
            + "\n## libsumo against TraCI (max-vehicles, seed 0, default settings, 5 episodes each)\n\n" + speed)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
