"""The problem sets of a debate run: a fixed held-out set per seed and fresh training sets per iteration,
disjoint from it.

    heldout(seed, n)                 n distinct problems from numpy's generator seeded [seed, 0]
    training(seed, iteration, n, x)  n problems from the generator seeded [seed, 1, iteration], any in
                                     the excluded set x (the held-out set) drawn again

Problems are a..f of a+b*c+d-e*f (agents.envs.debate_arith), each in [lo, hi].
"""

from __future__ import annotations

import numpy as np

from agents.envs.debate_arith import draw_problem

__all__ = ["heldout", "training"]


def heldout(seed: int, n: int, lo: int = 0, hi: int = 29) -> list[tuple[int, ...]]:
    rng = np.random.default_rng([seed, 0])
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < n:
        p = draw_problem(rng, lo, hi)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def training(seed: int, iteration: int, n: int, exclude: set, lo: int = 0, hi: int = 29) -> list[tuple[int, ...]]:
    rng = np.random.default_rng([seed, 1, iteration])
    out: list[tuple[int, ...]] = []
    while len(out) < n:
        p = draw_problem(rng, lo, hi)
        if p not in exclude:
            out.append(p)
    return out
