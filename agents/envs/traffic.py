"""Traffic-signal control on a real traffic simulator: sumo-rl over SUMO, one agent per traffic light,
observations and actions in text.

    env = TrafficEnv()                          # "single-intersection": one light, agent "tl_t"
    obs, infos = env.reset(seed=0)
    while env.agents:
        obs, rewards, terminations, truncations, infos = env.step({a: "1" for a in env.agents})
    infos["tl_t"]["mean_waiting_time"], infos["tl_t"]["teleports"]

Agents are named "tl_<id>" after the lights' SUMO ids (single-intersection: "tl_t"; 2x2grid: "tl_1",
"tl_2", "tl_5", "tl_6"). Every light acts at every step (all agents are in `turn_agents`, infos "turn" is True for all): each
step applies every light's chosen green phase and advances SUMO by `delta_time` simulated seconds
(sumo-rl's `SumoEnvironment.step`); an episode is ceil(num_seconds / delta_time) steps and ends by
truncation (the simulation has no terminal state). Rewards are sumo-rl's `reward_fn` for each light
(default "diff-waiting-time": the drop, over the step, of the accumulated waiting time on the light's
incoming lanes, in 100 s units).

Observation of a light (exact text; about 100-170 characters for the shipped nets):
    "Phase 1 for 12s, can switch.\n"          current green phase, seconds since it was chosen, and
                                              "can switch" / "must hold" (sumo-rl's min-green flag:
                                              a change is only applied after yellow_time + min_green s)
    "Halted/vehicles: A 3/5 B 0/2 C 7/7 D 0/0\n"  per incoming lane (letters in sumo-rl's lane order):
                                              halting vehicles (speed < 0.1 m/s) / vehicles on the lane
    "Green: 0=AB 1=CD\n"                      the green phases and the lanes each lets go
    "Next phase (0-1)?"
The numbers are sumo-rl's own observation before normalisation: its queue and density of lane i are
halted_i / capacity_i and vehicles_i / capacity_i (clipped to 1), capacity_i = lane length / (2.5 m +
mean vehicle length on the lane); tests/test_envs_traffic.py checks the text against it.

Action: the first integer in the text ("1", "phase 1", "1." all choose phase 1). No integer, a phase out
of range or a non-string action is invalid: the light keeps its current phase, `infos[a]["invalid"]`
is True and `infos[a]["invalid_actions"]` counts it; the reward is what sumo-rl gives; it never raises.

Final-step infos (every agent), the whole network over the episode, counted every simulated second:
    mean_waiting_time     (vehicle-seconds halted in the network (speed < 0.1 m/s, every edge) +
                          vehicle-seconds waiting to be inserted) / vehicles: per vehicle of the
                          demand, SUMO's `waitingTime` plus its insertion delay, vehicles still driving
                          or waiting at the end included. The insertion part matters: a queue that
                          reaches the network's border blocks insertion, and without it a policy that
                          keeps vehicles out of the network would look good (measured: random play's
                          in-network figure alone is below the fixed-time programme's)
    network_waiting_time  vehicle-seconds halted in the network / departed (without insertion delay)
    teleports             vehicles SUMO teleported (stuck longer than `time_to_teleport` seconds)
    vehicles              vehicles of the demand so far: departed + backlog (the same for every
                          policy on one seed: the demand does not depend on the lights)
    departed, backlog     vehicles that entered the network / still waiting to enter at the end
    sumo_seed             the episode's SUMO --seed
There is no `success`. The goal of issue 12 is mean_waiting_time <= 0.7x SUMO's fixed-time programme
on the same net, demand and seed (`agents.envs.traffic_baselines.fixed_time`) with no teleports.

Seeds: one `numpy.random.Generator` per env, as in agents.envs.base: `reset(seed=s)` reseeds it,
`reset()` continues its stream; each reset draws the episode's SUMO --seed from it (`sumo_seed(s)` is
the seed of `reset(seed=s)`). Same seed, same actions -> same observations. `state_dict()` /
`load_state_dict()` save and restore the generator and the episode counter.

libsumo and several envs in one process. With the `libsumo` package SUMO runs inside this process
(4-6x faster per episode than TraCI here, ~30x with traci.start's 1 s wait and a call per query, which
this env avoids: bench/results/traffic-baselines-cpu.md). libsumo holds ONE simulation per
process: a second `libsumo.start` silently replaces the first (measured, SUMO 1.28). So the first env
whose episode starts while no libsumo simulation is loaded takes libsumo, and an env that starts an
episode while another env's libsumo simulation runs falls back to TraCI (a SUMO process and a socket,
~0.1 s to start, 4-6x slower per episode), with one warning per process. An env closes its simulation
when its episode ends (and on `close()`), so envs used one after the other all get libsumo; K
simultaneous episodes (agents.rollout with K > 1) run one on libsumo and K - 1 on TraCI. Without
libsumo installed every env uses TraCI (one warning). SUMO_HOME is set from the `eclipse-sumo` wheel
(`sumo.SUMO_HOME`) when it is not set.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import re
import string
import subprocess
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .base import SimultaneousTextEnv, check_int, text_space

__all__ = ["NETS", "REWARD_FNS", "TrafficEnv", "make_simulation", "net_files", "sumo_seed"]

if "SUMO_HOME" not in os.environ:
    import sumo

    os.environ["SUMO_HOME"] = sumo.SUMO_HOME

import sumo_rl.environment.env as _srl  # noqa: E402  (needs SUMO_HOME)
import traci.constants as tc  # noqa: E402
import traci.main as _traci  # noqa: E402  (the pure-python TraCI, even under LIBSUMO_AS_TRACI)
from sumo_rl.environment.traffic_signal import TrafficSignal  # noqa: E402

# name -> (net file, route file) under sumo_rl/nets/ (the demand sumo-rl's own experiments use). Not
# 3x3grid: its programme's yellow phases are written "Y", which sumo-rl 1.4.5 takes for green phases
# (its test is `"y" not in state`), so half of its "phases" would be yellow.
NETS = {
    "single-intersection": ("single-intersection/single-intersection.net.xml",
                            "single-intersection/single-intersection.rou.xml"),
    "2way-single-intersection": ("2way-single-intersection/single-intersection.net.xml",
                                 "2way-single-intersection/single-intersection-vhvh.rou.xml"),
    "2x2grid": ("2x2grid/2x2.net.xml", "2x2grid/2x2.rou.xml"),
    "4x4-Lucas": ("4x4-Lucas/4x4.net.xml", "4x4-Lucas/4x4c1c2c1c2.rou.xml"),
    "4x4loop": ("4x4loop/4x4loop.net.xml", "4x4loop/4x4loop.rou.xml"),
}
REWARD_FNS = tuple(TrafficSignal.reward_fns)
SEED_LIMIT = 2**31 - 1  # SUMO's --seed is a 32-bit int
_MAX_COUNT = 999  # counts and seconds in the text are capped at 3 digits (bounds the Text space)
_INT = re.compile(r"-?[0-9]+")
_SUMO_FLAGS = "--no-step-log --duration-log.disable"


def net_files(net: str) -> tuple[str, str]:
    """(net file, route file) of a net shipped with sumo_rl, by name; ValueError naming the known ones."""
    if net not in NETS:
        raise ValueError(f"traffic: unknown net {net!r}; nets: {', '.join(NETS)}")
    root = Path(importlib.util.find_spec("sumo_rl").origin).parent / "nets"
    return tuple(str(root / f) for f in NETS[net])


def sumo_seed(seed: int) -> int:
    """The SUMO --seed of the episode `reset(seed=seed)` starts."""
    return int(np.random.default_rng(seed).integers(SEED_LIMIT))


# libsumo: one simulation per process ----------------------------------------------------------------

_libsumo: Any = None  # the module once imported; False when it is not installed
_holder: Any = None  # weakref to the _Simulation whose simulation libsumo runs
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _free_libsumo():
    """The libsumo module when no simulation is loaded in it, else None (warning once why)."""
    global _libsumo
    if _libsumo is None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a pyarrow version note
                import libsumo
            _libsumo = libsumo
        except ImportError:
            _libsumo = False
    if _libsumo is False:
        _warn_once("missing", "traffic: libsumo is not installed; SUMO runs through TraCI (a process and "
                              "a socket), 4-6x slower: pip install libsumo (pinned in requirements.txt)")
        return None
    holder = _holder() if _holder is not None else None
    if (holder is not None and holder.sumo is not None) or _libsumo.isLoaded():
        _warn_once("busy", "traffic: libsumo runs one simulation per process and another env's episode "
                           "holds it; this env (and any other simultaneous one) runs SUMO through TraCI, "
                           "4-6x slower per episode")
        return None
    return _libsumo


class _QuietTraci:
    """TraCI whose `start` sends SUMO's stdout (a progress line per step) to /dev/null and polls for
    SUMO's socket every 20 ms (traci.start tries once, then sleeps 1 s: ~1 s per start)."""

    def __getattr__(self, name):
        return getattr(_traci, name)

    @staticmethod
    def start(cmd, label="default", **_):
        for _attempt in range(3):  # a port taken between getFreeSocketPort and SUMO's bind: another port
            port = _traci.getFreeSocketPort()
            proc = subprocess.Popen(cmd + ["--remote-port", str(port)], stdout=subprocess.DEVNULL)
            try:
                _traci.connect(port, numRetries=1000, proc=proc, waitBetweenRetries=0.02, label=label)
            except _traci.TraCIException:
                proc.kill()
                continue
            _traci.switch(label)
            return
        raise _traci.FatalTraCIError("traffic: could not connect to SUMO through TraCI")


