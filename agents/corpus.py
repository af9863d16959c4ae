r"""Pretraining corpora made by random play of an environment: the base a multi-agent recipe starts from.

A policy trained by RL from a model that has never seen the game's text would spend its samples
learning the format (a listener that names no candidate earns nothing and learns nothing). So a
multi-agent recipe chain first pretrains a small base on transcripts of *random* play: each turn is
written exactly as `AgentPolicy` will prompt the agent (its template filled in), followed by an action
the env's `random_action` draws with no regard to the reward, and a line break (where a policy's action
ends). The base learns what a well-formed action looks like in every situation and nothing about
which action wins: in the signalling game its listener names a uniformly random candidate whatever
the message (success 1/n). Random players do say what they see some of the time (the signalling
speaker names the target half of the time, a split_arith player sends its own number half of the
time): without that, the base speaker's next-token distribution ignores the target altogether, and
policy-gradient updates of a network whose outputs do not depend on the target move every target's
message together, so the speaker collapses onto one message before any protocol forms (measured:
speaker entropy to ~0 within 100 steps at lr 1e-3, no progress in 300 steps at 1e-4).

An env may define its corpus player apart from its random player: `env.corpus_action(agent, rng)` when
the env has it, else `env.random_action(agent, rng)`. The traffic env's corpus player picks the
max-queue phase (read from the observation) half of the time and a uniformly random phase otherwise,
while its `random_action` stays uniform (the "random play" of its baselines). An episode is written to
its end (traffic: ceil(num_seconds / delta_time) decisions), or to `max_steps` env steps when given.

    path = write_corpus("signaling", {"n_objects": 10}, episodes=20000, seed=0, folder=".cache/data")

writes (once; the name is a hash of the inputs) a JSON-lines file of one document per episode under
`folder/env-corpus/`, which a recipe reads as `data.path` (`data.path: env:signaling` does this from
the launcher with the recipe's `env.*`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from trainer.files import atomic_write_text

from .envs import make_env
from .policy import DEFAULT_TEMPLATE
from .rollout import SEED_HIGH

__all__ = ["episode_text", "write_corpus"]

FORMAT = 2  # 2: the signalling speaker of random play names the target half of the time
# per env, where its random player changed since: 3 = split_arith's answer repeats a number it saw half of the time
# 4 = traffic's corpus player (max-queue half of the time) and whole episodes (no 64-step cap)
FORMATS = {"split_arith": 3, "traffic": 4}
MAX_EPISODE_STEPS = 100_000  # a guard against an env that never ends


def episode_text(env, rng: np.random.Generator, template: str = DEFAULT_TEMPLATE,
                 max_steps: int | None = None) -> str:
    """One episode of random play as text: for every turn, the acting agent's prompt (the template
    with its name as role, as `AgentPolicy` formats it) and " " + its action + a line break; the
    episode to its end, or its first `max_steps` env steps. The action is `env.corpus_action` when the
    env has one, else `env.random_action`."""
    obs, infos = env.reset(seed=int(rng.integers(SEED_HIGH)))
    player = getattr(env, "corpus_action", None) or env.random_action
    parts = []
    for _ in range(MAX_EPISODE_STEPS if max_steps is None else max_steps):
        acting = env.turn_agents
        actions = {}
        for agent in acting:
            action = player(agent, rng)
            parts.append(template.format(agent=agent, role=agent, observation=obs[agent]) + " " + action + "\n")
            actions[agent] = action
        obs, _, terms, truncs, _ = env.step(actions)
        if any(terms.values()) or any(truncs.values()) or not env.agents:
            break
    return "".join(parts)


def write_corpus(env_name: str, env_args: dict, episodes: int, seed: int, folder: str | Path,
                 template: str = DEFAULT_TEMPLATE) -> Path:
    """The corpus file of `episodes` random episodes (written if it is not there yet)."""
    key = json.dumps({"env": env_name, "args": env_args, "episodes": episodes, "seed": seed,
                      "template": template, "format": FORMATS.get(env_name, FORMAT)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(folder) / "env-corpus" / f"{env_name}-{digest}.jsonl"
    if path.exists():
        return path
    env = make_env(env_name, **env_args)
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"text": episode_text(env, rng, template)}) for _ in range(episodes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
