"""Continuing a run from a checkpoint: in the same layout (exact) or in another one (resharded).

Same layout: DeepSpeed's engine state (weights, optimizer, scheduler) plus our loop state (step,
data position, every RNG) come back as saved, so the continuation is bit-identical on CPU.
Another layout (tp / pp / ZeRO stage / world size changed): the weights come from the consolidated
checkpoint (resharded by the caller when it builds the model), the step, learning-rate schedule
and global data position carry over, Adam moments and step count carry over by parameter name
(see `optim_state`; not to or from ZeRO-0 in bf16, whose moments DeepSpeed keeps out of reach),
and the RNGs restart from seed + step.

Which checkpoint (`find_resume`, collective): the run's first rank resolves train.resume (a
`latest` naming a missing folder falls back, with one warning, see `checkpoint.latest_checkpoint`)
and reads the manifest; every rank of the run then hashes its share of the files (file i on rank
i mod n) and they agree on the first bad one, so the checkpoint is read once, not once per rank,
and every rank stops with the same one-line error.

Settings that differ from the checkpoint's (its meta.json holds the config it was written with):
    model.*       refused (UsageError, exit 2), all changed keys in one line; only model.kernels
                  may change (the same parameters and arithmetic, another implementation).
    optim.*, the schedule's train.max_steps (cosine)
                  applied, and said so in one printed line. DeepSpeed's load brings back the
                  optimizer's param_groups (lr, betas, eps, weight_decay) and the scheduler's
                  base_lrs, which would silently keep the old values: the new run's are put back
                  after the load and the schedule is recomputed at the restored step. Adam's
                  moments and step count stay (a changed beta uses them from there on).
                  optim.grad_clip lives in the engine's config, not in the checkpoint: the new value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import optim_state
from .distributed import broadcast_object, max_int
from .errors import UsageError
from .recipe import recipe_to_dict
from .rng import RngStream
from .schema import Recipe


def resolve_resume(recipe: Recipe, checkpoints: Path, warn=None) -> Path | None:
    """The checkpoint folder `train.resume` names (none / auto / a path), or None. `warn`: where
    `latest_checkpoint` says it fell back from a dangling `latest` (default: stderr)."""
    r = recipe.train.resume
    if r == "none":
        return None
    if r == "auto":
        return ckpt.latest_checkpoint(checkpoints, **({"warn": warn} if warn else {}))
    p = Path(r)
    if not p.is_dir():
        raise UsageError(f"train.resume={r}: no such checkpoint folder (give auto, none or the path of a "
                         "step_NNNNNNNN folder)")
    return p


_ERRORS = {"usage": UsageError, "checkpoint": ckpt.CheckpointError}


def _group_rank_size_src(group) -> tuple[int, int, int]:
    """This rank's index in `group` (None: the world), the group's size and its first global rank."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return 0, 1, 0
    ranks = tdist.get_process_group_ranks(group) if group is not None else list(range(tdist.get_world_size()))
    return tdist.get_rank(group), len(ranks), ranks[0]