@contextlib.contextmanager
def _backend(lib):
    """sumo-rl's module globals (`LIBSUMO`, `traci`) set for one backend while sumo-rl starts or closes
    a simulation (everything else in sumo-rl goes through the connection it keeps)."""
    saved = _srl.LIBSUMO, _srl.traci
    _srl.LIBSUMO, _srl.traci = (True, lib) if lib is not None else (False, _QuietTraci())
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TraCI prints "Retrying in 1 seconds"
            yield
    finally:
        _srl.LIBSUMO, _srl.traci = saved


class _Simulation(_srl.SumoEnvironment):
    """sumo-rl's SumoEnvironment choosing libsumo or TraCI per simulation, and counting, every
    simulated second, halted vehicles, departures, insertions and teleports over the whole network."""

    def __init__(self, **kwargs):
        self.sumo = None
        self._lib = _free_libsumo()
        with _backend(self._lib):
            super().__init__(**kwargs)
        self._lib = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.halted_seconds = 0  # vehicle-seconds halted in the network
        self.insertion_seconds = 0  # vehicle-seconds waiting to be inserted (depart delay)
        self.departed = 0
        self.backlog = 0
        self.teleports = 0

    def _start_simulation(self):
        global _holder
        self._lib = _free_libsumo()
        with _backend(self._lib):
            super()._start_simulation()
        if self._lib is not None:
            _holder = weakref.ref(self)
        # One subscription result per simulated second instead of a call per edge (a socket round trip
        # each under TraCI).
        self.sumo.simulation.subscribe([tc.VAR_DEPARTED_VEHICLES_NUMBER, tc.VAR_TELEPORT_STARTING_VEHICLES_NUMBER,
                                        tc.VAR_PENDING_VEHICLES])
        for e in self.sumo.edge.getIDList():
            self.sumo.edge.subscribe(e, [tc.LAST_STEP_VEHICLE_HALTING_NUMBER])
        self._reset_counts()

    @property
    def backend(self) -> str | None:
        """"libsumo" or "traci" while a simulation runs, else None."""
        return None if self.sumo is None else ("libsumo" if self._lib is not None else "traci")

    def _sumo_step(self):
        self.sumo.simulationStep()
        sim = self.sumo.simulation.getSubscriptionResults()
        self.departed += sim[tc.VAR_DEPARTED_VEHICLES_NUMBER]
        self.teleports += sim[tc.VAR_TELEPORT_STARTING_VEHICLES_NUMBER]
        self.backlog = len(sim[tc.VAR_PENDING_VEHICLES])
        self.insertion_seconds += self.backlog
        edges = self.sumo.edge.getAllSubscriptionResults()
        self.halted_seconds += sum(r[tc.LAST_STEP_VEHICLE_HALTING_NUMBER] for r in edges.values())

    def episode_metrics(self) -> dict:
        vehicles = self.departed + self.backlog
        return {"mean_waiting_time": (self.halted_seconds + self.insertion_seconds) / max(vehicles, 1),
                "network_waiting_time": self.halted_seconds / max(self.departed, 1),
                "teleports": self.teleports, "vehicles": vehicles, "departed": self.departed,
                "backlog": self.backlog}

    def close(self):
        global _holder
        if getattr(self, "sumo", None) is None:
            return
        with _backend(self._lib):
            super().close()
        if _holder is not None and _holder() is self:
            _holder = None
        self._lib = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def check_args(net: str, num_seconds: int, delta_time: int, yellow_time: int, min_green: int, reward_fn: str,
               time_to_teleport: int) -> None:
    net_files(net)
    check_int("traffic", "delta_time", delta_time, 1)
    check_int("traffic", "num_seconds", num_seconds, delta_time)
    # sumo-rl: delta_time > yellow_time; a yellow of 0 s would never end (its update tests == yellow_time)
    check_int("traffic", "yellow_time", yellow_time, 1, delta_time - 1)
    check_int("traffic", "min_green", min_green, 0)
    check_int("traffic", "time_to_teleport", time_to_teleport, -1)
    if reward_fn not in REWARD_FNS:
        raise ValueError(f"traffic: unknown reward_fn {reward_fn!r}; reward_fns: {', '.join(REWARD_FNS)}")


