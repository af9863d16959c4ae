"""Random-number streams: the process-wide generators, and one stream per checkpoint component.

Dropout (and tensor parallelism's per-rank dropout seeds) draw from torch's global generator. Two
models trained in one process (agents, actor and critic) must not draw from one shared stream, or
the presence of one would change the other's run and a resume of one alone would not be exact. Each
component keeps its own state of every generator (`RngStream`); `active()` swaps it in for the
component's work and takes the advanced state back out, so from the component's point of view it
owns the process's generators. A single component captured right after seeding and building sees
exactly the sequence the process-wide generators would have given it.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RngStream:
    """One component's own state of every generator (see the module docstring)."""

    def __init__(self, state: dict):
        self.state = state

    @classmethod
    def capture(cls) -> RngStream:
        """The process-wide generators as they are now (they keep running on their own)."""
        return cls(rng_state())

    @classmethod
    def seeded(cls, seed: int) -> RngStream:
        """A stream started from `seed`, leaving the process-wide generators as they were."""
        saved = rng_state()
        try:
            seed_all(seed)
            return cls(rng_state())
        finally:
            set_rng_state(saved)

    @contextlib.contextmanager
    def active(self):
        saved = rng_state()
        set_rng_state(self.state)
        try:
            yield self
        finally:
            self.state = rng_state()
            set_rng_state(saved)
