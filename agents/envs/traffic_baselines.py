"""Reference controllers for the traffic env (agents.envs.traffic): SUMO's fixed-time programme, a
max-queue heuristic that reads only the text observation, and random play.

    fixed_time(seed=0)                      SUMO's own programme (the net's tlLogic; sumo-rl's
                                            fixed_ts=True) on the env's net, demand and seed
    play(TrafficEnv(), max_queue, seed=0)   an episode of a text policy
Each returns the env's final-step figures (mean_waiting_time, teleports, departed, backlog, sumo_seed)
and wall_s. The goal of issue 12 for an LLM policy is mean_waiting_time <= 0.7x fixed_time's on the same
seed, with no teleports; bench/bench_traffic_baselines.py compares the three.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import numpy as np

from .traffic import TrafficEnv, make_simulation, sumo_seed

__all__ = ["fixed_time", "max_queue", "parse_observation", "play", "random_policy"]

_PHASE = re.compile(r"Phase (\d+) for (\d+)s, (can switch|must hold)\.")
_LANE = re.compile(r"([A-Z][0-9]*) (\d+)/(\d+)")
_GREEN = re.compile(r"(\d+)=([A-Z0-9]*)")
_NAME = re.compile(r"[A-Z][0-9]*")


def fixed_time(seed: int = 0, net: str = "single-intersection", num_seconds: int = 1200, delta_time: int = 10,
               yellow_time: int = 2, min_green: int = 5, reward_fn: str = "diff-waiting-time",
               time_to_teleport: int = 300) -> dict:
    """One episode of the net's fixed-time programme with the SUMO seed of `TrafficEnv.reset(seed=seed)`
    (same arguments as TrafficEnv; yellow_time, min_green and reward_fn do not change it)."""
    start = time.perf_counter()
    sim = make_simulation(net, num_seconds, delta_time, yellow_time, min_green, reward_fn, time_to_teleport,
                          fixed_ts=True)
    try:
        s = sumo_seed(seed)
        sim.reset(seed=s)
        done = False
        while not done:
            done = bool(sim.step(None)[2]["__all__"])
        out = dict(sim.episode_metrics(), sumo_seed=s)
    finally:
        sim.close()
    out["wall_s"] = time.perf_counter() - start
    return out


def parse_observation(text: str) -> dict:
    """The parts of a traffic observation: phase, seconds, can_switch, lanes {name: (halted, vehicles)},
    green [lane names per phase]."""
    phase, seconds, state = _PHASE.search(text).groups()
    lanes_line = next(line for line in text.splitlines() if line.startswith("Halted/vehicles:"))
    green_line = next(line for line in text.splitlines() if line.startswith("Green:"))
    lanes = {n: (int(h), int(v)) for n, h, v in _LANE.findall(lanes_line)}
    green = [_NAME.findall(names) for _, names in _GREEN.findall(green_line)]
    return {"phase": int(phase), "seconds": int(seconds), "can_switch": state == "can switch", "lanes": lanes,
            "green": green}


def max_queue(observation: str, count: str = "halted") -> str:
    """The green phase whose lanes hold the most halted vehicles (count="vehicles": the most vehicles),
    the current phase on a tie; parsed from the text observation alone."""
    o = parse_observation(observation)
    k = 0 if count == "halted" else 1
    scores = [sum(o["lanes"][n][k] for n in names) for names in o["green"]]
    best = max(scores)
    return str(o["phase"] if scores[o["phase"]] == best else scores.index(best))


def random_policy(rng: np.random.Generator) -> Callable[[TrafficEnv, str], str]:
    def act(env: TrafficEnv, agent: str) -> str:
        return env.random_action(agent, rng)
    return act


def play(env: TrafficEnv, policy: Callable[[str], str] | None = None, seed: int = 0,
         act: Callable[[TrafficEnv, str], str] | None = None) -> dict:
    """One episode with every light choosing `policy(observation)` (or `act(env, agent)`); the final
    infos' figures, the decisions taken and wall_s."""
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    infos, steps = {}, 0
    while env.agents:
        actions = {a: act(env, a) if act is not None else policy(obs[a]) for a in env.agents}
        obs, _, _, _, infos = env.step(actions)
        steps += 1
    final = next(iter(infos.values()))
    keys = ("mean_waiting_time", "network_waiting_time", "teleports", "vehicles", "departed", "backlog",
            "sumo_seed", "invalid_actions")
    out = {k: final[k] for k in keys}
    out.update(steps=steps, wall_s=time.perf_counter() - start)
    return out