def make_simulation(net: str, num_seconds: int, delta_time: int, yellow_time: int, min_green: int,
                    reward_fn: str, time_to_teleport: int, fixed_ts: bool = False,
                    sumo_args: str = "") -> _Simulation:
    """The sumo-rl simulation of a TrafficEnv's settings (fixed_ts=True: SUMO's own programme runs and
    actions are ignored; sumo_args: more SUMO options); its episode's seed is reset(seed=sumo seed)'s."""
    check_args(net, num_seconds, delta_time, yellow_time, min_green, reward_fn, time_to_teleport)
    net_file, route_file = net_files(net)
    return _Simulation(net_file=net_file, route_file=route_file, num_seconds=num_seconds, delta_time=delta_time,
                       yellow_time=yellow_time, min_green=min_green, reward_fn=reward_fn,
                       time_to_teleport=time_to_teleport, max_depart_delay=-1, waiting_time_memory=10**6,
                       add_system_info=False, add_per_agent_info=False, sumo_warnings=False, fixed_ts=fixed_ts,
                       additional_sumo_cmd=f"{_SUMO_FLAGS} {sumo_args}", sumo_seed=0)


def _lane_names(n: int) -> list[str]:
    return list(string.ascii_uppercase[:n]) if n <= 26 else [f"L{i}" for i in range(n)]