def find_resume(recipe: Recipe, checkpoints: Path, group=None) -> tuple[Path | None, dict | None]:
    """Collective over `group` (the run's ranks; None: the world): the checkpoint `train.resume`
    names, verified, and its meta.json; (None, None) for a fresh start. Raises the same
    UsageError / CheckpointError (one line) on every rank. The group's first rank resolves the
    name and reads the manifest; the sha256 work is shared (see the module docstring)."""
    rank, size, src = _group_rank_size_src(group)
    verdict = None
    if rank == 0:
        try:
            folder = resolve_resume(recipe, checkpoints)
            if folder is None:
                verdict = ("none",)
            else:
                items = list(ckpt.read_manifest(folder).items())
                try:
                    meta, meta_error = ckpt.read_meta(folder), None
                except ckpt.CheckpointError as e:  # reported after the files (a bad meta.json is named there)
                    meta, meta_error = None, str(e)
                verdict = ("ok", str(folder), items, meta, meta_error)
        except UsageError as e:
            verdict = ("error", "usage", str(e))
        except ckpt.CheckpointError as e:
            verdict = ("error", "checkpoint", str(e))
        except OSError as e:
            verdict = ("error", "checkpoint", f"cannot read the checkpoints in {checkpoints}: {e}")
        except BaseException:
            broadcast_object(("error", "checkpoint", "the run's first rank failed to read the checkpoint "
                              "(see its traceback)"), src, group)
            raise
    verdict = broadcast_object(verdict, src, group)
    if verdict[0] == "none":
        return None, None
    if verdict[0] == "error":
        raise _ERRORS[verdict[1]](verdict[2])
    _, folder, items, meta, meta_error = verdict
    folder = Path(folder)
    # Every rank hashes files rank, rank + size, ...; the first bad file over all ranks is reported.
    bad = ckpt.check_files(folder, items[rank::size])
    none_bad = len(items) * 4
    first = -max_int(-((bad[0] * size + rank) * 4 + bad[1] if bad is not None else none_bad), group)
    if first < none_bad:
        message = ckpt.bad_file_message(folder, items[first // 4][0], first % 4) if rank == 0 else None
        raise ckpt.CheckpointError(broadcast_object(message, src, group))
    if meta is None:
        raise ckpt.CheckpointError(meta_error)
    check_model_settings(meta, recipe, folder)
    return folder, meta


MODEL_MAY_CHANGE = {"kernels"}  # another implementation of the same parameters and arithmetic


def _changed(before: dict, after: dict, section: str) -> list[tuple[str, object, object]]:
    """(section.key, stored, new) of the keys of `section` whose values differ; keys the stored
    config does not have (written before they existed) are not compared."""
    old, new = before.get(section) or {}, after.get(section) or {}
    return [(f"{section}.{k}", old[k], new[k]) for k in new if k in old and old[k] != new[k]]


def _describe(changes) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes)


def check_model_settings(meta: dict, recipe: Recipe, folder: Path) -> None:
    """UsageError naming every model.* key (but model.kernels) set differently from the checkpoint's."""
    stored = meta.get("config")
    if not stored:
        return  # no config recorded: nothing to compare
    changes = [c for c in _changed(stored, recipe_to_dict(recipe), "model")
               if c[0].split(".", 1)[1] not in MODEL_MAY_CHANGE]
    if changes:
        raise UsageError(f"checkpoint {folder} was trained with other model settings ({_describe(changes)}); a "
                         "resume cannot change the model (only model.kernels may differ): resume with the "
                         "checkpoint's model.* values or start a new run.name")


SCHEDULE = {"optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.schedule"}
GROUP_KEYS = {"optim.beta1": "betas", "optim.beta2": "betas", "optim.eps": "eps",
              "optim.weight_decay": "weight_decay"}


def optimizer_changes(meta: dict, recipe: Recipe) -> list[tuple[str, object, object]]:
    """optim.* keys set differently from the checkpoint's, and train.max_steps where it is the
    horizon of a cosine schedule (the stored or the new one)."""
    stored = meta.get("config")
    if not stored:
        return []
    new = recipe_to_dict(recipe)
    changes = _changed(stored, new, "optim")
    cosine = "cosine" in ((stored.get("optim") or {}).get("schedule"), new["optim"]["schedule"])
    changes += [c for c in _changed(stored, new, "train") if c[0] == "train.max_steps" and cosine]
    return changes


def _optimizer_settings(engine) -> tuple[list[dict], list[float]]:
    """The freshly built engine's param_groups settings and schedule base rates (this run's)."""
    base = optim_state.base_optimizer(engine)
    groups = [{k: g[k] for k in ("betas", "eps", "weight_decay") if k in g} for g in base.param_groups]
    return groups, list(engine.lr_scheduler.base_lrs)


def apply_optimizer_settings(engine, fresh: tuple[list[dict], list[float]], changes) -> None:
    """After DeepSpeed's load: put this run's settings (`fresh`, taken before the load) back where the
    load restored the checkpoint's: param_groups' betas/eps/weight_decay, the scheduler's base
    rates, and the learning rate of the restored step under the new schedule."""
    keys = {k for k, _, _ in changes}
    groups, base_lrs = fresh
    base = optim_state.base_optimizer(engine)
    for g, f in zip(base.param_groups, groups):
        for key in {GROUP_KEYS[k] for k in keys & GROUP_KEYS.keys()}:
            if key in f:
                g[key] = f[key]
    if keys & (SCHEDULE | {"train.max_steps"}):
        sched = engine.lr_scheduler
        sched.base_lrs = list(base_lrs)
        for g, b in zip(sched.optimizer.param_groups, base_lrs):
            g["initial_lr"] = b
        _schedule_at(sched, sched.last_epoch)


def _say_applied(folder: Path, changes, engine, step: int) -> None:
    print(f"resume: settings changed since {folder.name} apply from step {step + 1} on: {_describe(changes)} "
          f"(learning rate now {engine.get_lr()[0]:.6g})", flush=True)


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
    _schedule_at(engine.lr_scheduler, step)
    engine.global_steps = step


def _schedule_at(sched, step: int) -> None:
    """Put the LambdaLR scheduler, and its optimizer's learning rates, at `step` of its schedule."""
    sched.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def restore(replica, recipe: Recipe, folder: Path, meta: dict, move: LayoutChange | None, sampler,
            is_main: bool, rank: int) -> dict:
    """Load `folder`'s training state into the replica (its engine and random-number stream) and
    the sampler; returns the loop state (its "step": the step to continue from). With `move` the
    weights were already loaded into the model (resharded) when the replica was built. `rank`: this
    rank's index in the run (its loop-state file)."""
    engine = replica.engine
    changes = optimizer_changes(meta, recipe)
    if move is None:
        fresh = _optimizer_settings(engine)
        loop_state = ckpt.load([replica.component], folder, meta, rank)
        sampler.load_state_dict(loop_state["sampler"])
        ckpt.set_rng_state(loop_state["rng"])
        if changes:
            apply_optimizer_settings(engine, fresh, changes)
            if is_main:
                _say_applied(folder, changes, engine, loop_state["step"])
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
        if changes:  # a fresh engine: this run's settings are already the ones in use
            _say_applied(folder, changes, engine, step)
    return loop_state
