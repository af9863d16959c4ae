"""Atomic, verifiable checkpoints of named components around DeepSpeed's own sharded save.

Layout of `<run>/checkpoints/`:
    step_00000200/            one finished checkpoint (one commit for all its components)
        <component>/          one per model / agent / adapter (the pre-training loop: `model`)
            <DeepSpeed files> its engine's model/optimizer/scheduler shards, one set per rank
            rng_rank<r>.pt    its own random-number stream on rank r (`trainer.rng`)
        loop_rank<r>.pt       the loop's shared state of rank r: step, data position, global RNGs
        meta.json             format, component names, step, resolved config, tokenizer hash, layout
        manifest.json         size and sha256 of every file above (written last)
    latest                    name of the newest finished checkpoint (replaced atomically)

A save writes into `step_N.partial/`, renames it to `step_N/` once every rank of the group has
finished and the manifest is on disk, and only then points `latest` at it. A crash at any moment
therefore leaves `latest` on the previous complete checkpoint; a leftover `.partial` folder is
removed by the next save. Loading verifies the manifest, so a truncated or altered file is refused
with a message. Checkpoints written before components existed (format 1: DeepSpeed's files at the
top of `step_N/`, no `format` in meta.json) load as a single component `model`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import faults
from .distributed import barrier
from .files import atomic_write_text, fsync_dir, sha256_file
from .rng import RngStream, rng_state, seed_all, set_rng_state

__all__ = ["FORMAT", "CheckpointError", "Component", "component_files", "latest_checkpoint", "list_checkpoints",
           "load", "rng_state", "save", "seed_all", "set_rng_state", "step_dir_name", "verify"]

FORMAT = 2

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used. The message is one line for the user."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


@dataclass
class Component:
    """One model of a checkpoint: its DeepSpeed engine and its own random-number stream."""

    name: str
    engine: object
    rng: RngStream


def component_files(folder: Path, meta: dict, name: str = "model") -> Path:
    """The folder holding component `name`'s DeepSpeed files in checkpoint `folder`."""
    if meta.get("format", 1) < 2:
        if name != "model":
            raise CheckpointError(f"checkpoint {folder} predates named components: it holds only the model")
        return folder
    if name not in meta.get("components", []):
        raise CheckpointError(f"checkpoint {folder} has no component {name!r} (it has {meta.get('components')})")
    return folder / name


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not STEP_DIR.match(name) or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a finished checkpoint folder in {root}")
    return path


def save(components: list[Component], root: Path, step: int, loop_state: dict, meta: dict, rank: int,
         is_main: bool, keep: int, extra: dict[str, object] | None = None, group=None,
         names: list[str] | None = None) -> Path:
    """Collective over `group` (every rank of the run). Returns the finished folder.
    `components`: this rank's (replicas of a job save theirs side by side); `names`: every
    component of the checkpoint (default: this rank's); `rank`: this rank's index in the group;
    `loop_state`: its shared state; `extra`: {relative file name: object}, added with torch.save
    by each rank that passes it (covered by the manifest)."""
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    partial = root / f"{name}.partial"
    final = root / name
    if is_main:
        if partial.exists():
            shutil.rmtree(partial)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        partial.mkdir()  # DeepSpeed creates it on global rank 0 only, which may be another replica's
    barrier(group)
    for c in components:
        c.engine.save_checkpoint(str(partial), tag=c.name, save_latest=False)
        _save_file(c.rng.state, partial / c.name / f"rng_rank{rank}.pt")
    _save_file(loop_state, partial / f"loop_rank{rank}.pt")
    for file_name, obj in (extra or {}).items():
        _save_file(obj, partial / file_name)
    barrier(group)
    faults.maybe_kill(faults.KILL_IN_SAVE, step)
    if is_main:
        meta = {**meta, "format": FORMAT, "components": names or [c.name for c in components]}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        atomic_write_text(partial / "manifest.json", json.dumps(_manifest(partial), indent=1))
        os.replace(partial, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", name + "\n")
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(group)
    return final


def _save_file(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def verify(folder: Path) -> dict:
    """Check the manifest; return meta.json. Raises CheckpointError naming the first bad file."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no manifest.json); "
                              f"{_suggest_other(folder)}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {folder} has a corrupted manifest.json; {_suggest_other(folder)}") from None
    for rel, want in manifest.items():
        p = folder / rel
        if not p.exists():
            raise CheckpointError(f"checkpoint {folder} is corrupted: {rel} is missing; {_suggest_other(folder)}")
        if p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupted: {rel} does not match its recorded "
                                  f"sha256; {_suggest_other(folder)}")
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {folder} has no readable meta.json; {_suggest_other(folder)}") from None


def _suggest_other(folder: Path) -> str:
    others = [p for p in list_checkpoints(folder.parent) if p != folder]
    if others:
        return f"resume from an earlier one with train.resume={others[-1]}"
    return "no other checkpoint exists for this run (start again with train.resume=none)"


def load(components: list[Component], folder: Path, meta: dict, rank: int | None) -> dict:
    """Collective. Loads each component's DeepSpeed state and random-number stream, and returns
    this rank's shared loop state (rank None: rank 0's, for a resume in another layout whose ranks
    differ: then only the engines' states are loaded, the caller restarts the streams)."""
    own = folder / f"loop_rank{rank if rank is not None else 0}.pt"
    if not own.exists():
        raise CheckpointError(f"checkpoint {folder} has no loop state for rank {rank} "
                              "(saved with a different number of processes)")
    loop_state = torch.load(own, weights_only=False)
    for c in components:
        files = component_files(folder, meta, c.name)
        ok, _ = c.engine.load_checkpoint(str(files.parent), tag=files.name, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if ok is None:
            raise CheckpointError(f"DeepSpeed could not load component {c.name!r} of {folder}")
        if rank is None:
            continue
        stream = files / f"rng_rank{rank}.pt"
        # Format 1 kept one stream per rank, the process-wide one, in the loop state.
        c.rng.state = torch.load(stream, weights_only=False) if stream.exists() else loop_state["rng"]
    return loop_state
