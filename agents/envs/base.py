"""Turn-based text environments behind PettingZoo's `ParallelEnv` API.

Every agent of `possible_agents` stays in `agents` from `reset` until the episode ends, and every
`step` returns an observation, reward, termination, truncation and info for each of them (what
`pettingzoo.test.parallel_api_test` checks). In each step exactly one agent acts (its *turn*); the
others receive the observation `WAIT` and whatever action they pass is ignored. So a rollout asks
only the agents with `infos[agent]["turn"]` (equivalently `env.turn_agents`) for an action, and may
pass a placeholder (or nothing) for the others.

Observations and actions are text: gymnasium `Text` spaces over `CHARSET` (printable ASCII and the
newline). A message an agent writes is cleaned before another agent reads it (`clean`: characters
outside `CHARSET` become "?", line breaks and tabs become spaces, cut to the env's message length).
An action that does not parse (a listener that names no candidate, an answer with no number, an
action that is not a string) is *invalid*: `infos[agent]["invalid"]` is True for that step,
`infos[agent]["invalid_actions"]` counts them over the episode, and the reward is what the env says
(0 in the envs here); it never raises.

Infos (every agent, every step):
    turn             whether this agent's action is read at the next step
    invalid          whether the action this agent just took was invalid (False when it did not act)
    invalid_actions  invalid actions of this agent so far in the episode
    step             steps taken in the episode
and, in the final step, the env's outcome (e.g. `success`).

Random numbers: one `numpy.random.Generator` per env. `reset(seed=s)` reseeds it; `reset()` without
a seed continues its stream (the first unseeded reset seeds it from the OS). `state_dict()` /
`load_state_dict()` save and restore it with the episode counter, so a resumed run draws the same
episodes as an uninterrupted one.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np
from gymnasium.spaces import Text
from pettingzoo import ParallelEnv

__all__ = ["CHARSET", "WAIT", "EpisodeStream", "TextParallelEnv", "clean", "text_space"]

CHARSET = "".join(chr(c) for c in range(32, 127)) + "\n"
WAIT = "Wait."
_CHARS = frozenset(CHARSET)
_SPACES = re.compile(r"[\n\r\t\v\f]")


def clean(text: str, max_chars: int) -> str:
    """`text` with line breaks and tabs as spaces, other characters outside CHARSET as "?", cut to
    max_chars characters."""
    text = _SPACES.sub(" ", text)
    return "".join(c if c in _CHARS else "?" for c in text[:max_chars])


def text_space(max_length: int) -> Text:
    """A Text space over CHARSET with strings of 0..max_length characters."""
    return Text(max_length=max_length, min_length=0, charset=CHARSET)


def check_int(owner: str, name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (
            hi is not None and value > hi):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return int(value)


class EpisodeStream:
    """`state_dict()` / `load_state_dict()` of an env's random generator (`np_random`) and episode
    counter (`episodes`), so a resumed run draws the episodes an uninterrupted one would. Loading
    ends the running episode (`_end_episode`)."""

    np_random: np.random.Generator | None
    episodes: int

    def state_dict(self) -> dict:
        """The env's random state and episode counter (plain Python objects, picklable)."""
        rng = None if self.np_random is None else copy.deepcopy(self.np_random.bit_generator.state)
        return {"rng": rng, "episodes": self.episodes}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the next reset() without a seed continues from there."""
        if state.get("rng") is None:
            self.np_random = None
        else:
            self.np_random = np.random.default_rng()
            self.np_random.bit_generator.state = copy.deepcopy(state["rng"])
        self.episodes = int(state["episodes"])
        self._end_episode()

    def _end_episode(self) -> None:
        raise NotImplementedError


class TextSpaces:
    """`observation_space(agent)` / `action_space(agent)` from the `observation_spaces` and
    `action_spaces` dicts a subclass fills: PettingZoo asks for the very same space object on each call."""

    observation_spaces: dict[str, Text]
    action_spaces: dict[str, Text]

    def observation_space(self, agent: str) -> Text:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> Text:
        return self.action_spaces[agent]


class SimultaneousTextEnv(EpisodeStream, TextSpaces, ParallelEnv):
    """Base of the text envs in which every agent still in the episode acts at every step."""

    agents: list[str]

    @property
    def turn_agents(self) -> list[str]:
        """Every agent of the running episode ([] once it is over)."""
        return list(self.agents)


class TextParallelEnv(EpisodeStream, TextSpaces, ParallelEnv):
    """Base of the turn-based text envs. A subclass sets `possible_agents`, `metadata` and calls
    `_init_spaces(obs_max, act_max)`, then implements

        _new_episode(options)  draw the episode from self.np_random (options: reset's options)
        _turn()                the agent whose action the next step reads
        _act(agent, action)    apply that agent's action (a str, or None for a non-string/missing
                               action); return True when it was invalid
        _done()                whether the episode is over
        _observe(agent)        the text the agent whose turn it is sees
        _rewards()             {agent: reward} for the step just taken
        _outcome()             extra infos of the final step (e.g. success)
    """

    metadata: dict[str, Any] = {"name": "text_env", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(self, render_mode: str | None = None):
        if render_mode not in (None, "ansi"):
            raise ValueError(f"{type(self).__name__}: render_mode must be None or 'ansi', got {render_mode!r}")
        self.render_mode = render_mode
        self.agents: list[str] = []
        self.np_random: np.random.Generator | None = None
        self.episodes = 0  # episodes started (resets)
        self._steps = 0
        self._invalid: dict[str, int] = {}

    def _init_spaces(self, obs_max: dict[str, int], act_max: dict[str, int]) -> None:
        self.observation_spaces = {a: text_space(obs_max[a]) for a in self.possible_agents}
        self.action_spaces = {a: text_space(act_max[a]) for a in self.possible_agents}

    @property
    def turn_agents(self) -> list[str]:
        """The agents whose action the next step reads ([] once the episode is over)."""
        return [self._turn()] if self.agents else []

    # ---------------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.np_random = np.random.default_rng(seed)
        elif self.np_random is None:
            self.np_random = np.random.default_rng()
        self._new_episode(dict(options or {}))
        self.episodes += 1
        self.agents = list(self.possible_agents)
        self._steps = 0
        self._invalid = {a: 0 for a in self.agents}
        return self._observations(), self._infos({})

    def step(self, actions: dict):
        if not self.agents:
            raise RuntimeError(f"{type(self).__name__}.step: the episode is over; call reset() first")
        unknown = [a for a in actions if a not in self.agents]
        if unknown:
            raise ValueError(f"{type(self).__name__}.step: unknown agent {unknown[0]!r}; "
                             f"agents: {', '.join(self.agents)}")
        agent = self._turn()
        action = actions.get(agent)
        invalid = self._act(agent, action if isinstance(action, str) else None)
        if invalid:
            self._invalid[agent] += 1
        self._steps += 1
        done = self._done()
        rewards = self._rewards()
        infos = self._infos({agent: bool(invalid)}, self._outcome() if done else None)
        observations = self._observations(final=done)
        terminations = {a: done for a in self.agents}
        truncations = {a: False for a in self.agents}
        if done:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def _observations(self, final: bool = False) -> dict[str, str]:
        turn = None if final else self._turn()
        return {a: self._observe(a) if a == turn else WAIT for a in self.agents}

    def _infos(self, invalid: dict[str, bool], outcome: dict | None = None) -> dict[str, dict]:
        turn = None if outcome is not None else self._turn()
        infos = {}
        for a in self.agents:
            info = {"turn": a == turn, "invalid": invalid.get(a, False),
                    "invalid_actions": self._invalid[a], "step": self._steps}
            if outcome is not None:
                info.update(copy.deepcopy(outcome))
            infos[a] = info
        return infos

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(f"[{a}]\n{self._observe(a)}" for a in self.turn_agents) or "(episode over)"

    def _end_episode(self) -> None:
        self.agents = []

    # Subclass hooks --------------------------------------------------------------------------------

    def _new_episode(self, options: dict) -> None:
        raise NotImplementedError

    def _turn(self) -> str:
        raise NotImplementedError

    def _act(self, agent: str, action: str | None) -> bool:
        raise NotImplementedError

    def _done(self) -> bool:
        raise NotImplementedError

    def _observe(self, agent: str) -> str:
        raise NotImplementedError

    def _rewards(self) -> dict[str, float]:
        raise NotImplementedError

    def _outcome(self) -> dict:
        raise NotImplementedError

    def random_action(self, agent: str, rng: np.random.Generator) -> str:
        """A well-formed action for `agent` in the current state, drawn from `rng` with no regard to
        the reward: the text a random player writes. Pretraining corpora (agents.corpus) are built
        from such play, so a base model learns the format of the game, not how to win it."""
        raise NotImplementedError(f"{type(self).__name__} has no random_action; it cannot make a corpus")
