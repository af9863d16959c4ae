"""What a strategy that makes replicas agree plugs into the training loop.

A run with `sync.replicas` = R > 1 (and a strategy other than `allreduce`) splits the world into R
replicas (`ParallelDims`), each holding its own weights and its own DeepSpeed engine. The loop
drives them all in step; the strategy, implemented in `agents.sync` and handed to
`trainer.loop.train` by the launcher, decides how they come to agree, through hooks on each
replica's `Stepper` and the state it keeps in checkpoints. The trainer only knows this interface.
"""

from __future__ import annotations

from typing import Protocol


class Synchronizer(Protocol):
    replicas: int  # R: how many replicas the job's world is split into
    # True when gradients are exchanged before the update (ring, compressed gradients): a
    # non-finite loss in one replica must then skip the step in all of them.
    exchanges_gradients: bool

    def attach(self, stepper, replica, sample_counts: list[int]) -> None:
        """Register the strategy's hooks on this rank's stepper (collectives over `replica.dims`'
        cross-replica group). `sample_counts`: each replica's training samples n_i."""

    def log_row(self, step: int) -> dict:
        """Figures for this step's metrics row: `comm_bytes` (cumulative bytes this rank sent to
        synchronise) and, where replicas' weights can differ, `consensus_dist`. Collective."""

    def state_dict(self) -> dict:
        """This rank's strategy state for a checkpoint (residuals, outer optimizer, counters)."""

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None:
        """End of the run on this rank (after the last checkpoint): release what the strategy
        holds outside the loop (e.g. tell parameter servers to exit)."""
