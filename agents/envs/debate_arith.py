"""Multi-agent debate on arithmetic: N agents answer a+b*c+d-e*f, then R-1 more rounds in which each reads
the others' previous answers (with their short reasoning) and answers again; the majority of the last
round is the debate's answer (the recipe debate-arith, agents/debate/).

Problems: six integers a..f drawn uniformly from [min_operand, max_operand] (default [0, 29], the issue's
[0, 30)); `problem_text` writes "a+b*c+d-e*f", `solve` its value. An answer is the agent's short
step-by-step reasoning, one line, the value after its last "=":

    4*5=20 7*8=56 3+20=23 23+6=29 29-56=-27

(the sum one pair at a time: a small model adds two numbers far more reliably than four at once).
Every agent acts in every step (one step per round: all agents' turns of a round are one batch of the
rollout, agents.rollout). Observations of the agents, one line each:
    round 1:   "Q: 3+4*5+6-7*8"
    round r>1: "Q: 3+4*5+6-7*8", then "<other>: <its previous answer>" for every other agent (cleaned and
               cut to message_chars), then "Round r"
An answer is the integer after the last "=" of the text; none (or a non-string action) is invalid and
counts as no answer (None), which never wins a vote.

Votes (`plurality`, `majority`): the debate's answer is the plurality of the last round's answers (ties go
to the answer of the lowest-numbered agent among the tied; None answers do not vote). A *pseudo-label*
for fine-tuning (`majority`) is stricter: the most common answer with at least `min_votes` votes and
no tie, else none (the problem gives no training data).

Rewards: 1 to an agent whose last-round answer is right, else 0 (measurement only: the debate recipe
fine-tunes on majority agreement, never on rewards or ground truth). Final-step infos (every agent):
success (the debate's answer is right), answer (the debate's answer), expected, problem (a..f),
answers (per round, each agent's answer), first_round_vote, first_round_correct (per agent),
diversity (the fraction of agent pairs whose first-round answers differ).

`reset(options={"problem": [a, b, c, d, e, f]})` poses a given problem (the recipe's held-out and
training sets). The corpus player (`corpus_action`, for `data.path: env:debate_arith`, agents.corpus)
writes the right reasoning, except in round 1 where with probability `corpus_slip` one product is off by
1..9 and the steps after it follow from the slip: the base sees imperfect peers in the round-2 prompts
and a right answer after them, so it knows what a later round is for. It also imitates the slips, so its
first-round accuracy is at most 1 - corpus_slip (less, as a small model also makes its own mistakes).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from itertools import combinations

import numpy as np

from .base import SimultaneousTextEnv, check_int, clean, text_space

__all__ = ["DebateArithEnv", "agent_names", "column_subtraction", "draw_problem", "majority", "parse_answer", "plurality",
           "problem_text", "reasoning", "solve"]

_ANSWER = re.compile(r"=\s*(-?[0-9]+)")
STEPS = ("pairwise", "digits", "columns")
MESSAGE_CHARS = {"pairwise": 64, "digits": 80, "columns": 112}  # the default message_chars per steps


def agent_names(n: int) -> list[str]:
    return [f"agent_{i}" for i in range(n)]


def problem_text(p) -> str:
    a, b, c, d, e, f = p
    return f"{a}+{b}*{c}+{d}-{e}*{f}"


def solve(p) -> int:
    a, b, c, d, e, f = p
    return a + b * c + d - e * f


def draw_problem(rng: np.random.Generator, lo: int = 0, hi: int = 29) -> tuple[int, ...]:
    return tuple(int(x) for x in rng.integers(lo, hi + 1, size=6))


def _check_steps(steps) -> str:
    if steps not in STEPS:
        raise ValueError(f"debate_arith: steps must be one of {', '.join(STEPS)}, got {steps!r}")
    return steps


def _product(x: int, y: int, slip: int, steps: str) -> tuple[str, int]:
    """One product's text and value. pairwise: "x*y=P". digits: a multiplier y >= 10 split into its tens
    and ones, "x*y=T+O=P" (T = x*(y//10)*10, O = x*(y%10)); y < 10: "x*y=P". A slip is added to the
    last digit product (O, or P when y < 10; pairwise: P), negated when that would make it negative,
    and P follows from it."""
    if steps == "pairwise" or y < 10:
        v = x * y + slip
        if steps != "pairwise" and v < 0:
            v = x * y - slip
        return f"{x}*{y}={v}", v
    tens, ones = x * (y // 10) * 10, x * (y % 10) + slip
    if ones < 0:
        ones = x * (y % 10) - slip
    return f"{x}*{y}={tens}+{ones}={tens + ones}", tens + ones


def column_subtraction(s: int, t: int) -> str:
    """s-t (s, t >= 0) for steps="columns", with no step that needs a borrow chain held in the head:
    the sign, then the larger minus the smaller, both zero-padded to the same width (at least 3), then
    one column at a time from the ones, "x-y=r" with r = (x - y - borrow) mod 10, prefixed "b" when the
    column before borrowed; then the value:

        29-56=-(056-029) 6-9=7 b5-2=2 0-0=0 =-27

    Every column reads two digits at fixed places and one visible flag (the first, pairwise attempt at
    [0, 30) learned every step but this subtraction done at once: docs/debate.md)."""
    big, small, sign = (s, t, "+") if s >= t else (t, s, "-")
    width = max(3, len(str(big)))
    x, y = f"{big:0{width}d}", f"{small:0{width}d}"
    cols, borrow = [], 0
    for i in range(width - 1, -1, -1):
        r = int(x[i]) - int(y[i]) - borrow
        cols.append(f"{'b' if borrow else ''}{x[i]}-{y[i]}={r % 10}")
        borrow = int(r < 0)
    return f"{s}-{t}={sign}({x}-{y}) {' '.join(cols)} ={s - t}"


def reasoning(p, slip: tuple[int, int] = (0, 0), steps: str = "pairwise") -> str:
    """The answer's text; slip = (which product, 0 or 1; amount added to it) gives a slipped one (see
    `_product` for where the slip goes with steps="digits" or "columns")."""
    _check_steps(steps)
    a, b, c, d, e, f = p
    t1, bc = _product(b, c, slip[1] if slip[0] == 0 else 0, steps)
    t2, ef = _product(e, f, slip[1] if slip[0] == 1 else 0, steps)
    s1, s2 = a + bc, a + bc + d
    last = column_subtraction(s2, ef) if steps == "columns" else f"{s2}-{ef}={s2 - ef}"
    return f"{t1} {t2} {a}+{bc}={s1} {s1}+{d}={s2} {last}"


def parse_answer(text: str | None) -> int | None:
    if not isinstance(text, str):
        return None
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def plurality(answers: list[int | None]) -> int | None:
    """The most common non-None answer; a tie goes to the one given first (lowest agent); None if none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def majority(answers: list[int | None], min_votes: int = 2) -> int | None:
    """The pseudo-label: the most common answer when it has >= min_votes votes and no other ties it."""
    counts = Counter(a for a in answers if a is not None).most_common()
    if not counts or counts[0][1] < min_votes or (len(counts) > 1 and counts[1][1] == counts[0][1]):
        return None
    return counts[0][0]


def diversity(answers: list[int | None]) -> float:
    """Fraction of agent pairs whose answers differ (None differs from everything, itself included)."""
    pairs = list(combinations(answers, 2))
    return sum(1 for x, y in pairs if x is None or y is None or x != y) / len(pairs)


class DebateArithEnv(SimultaneousTextEnv):
    """Arguments:
        agents         N, the number of debating agents (>= 2: a debate needs others to read)
        rounds         R >= 1 (1: no debate, the agents answer once)
        min_operand, max_operand  the range of a..f, inclusive (default 0..29)
        message_chars  the longest answer another agent reads (default 64 with steps pairwise, 80 with
                       digits, 112 with columns: every answer of operands in [0, 29] fits)
        corpus_slip    probability of a slipped product in the corpus player's round-1 answers (default 0.25)
        steps          the corpus player's reasoning: "pairwise" (default; "4*5=20 7*8=56 3+20=23 23+6=29
                       29-56=-27") or "digits", for two-digit operands: a multiplier >= 10 split into tens
                       and ones ("12*23=240+36=276"), the sum pairwise as before; or "columns": digits,
                       with the last subtraction column by column (`column_subtraction`)
    """

    metadata = {"name": "debate_arith", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(self, agents: int = 3, rounds: int = 2, min_operand: int = 0, max_operand: int = 29,
                 message_chars: int | None = None, corpus_slip: float = 0.25, steps: str = "pairwise",
                 render_mode: str | None = None):
        if isinstance(agents, bool) or not isinstance(agents, int) or agents < 2:
            raise ValueError(f"debate_arith: agents must be an integer >= 2 (a debate needs at least two agents), "
                             f"got {agents!r}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"debate_arith: render_mode must be None or 'ansi', got {render_mode!r}")
        self.n = agents
        self.rounds = check_int("debate_arith", "rounds", rounds, 1)
        self.min_operand = check_int("debate_arith", "min_operand", min_operand, 0, 10**6)
        self.max_operand = check_int("debate_arith", "max_operand", max_operand, self.min_operand, 10**6)
        self.steps = _check_steps(steps)
        self.message_chars = check_int("debate_arith", "message_chars",
                                       MESSAGE_CHARS[steps] if message_chars is None else message_chars, 1)
        if isinstance(corpus_slip, bool) or not isinstance(corpus_slip, (int, float)) or not 0 <= corpus_slip <= 1:
            raise ValueError(f"debate_arith: corpus_slip must be a number in [0, 1], got {corpus_slip!r}")
        self.corpus_slip = float(corpus_slip)
        self.render_mode = render_mode
        self.possible_agents = agent_names(agents)
        self.agents: list[str] = []
        self.np_random = None
        self.episodes = 0
        worst = "Q: " + problem_text([self.max_operand] * 6) + "".join(
            f"\n{a}: " + "x" * self.message_chars for a in self.possible_agents[1:]) + f"\nRound {self.rounds}"
        self.observation_spaces = {a: text_space(len(worst)) for a in self.possible_agents}
        self.action_spaces = {a: text_space(max(64, self.message_chars)) for a in self.possible_agents}
        self.problem = (0,) * 6
        self.round = 0
        self.texts: list[dict[str, str]] = []
        self.answers: list[dict[str, int | None]] = []
        self._invalid: dict[str, int] = {}

    @property
    def expected(self) -> int:
        return solve(self.problem)

    def _end_episode(self) -> None:
        self.agents = []

    def _draw(self, options: dict) -> tuple[int, ...]:
        p = options.get("problem")
        if p is None:
            return draw_problem(self.np_random, self.min_operand, self.max_operand)
        if (not isinstance(p, (list, tuple)) or len(p) != 6 or any(
                isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not self.min_operand <= x <= self.max_operand
                for x in p)):
            raise ValueError(f"debate_arith.reset: problem must be 6 integers in [{self.min_operand}, "
                             f"{self.max_operand}], got {p!r}")
        return tuple(int(x) for x in p)

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.np_random = np.random.default_rng(seed)
        elif self.np_random is None:
            self.np_random = np.random.default_rng()
        self.problem = self._draw(dict(options or {}))
        self.episodes += 1
        self.agents = list(self.possible_agents)
        self.round = 0
        self.texts, self.answers = [], []
        self._invalid = {a: 0 for a in self.agents}
        return self._observations(), self._infos({})

    def _observe(self, agent: str) -> str:
        lines = ["Q: " + problem_text(self.problem)]
        if self.round > 0:
            last = self.texts[-1]
            lines += [f"{o}: {last[o]}" for o in self.possible_agents if o != agent]
            lines.append(f"Round {self.round + 1}")
        return "\n".join(lines)

    def _observations(self) -> dict[str, str]:
        return {a: self._observe(a) for a in self.agents}

    def _infos(self, invalid: dict[str, bool], outcome: dict | None = None) -> dict[str, dict]:
        out = {}
        for a in self.agents:
            info = {"turn": outcome is None, "invalid": invalid.get(a, False), "invalid_actions": self._invalid[a],
                    "step": self.round, "round": self.round + 1}
            if outcome is not None:
                info.update(copy.deepcopy(outcome))
            out[a] = info
        return out

    def step(self, actions: dict):
        if not self.agents:
            raise RuntimeError("DebateArithEnv.step: the episode is over; call reset() first")
        unknown = [a for a in actions if a not in self.agents]
        if unknown:
            raise ValueError(f"DebateArithEnv.step: unknown agent {unknown[0]!r}; agents: {', '.join(self.agents)}")
        texts, answers, invalid = {}, {}, {}
        for a in self.possible_agents:
            act = actions.get(a)
            texts[a] = clean(act, self.message_chars) if isinstance(act, str) else ""
            answers[a] = parse_answer(act)
            invalid[a] = answers[a] is None
            self._invalid[a] += invalid[a]
        self.texts.append(texts)
        self.answers.append(answers)
        self.round += 1
        done = self.round >= self.rounds
        expected = self.expected
        outcome = self._outcome() if done else None
        rewards = {a: float(done and answers[a] == expected) for a in self.agents}
        infos = self._infos(invalid, outcome)
        obs = {a: "" for a in self.agents} if done else self._observations()
        terms = {a: done for a in self.agents}
        truncs = {a: False for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    def _outcome(self) -> dict:
        order = self.possible_agents
        last = [self.answers[-1][a] for a in order]
        first = [self.answers[0][a] for a in order]
        vote = plurality(last)
        return {"success": vote == self.expected, "answer": vote, "expected": self.expected,
                "problem": list(self.problem), "answers": [[r[a] for a in order] for r in self.answers],
                "first_round_vote": plurality(first), "first_round_correct": [x == self.expected for x in first],
                "diversity": diversity(first)}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(f"[{a}]\n{self._observe(a)}" for a in self.agents) or "(episode over)"

    # ---- players of the corpus ------------------------------------------------------------------------

    def corpus_action(self, agent: str, rng: np.random.Generator) -> str:
        """The right reasoning; in round 1 a slipped product with probability corpus_slip (see the
        module docstring)."""
        if self.round == 0 and rng.random() < self.corpus_slip:
            amount = int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)
            return reasoning(self.problem, (int(rng.integers(2)), amount), self.steps)
        return reasoning(self.problem, steps=self.steps)

    def random_action(self, agent: str, rng: np.random.Generator) -> str:
        """A well-formed answer with a uniformly random value (the environment's random player)."""
        return f"{problem_text(self.problem)}={int(rng.integers(-900, 900))}"
