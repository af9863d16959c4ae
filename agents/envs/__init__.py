"""Text environments for the agents, behind PettingZoo's `ParallelEnv` API, and their registry.

    env = make_env("signaling", n_objects=10)
    obs, infos = env.reset(seed=0)
    while env.agents:
        actions = {a: policy(a, obs[a]) for a in env.turn_agents}   # the others wait
        obs, rewards, terminations, truncations, infos = env.step(actions)

Registered names (`ENVS`): signaling (`SignalingEnv`, the Lewis referential game), split_arith
(`SplitArithEnv`, arithmetic split between two agents), gvr_arith (`GVRArithEnv`, generator -> verifier ->
refiner on arithmetic), debate_arith (`DebateArithEnv`, N agents debating
a+b*c+d-e*f over R rounds), traffic (`TrafficEnv`, traffic lights on
SUMO through sumo-rl, every light acting at every step), openspiel (`GameEnv`, two-player OpenSpiel games:
Kuhn and Leduc poker, matrix games; agents.games trains them by self-play). `make_env(name, **kwargs)` is what a recipe's
`env:` section calls (`env.name` and the rest as keyword arguments); an unknown name or argument is a
ValueError in one line that names the known ones. `register_env(name, constructor)` adds one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from .base import CHARSET, WAIT, TextParallelEnv, clean
from .debate_arith import DebateArithEnv
from .games import GameEnv
from .gvr_arith import GVRArithEnv
from .signaling import SignalingEnv
from .split_arith import SplitArithEnv

__all__ = ["CHARSET", "ENVS", "WAIT", "DebateArithEnv", "GVRArithEnv", "GameEnv", "SignalingEnv", "SplitArithEnv", "TextParallelEnv", "clean",
           "env_arguments", "make_env", "register_env"]


class _Deferred:
    """A registered env whose module is imported when the env is first used or inspected: traffic's
    sumo-rl (with pandas) takes ~0.3 s to import, which every process that reads this registry (each
    launched rank, each recipe check) would otherwise pay for an env few runs use."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module, __name__), self.name)

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what inspect.signature reads: the class's own
        return inspect.signature(self.load())


_TRAFFIC = _Deferred(".traffic", "TrafficEnv")


def __getattr__(name: str):
    if name == "TrafficEnv":
        return _TRAFFIC.load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ENVS: dict[str, Callable] = {"signaling": SignalingEnv, "split_arith": SplitArithEnv,
                           "traffic": _TRAFFIC,
                           "openspiel": GameEnv, "gvr_arith": GVRArithEnv,
                           "debate_arith": DebateArithEnv}


def register_env(name: str, constructor: Callable) -> None:
    """Make `make_env(name, ...)` call `constructor(...)`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_env: name must be a non-empty string, got {name!r}")
    ENVS[name] = constructor


def env_arguments(name: str) -> list[str]:
    """The keyword arguments env `name` accepts (for a schema's checks)."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; known envs: {', '.join(sorted(ENVS))}")
    params = inspect.signature(ENVS[name]).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def make_env(name: str, **kwargs):
    """A new env registered under `name`, constructed with `kwargs`."""
    allowed = env_arguments(name)
    open_ended = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(ENVS[name]).parameters.values())
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown and not open_ended:
        raise ValueError(f"env {name!r} has no argument {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return ENVS[name](**kwargs)