class TrafficEnv(SimultaneousTextEnv):
    """One agent per traffic light of a sumo-rl net (see the module docstring), named "tl_<id>" after the
    light's SUMO id (single-intersection: "tl_t"; 2x2grid: "tl_1", "tl_2", "tl_5", "tl_6"); every light
    acts at every step. Arguments:
        net               a net shipped with sumo_rl (NETS; default "single-intersection", one light)
        num_seconds       simulated seconds per episode (>= delta_time; default 1200)
        delta_time        simulated seconds per step (default 10: 120 decisions per episode, and
                          every decision may switch: 10 >= yellow_time + min_green)
        yellow_time       seconds of yellow when a light changes phase (1..delta_time - 1; default 2)
        min_green         a change is applied only yellow_time + min_green s after the last (default 5)
        reward_fn         sumo-rl's reward: diff-waiting-time (default), average-speed, queue, pressure
        time_to_teleport  SUMO teleports a vehicle stuck this long (s; -1 never; default 300, SUMO's)
    """

    metadata = {"name": "traffic", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(self, net: str = "single-intersection", num_seconds: int = 1200, delta_time: int = 10,
                 yellow_time: int = 2, min_green: int = 5, reward_fn: str = "diff-waiting-time",
                 time_to_teleport: int = 300, render_mode: str | None = None):
        if render_mode not in (None, "ansi"):
            raise ValueError(f"traffic: render_mode must be None or 'ansi', got {render_mode!r}")
        self.render_mode = render_mode
        self.net = net
        self.num_seconds, self.delta_time = num_seconds, delta_time
        self.args = dict(net=net, num_seconds=num_seconds, delta_time=delta_time, yellow_time=yellow_time,
                         min_green=min_green, reward_fn=reward_fn, time_to_teleport=time_to_teleport)
        self.sim = make_simulation(net, num_seconds, delta_time, yellow_time, min_green, reward_fn,
                                   time_to_teleport)
        # agent "tl_<id>" for the light <id> of the net (a name that stays a string as a YAML key)
        self.possible_agents = [f"tl_{t}" for t in self.sim.ts_ids]
        self._ts = dict(zip(self.possible_agents, self.sim.ts_ids))
        self.ts_ids = dict(self._ts)  # agent -> the light's SUMO id
        self._lanes = {a: list(self.sim.traffic_signals[t].lanes) for a, t in self._ts.items()}
        self._phases = {a: self.sim.traffic_signals[t].num_green_phases for a, t in self._ts.items()}
        self._green_lanes: dict[str, list[list[int]]] = {}
        obs_max = {a: len(self._text(a, self._phases[a] - 1, _MAX_COUNT, False,
                                     [(_MAX_COUNT, _MAX_COUNT)] * len(self._lanes[a]),
                                     [list(range(len(self._lanes[a])))] * self._phases[a]))
                   for a in self.possible_agents}
        self.observation_spaces = {a: text_space(obs_max[a]) for a in self.possible_agents}
        # An answer longer than this is still read; the bound only shapes the space (and sampling).
        self.action_spaces = {a: text_space(16) for a in self.possible_agents}
        self.agents: list[str] = []
        self.np_random: np.random.Generator | None = None
        self.episodes = 0
        self.sumo_seed: int | None = None
        self.numeric: dict[str, np.ndarray] = {}  # agent -> sumo-rl's own observation of the current state
        self._steps = 0
        self._invalid: dict[str, int] = {}

    @property
    def backend(self) -> str | None:
        """"libsumo" or "traci" while an episode runs, else None."""
        return self.sim.backend

    # ---------------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.np_random = np.random.default_rng(seed)
        elif self.np_random is None:
            self.np_random = np.random.default_rng()
        self.sumo_seed = int(self.np_random.integers(SEED_LIMIT))
        self.sim.close()
        self.sim.sumo_seed = self.sumo_seed
        numeric = self.sim.reset(seed=self.sumo_seed)
        self.numeric = {a: numeric[t] for a, t in self._ts.items()}
        conn = self.sim.sumo
        for a, t in self._ts.items():
            links = conn.trafficlight.getControlledLinks(t)
            index = {lane: i for i, lane in enumerate(self._lanes[a])}
            self._green_lanes[a] = [
                sorted({index[link[0][0]] for s, link in enumerate(links) if link and p.state[s] in "Gg"})
                for p in self.sim.traffic_signals[t].green_phases]
        self.episodes += 1
        self.agents = list(self.possible_agents)
        self._steps = 0
        self._invalid = {a: 0 for a in self.agents}
        return self._observations(), self._infos({})

    def parse_phase(self, agent: str, action) -> int | None:
        """The phase an action names (the first integer in the text), or None when invalid."""
        if not isinstance(action, str):
            return None
        m = _INT.search(action)
        if m is None or len(m.group()) > 6:
            return None
        phase = int(m.group())
        return phase if 0 <= phase < self._phases[agent] else None

    def step(self, actions: dict):
        if not self.agents:
            raise RuntimeError("TrafficEnv.step: the episode is over; call reset() first")
        unknown = [a for a in actions if a not in self.agents]
        if unknown:
            raise ValueError(f"TrafficEnv.step: unknown agent {unknown[0]!r}; agents: {', '.join(self.agents)}")
        chosen, invalid = {}, {}
        for a, t in self._ts.items():
            phase = self.parse_phase(a, actions.get(a))
            invalid[a] = phase is None
            if phase is None:
                self._invalid[a] += 1
                phase = self.sim.traffic_signals[t].green_phase  # keep the current phase
            chosen[t] = phase
        numeric, rewards, dones, _ = self.sim.step(chosen)
        self.numeric.update({a: numeric[t] for a, t in self._ts.items() if t in numeric})
        self._steps += 1
        done = bool(dones["__all__"])
        outcome = None
        if done:
            outcome = dict(self.sim.episode_metrics(), sumo_seed=self.sumo_seed)
        observations = self._observations()
        infos = self._infos(invalid, outcome)
        rewards = {a: float(rewards.get(t, 0.0)) for a, t in self._ts.items()}
        terminations = {a: False for a in self.agents}
        truncations = {a: done for a in self.agents}
        if done:
            self.sim.close()  # frees libsumo for the next env
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def _infos(self, invalid: dict[str, bool], outcome: dict | None = None) -> dict[str, dict]:
        infos = {}
        for a in self.agents:
            info = {"turn": True, "invalid": invalid.get(a, False), "invalid_actions": self._invalid[a],
                    "step": self._steps}
            if outcome is not None:
                info.update(copy.deepcopy(outcome))
            infos[a] = info
        return infos

    # Text ------------------------------------------------------------------------------------------

    def _text(self, agent: str, phase: int, seconds: int, can_switch: bool, counts: list[tuple[int, int]],
              green: list[list[int]]) -> str:
        names = _lane_names(len(counts))
        lanes = " ".join(f"{n} {h}/{v}" for n, (h, v) in zip(names, counts))
        phases = " ".join(f"{i}={''.join(names[j] for j in g)}" for i, g in enumerate(green))
        state = "can switch" if can_switch else "must hold"
        return (f"Phase {phase} for {seconds}s, {state}.\nHalted/vehicles: {lanes}\nGreen: {phases}\n"
                f"Next phase (0-{len(green) - 1})?")

    def lane_counts(self, agent: str) -> list[tuple[int, int]]:
        """(halting, vehicles) on each incoming lane of the light, in sumo-rl's lane order."""
        lane = self.sim.sumo.lane
        return [(lane.getLastStepHaltingNumber(x), lane.getLastStepVehicleNumber(x)) for x in self._lanes[agent]]

    def observe(self, agent: str) -> str:
        """The agent's text observation of the current state (an episode must be running)."""
        ts = self.sim.traffic_signals[self._ts[agent]]
        counts = [(min(h, _MAX_COUNT), min(v, _MAX_COUNT)) for h, v in self.lane_counts(agent)]
        can_switch = ts.time_since_last_phase_change >= ts.min_green + ts.yellow_time
        return self._text(agent, ts.green_phase, min(ts.time_since_last_phase_change, _MAX_COUNT), can_switch,
                          counts, self._green_lanes[agent])

    def _observations(self) -> dict[str, str]:
        return {a: self.observe(a) for a in self.agents}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(f"[{a}]\n{self.observe(a)}" for a in self.agents) or "(episode over)"

    def random_action(self, agent: str, rng: np.random.Generator) -> str:
        """A green phase of the light drawn uniformly, as text (random play, for agents.corpus)."""
        return str(int(rng.integers(self._phases[agent])))

    def corpus_action(self, agent: str, rng: np.random.Generator, p_max_queue: float = 0.5) -> str:
        """The corpus player's action (agents.corpus): with probability `p_max_queue` the max-queue
        phase of the current observation (the green phase whose lanes hold the most halted vehicles,
        traffic_baselines.max_queue), else a uniformly random phase. A base pretrained on this play
        reads the lanes (its greedy choice is max-queue's when it learned the mixture) without being
        told what wins; one pretrained on uniform play would ignore the observation altogether."""
        if rng.random() < p_max_queue:
            from .traffic_baselines import max_queue

            return max_queue(self.observe(agent))
        return self.random_action(agent, rng)

    def baseline_metrics(self, seed: int) -> dict:
        """The final infos of SUMO's fixed-time programme on the episode `reset(seed=seed)` starts (same
        net, demand and SUMO seed; traffic_baselines.fixed_time): what agents.train compares its
        evaluation against (env.eval_metrics -> summary baseline and eval_ratio)."""
        from .traffic_baselines import fixed_time

        return fixed_time(seed, **self.args)

    def close(self) -> None:
        self.sim.close()
        self.agents = []

    def _end_episode(self) -> None:  # EpisodeStream.load_state_dict
        self.close()
