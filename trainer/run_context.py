"""The run context: what every training loop of a run shares, whatever it trains.

Directories, the process groups (`ParallelDims`), signals, the tracker and checkpoints of named
components. The pre-training loop (`trainer.loop`) uses one; a multi-agent loop uses the same with
several components. Collectives go over the run's replica group only.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import faults
from .dims import ParallelDims
from .distributed import barrier, max_int
from .errors import TrainingStopped
from .schema import Recipe
from .tracking import NullTracker, Tracker


class SignalWatch:
    """Remembers SIGINT/SIGTERM/SIGUSR1 (SIGUSR1: the warning Slurm sends before a time limit or
    preemption, see launch/slurm) so the loop can checkpoint and stop at a step boundary."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def agreed(self, group) -> int:
        """Collective over `group`: the signal every rank stops for (the largest seen), or 0."""
        return max_int(int(self.received), group)


@dataclass
class RunContext:
    """`shared`: the run spans every replica of the job (a sync run: one run directory, one
    checkpoint commit for all replicas' components); otherwise it is this replica's own."""

    recipe: Recipe
    dims: ParallelDims
    device: torch.device
    shared: bool = False
    run_dir: Path = field(init=False)
    tracker: NullTracker = field(init=False, default_factory=NullTracker)

    def __post_init__(self):
        self.run_dir = Path(self.recipe.run.output_dir) / self.recipe.run.name

    @property
    def is_main(self) -> bool:
        """The run's first rank writes the run's files and prints."""
        return self.dims.rank == 0 if self.shared else self.dims.is_replica_main

    @property
    def group(self):
        """The ranks of the run (None: the world; a job with parameter servers: its workers)."""
        return self.dims.job_group if self.shared else self.dims.replica_group

    @property
    def rank(self) -> int:
        """This rank's index in the run (names its files in checkpoints)."""
        return self.dims.rank if self.shared else self.dims.local_rank

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def barrier(self) -> None:
        barrier(self.group)

    def open_tracker(self, cfg_dict: dict, resume_step: int | None) -> NullTracker:
        t = self.recipe.tracking
        if self.is_main:
            self.tracker = Tracker(self.run_dir, cfg_dict, t.wandb, t.project, t.entity, t.group, t.tags,
                                   resume_step=resume_step)
        return self.tracker

    def watch_signals(self) -> SignalWatch:
        return SignalWatch()

    def save(self, components: list[ckpt.Component], step: int, loop_state: dict, meta: dict,
             extra: dict | None = None, names: list[str] | None = None) -> Path:
        """Collective over the run: one checkpoint of every component (see trainer.checkpoint).
        `components`: this rank's; `names`: every component of the run (default: this rank's)."""
        return ckpt.save(components, self.checkpoints, step, loop_state, meta, self.rank, self.is_main,
                         self.recipe.train.keep_checkpoints, extra, group=self.group, names=names)

    def end_of_step(self, step: int, evaluate, save, signals: SignalWatch) -> int:
        """Collective over the run: what every loop does after its step `step`. `evaluate(step)` and
        `save(step)` at their intervals (not after the last step, which the loop ends with), the
        fault hook of the tests, then the signal every rank agrees to stop for (0: go on)."""
        train = self.recipe.train
        if step < train.max_steps:
            if step % train.eval_every == 0:
                evaluate(step)
            if train.checkpoint_every and step % train.checkpoint_every == 0:
                save(step)
        faults.maybe_kill(faults.KILL_AFTER_STEP, step)
        return signals.agreed(self.group)

    def stop(self, step: int, signum: int, save, close=None) -> None:
        """Collective: the run stops for signal `signum` after step `step`: `save(step)`, `close()`
        (e.g. a sync strategy's servers), the tracker finished, then TrainingStopped with 128 + signum."""
        folder = save(step)
        if close is not None:
            close()
        if self.is_main:
            self.tracker.finish()
        raise TrainingStopped(f"{signal.Signals(signum).name} received: saved checkpoint {folder} at step {step}; "
                              "continue with train.resume=auto", 128 + int(signum))
