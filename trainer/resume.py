"""Continuing a run from a checkpoint: in the same layout (exact) or in another one (resharded).

Same layout: DeepSpeed's engine state (weights, optimizer, scheduler) plus our loop state (step,
data position, every RNG) come back as saved, so the continuation is bit-identical on CPU.
Another layout (tp / pp / ZeRO stage / world size changed): the weights come from the consolidated
checkpoint (resharded by the caller when it builds the model), the step, learning-rate schedule
and global data position carry over, Adam moments and step count carry over by parameter name
(see `optim_state`; not to or from ZeRO-0 in bf16, whose moments DeepSpeed keeps out of reach),
and the RNGs restart from seed + step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import optim_state
from .errors import UsageError
from .rng import RngStream
from .schema import Recipe


def resolve_resume(recipe: Recipe, checkpoints: Path) -> Path | None:
    """The checkpoint folder `train.resume` names (none / auto / a path), or None."""
    r = recipe.train.resume
    if r == "none":
        return None
    if r == "auto":
        return ckpt.latest_checkpoint(checkpoints)
    p = Path(r)
    if not p.is_dir():
        raise UsageError(f"train.resume={r}: no such checkpoint folder")
    return p


@dataclass
class LayoutChange:
    """How the checkpoint's layout differs from this run's."""

    before: dict
    after: dict
    adam_file: Path | None = None

    @property
    def optimizer_portable(self) -> bool:
        """Adam moments can move with the run: the checkpoint holds them by full parameter name
        (`optim_state`, written for every layout but ZeRO-0 in bf16), whatever the tensor,
        pipeline, ZeRO or data-parallel layout on either side. (This run's own layout may still
        refuse them: `optim_state.restore` returns False for ZeRO-0 in bf16.) DeepSpeed's own
        ZeRO-1/2 "elastic" checkpoints cannot restore torch's AdamW in 0.19.8."""
        return self.adam_file is not None and self.adam_file.exists()

    def describe(self) -> str:
        f = "tp={tp} pp={pp} zero={zero_stage} world={world_size}"
        return f"{f.format(**self.before)} -> {f.format(**self.after)}"


def layout_change(meta: dict, recipe: Recipe, world_size: int, replicas: int = 1) -> LayoutChange | None:
    keys = ("tp", "pp", "zero_stage", "world_size")
    before = {k: meta.get(k) for k in keys}
    after = {"tp": recipe.parallel.tp, "pp": recipe.parallel.pp, "zero_stage": recipe.parallel.zero_stage,
             "world_size": world_size}
    saved_replicas = meta.get("replicas", 1)
    if (saved_replicas > 1 or replicas > 1) and (before != after or saved_replicas != replicas):
        # Replicas hold weights of their own: no single model to reshard from or to.
        raise UsageError(f"checkpoint was written by {saved_replicas} replica(s) in layout "
                         f"tp={before['tp']} pp={before['pp']} zero={before['zero_stage']} world={before['world_size']}; "
                         f"this run has {replicas} in tp={after['tp']} pp={after['pp']} zero={after['zero_stage']} "
                         f"world={after['world_size']}: a run whose replicas hold their own weights resumes only in "
                         "the same layout and replica count (or start a new run.name)")
    return None if before == after else LayoutChange(before, after)


def set_schedule_position(engine, step: int) -> None:
    """Continue the learning-rate schedule at `step` (optimizer state itself starts fresh)."""
    sched = engine.lr_scheduler
    sched.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    engine.global_steps = step


def restore(replica, recipe: Recipe, folder: Path, meta: dict, move: LayoutChange | None, sampler,
            is_main: bool, rank: int) -> dict:
    """Load `folder`'s training state into the replica (its engine and random-number stream) and
    the sampler; returns the loop state (its "step": the step to continue from). With `move` the
    weights were already loaded into the model (resharded) when the replica was built. `rank`: this
    rank's index in the run (its loop-state file)."""
    engine = replica.engine
    if move is None:
        loop_state = ckpt.load([replica.component], folder, meta, rank)
        sampler.load_state_dict(loop_state["sampler"])
        ckpt.set_rng_state(loop_state["rng"])
        return loop_state
    loop_state = torch.load(folder / "loop_rank0.pt", weights_only=False)
    step = loop_state["step"]
    sampler.load_state_dict(loop_state["sampler"])  # a global position: valid for any dp degree
    ckpt.seed_all(recipe.train.seed + step)
    replica.component.rng = RngStream.seeded(recipe.train.seed + step)
    set_schedule_position(engine, step)
    carried, why = False, (f"the checkpoint holds no {optim_state.FILE} (ZeRO-0 in bf16 keeps its fp32 Adam moments "
                           "out of reach of DeepSpeed's fragment API, and checkpoints of older versions of these "
                           "recipes with tensor/pipeline parallelism did not save them)")
    if move.optimizer_portable:
        carried = optim_state.restore(engine, engine.module, recipe.parallel.zero_stage,
                                      torch.load(move.adam_file, weights_only=False))
        why = ("this layout (ZeRO-0 in bf16) keeps its fp32 Adam moments out of reach of DeepSpeed's "
               "fragment API; use ZeRO >= 1 or fp32 to carry them")
    if is_main:
        print(f"resuming {folder} in another layout ({move.describe()}): weights resharded exactly; "
              + ("Adam state carried over (moments and step count)" if carried else
                 f"optimizer state RESET (Adam moments start from zero: {why})")
              + "; learning-rate schedule and data position carried over", flush=True)
    return loop_state
