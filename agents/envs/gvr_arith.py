"""Generator -> verifier -> refiner on arithmetic with a verifiable answer (the MALT pattern).

An episode draws a and b uniformly from [min_operand, max_operand] and an operator from `ops`; every
agent sees the task. Three steps, one agent each:
    generator  proposes an answer              "Task: a {op} b\\nAnswer:"
    verifier   accepts or rejects it, a reason  "Task: a {op} b\\nProposed: {proposal}\\nVerdict:"
    refiner    gives the final answer           "Task: a {op} b\\nProposed: {proposal}\\nVerifier: {verdict}\\nFinal:"
(one line each; the proposal and the verdict are the other agents' texts, cleaned and cut to
`message_chars`). All three get the shared reward 1 when the final answer is the exact value of
a {op} b, else 0: credit comes from the final answer only.

Parsing: an answer is the first integer of the text (regex -?[0-9]+); none is an invalid action. A
verdict accepts when its first word of "yes"/"no" (any case) is "yes", rejects on "no"; neither is
invalid (and counts as a rejection for the figures).

`reset(options={"a": .., "b": .., "op": ..})` fixes parts of the task. Final-step infos (every agent):
success (the final answer is right), generator_correct (the proposal was), verifier_accepted,
verifier_right (accepted a right proposal or rejected a wrong one), refiner_changed (final !=
proposal), answer, proposal, expected, a, b, op. `generator_correct` is the accuracy of the generator
alone, on the same episodes: the figure the pipeline is compared with.
"""

from __future__ import annotations

import re

from .base import TextParallelEnv, check_int, clean
from .split_arith import OPS, draw_task

__all__ = ["GVRArithEnv"]

_INT = re.compile(r"-?[0-9]+")
_VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
ROLES = ["generator", "verifier", "refiner"]


def first_int(text: str | None) -> int | None:
    m = None if text is None else _INT.search(text)
    return None if m is None else int(m.group())


class GVRArithEnv(TextParallelEnv):
    """Arguments:
        min_operand, max_operand  the range of a and b, inclusive (default 0..9; min <= max)
        ops                       operators, a non-empty subset of "+", "-", "*" (default ("+",))
        message_chars             the longest proposal or verdict another agent reads (>= 1, default 16)
    """

    metadata = {"name": "gvr_arith", "render_modes": ["ansi"], "is_parallelizable": True}
    possible_agents = list(ROLES)

    def __init__(self, min_operand: int = 0, max_operand: int = 9, ops: list[str] | tuple[str, ...] = ("+",),
                 message_chars: int = 16, render_mode: str | None = None):
        super().__init__(render_mode)
        self.min_operand = check_int("gvr_arith", "min_operand", min_operand, -(10**9), 10**9)
        self.max_operand = check_int("gvr_arith", "max_operand", max_operand, self.min_operand, 10**9)
        if isinstance(ops, str) or not ops or any(o not in OPS for o in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"gvr_arith: ops must be a non-empty list of distinct operators from "
                             f"{', '.join(OPS)}; got {ops!r}")
        self.ops = list(ops)
        self.message_chars = check_int("gvr_arith", "message_chars", message_chars, 1)
        digits = max(len(str(self.min_operand)), len(str(self.max_operand)))
        msg = "x" * self.message_chars
        obs_max = len(self._task("*", "9" * digits, "9" * digits)) + len(f"\nProposed: {msg}\nVerifier: {msg}\nFinal:")
        self._init_spaces({a: obs_max for a in ROLES}, {a: self.message_chars for a in ROLES})
        self.a = self.b = 0
        self.op = self.ops[0]
        self.proposal_text = self.verdict_text = ""
        self.proposal: int | None = None
        self.accepted = False
        self.answer: int | None = None
        self._step = 0

    @staticmethod
    def _task(op: str, a: str, b: str) -> str:
        return f"Task: {a} {op} {b}"

    @property
    def expected(self) -> int:
        return OPS[self.op](self.a, self.b)

    def _new_episode(self, options: dict) -> None:
        self.a, self.b, self.op = draw_task(self, options)
        self.proposal_text = self.verdict_text = ""
        self.proposal = self.answer = None
        self.accepted = False
        self._step = 0

    def _turn(self) -> str:
        return ROLES[self._step]

    def _act(self, agent: str, action: str | None) -> bool:
        self._step += 1
        if agent == "generator":
            self.proposal_text = "" if action is None else clean(action, self.message_chars)
            self.proposal = first_int(action)
            return self.proposal is None
        if agent == "verifier":
            self.verdict_text = "" if action is None else clean(action, self.message_chars)
            m = None if action is None else _VERDICT.search(action)
            self.accepted = m is not None and m.group(1).lower() == "yes"
            return m is None
        self.answer = first_int(action)
        return self.answer is None

    def _done(self) -> bool:
        return self._step >= len(ROLES)

    def _observe(self, agent: str) -> str:
        lines = [self._task(self.op, str(self.a), str(self.b))]
        if agent == "generator":
            return "\n".join(lines + ["Answer:"])
        lines.append(f"Proposed: {self.proposal_text}")
        if agent == "verifier":
            return "\n".join(lines + ["Verdict:"])
        return "\n".join(lines + [f"Verifier: {self.verdict_text}", "Final:"])

    def _rewards(self) -> dict[str, float]:
        r = 1.0 if self._done() and self.answer == self.expected else 0.0
        return {a: r for a in self.agents}

    def _outcome(self) -> dict:
        right = self.proposal == self.expected
        return {"success": self.answer == self.expected, "generator_correct": right,
                "verifier_accepted": self.accepted, "verifier_right": self.accepted == right,
                "refiner_changed": self.answer != self.proposal, "answer": self.answer,
                "proposal": self.proposal, "expected": self.expected, "a": self.a, "b": self.b, "op": self.op}

    def random_action(self, agent: str, rng) -> str:
        """Random play for a base's corpus: the generator names an operand or a number in the range of
        results; the verifier says yes or no at random; the refiner repeats the proposal half of the
        time, else plays like the generator. It never computes the task."""
        if agent == "verifier":
            return "yes" if rng.random() < 0.5 else "no"
        if agent == "refiner" and self.proposal is not None and rng.random() < 0.5:
            return str(self.proposal)
        lo, hi = self.min_operand, self.max_operand
        if rng.random() < 0.5:
            return str(self.a if rng.random() < 0.5 else self.b)
        results = [OPS[op](x, y) for op in self.ops for x in (lo, hi) for y in (lo, hi)]
        return str(int(rng.integers(min(results), max(results) + 1)))
