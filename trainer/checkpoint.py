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
therefore leaves `latest` on the previous complete checkpoint; leftover `.partial` folders are
removed by the next save that completes. Re-saving a step that already has a finished folder (a
signal right after a periodic save, a resume at train.max_steps) moves the finished one aside to
`step_N.previous/` only once the new one is complete, renames the new one into place, and deletes
the old one after `latest` is rewritten: a crash in between leaves `latest` naming a missing
`step_N/`, and `latest_checkpoint` then falls back (with one warning) to the newest complete
checkpoint, `step_N.previous/` included. Loading verifies the manifest, so a truncated or altered
file is refused with a message. Checkpoints written before components existed (format 1:
DeepSpeed's files at the top of `step_N/`, no `format` in meta.json) load as a single component
`model`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import faults
from .distributed import barrier
from .files import atomic_write_text, fsync_dir, sha256_file
from .rng import RngStream, rng_state, seed_all, set_rng_state

__all__ = ["FORMAT", "CheckpointError", "Component", "check_files", "component_files", "is_complete",
           "latest_checkpoint", "list_checkpoints", "load", "read_manifest", "read_meta", "rng_state", "save",
           "seed_all", "set_rng_state", "step_dir_name", "suggest_other", "verify"]

FORMAT = 2

STEP_DIR = re.compile(r"^step_(\d{8})$")
PREVIOUS = ".previous"  # a finished folder moved aside while the same step is re-saved


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


def is_complete(folder: Path) -> bool:
    """A finished checkpoint folder: its manifest (written last) and meta.json are there. (Whether
    the files match the manifest is `verify`'s question.)"""
    return folder.is_dir() and (folder / "manifest.json").is_file() and (folder / "meta.json").is_file()


def _step_of(name: str) -> int | None:
    m = STEP_DIR.match(name.removesuffix(PREVIOUS))
    return int(m.group(1)) if m else None


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first: `step_N/`, and `step_N.previous/`
    where `step_N/` is not complete (a crash while step N was being re-saved)."""
    found = {}
    for p in list_checkpoints(root):
        if is_complete(p):
            found[_step_of(p.name)] = p
    for p in root.glob(f"step_*{PREVIOUS}") if root.is_dir() else ():
        step = _step_of(p.name)
        if step is not None and step not in found and is_complete(p):
            found[step] = p
    return sorted(found.items())


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def latest_checkpoint(root: Path, warn=_say) -> Path | None:
    """The checkpoint `root/latest` names. When it names a missing or incomplete folder (or is
    missing while complete checkpoints exist), the newest complete checkpoint instead, with one
    `warn`ing; a pointer naming step N never falls back past it (newer folders would be another
    trajectory's). None: no checkpoint at all."""
    pointer = root / "latest"
    if not pointer.exists():
        found = _complete_checkpoints(root)
        if not found:
            return None
        best = found[-1][1]
        warn(f"warning: {root} has no 'latest' pointer but holds complete checkpoints; resuming from the newest, "
             f"{best.name}")
        return best
    name = pointer.read_text().strip()
    path = root / name
    step = _step_of(name) if STEP_DIR.match(name) else None
    if step is not None and is_complete(path):
        return path
    why = "missing" if step is None or not path.exists() else "incomplete (no manifest.json or meta.json)"
    found = [(s, p) for s, p in _complete_checkpoints(root) if p != path and (step is None or s <= step)]
    if not found:
        raise CheckpointError(f"{pointer} names {name!r}, which is {why}, and {root} holds no other complete "
                              "checkpoint to fall back to; start again with train.resume=none")
    best = found[-1][1]
    warn(f"warning: {pointer} names {name!r}, which is {why}; resuming from the newest complete checkpoint, "
         f"{best.name}")
    return best


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
        _commit(root, partial, final, step)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(group)
    return final


def _commit(root: Path, partial: Path, final: Path, step: int) -> None:
    """Put the complete `partial` in place as `final` and point `latest` at it. A finished `final`
    already there (this step saved again) is moved aside to `<final>.previous` only now, and
    deleted once `latest` is rewritten: at every moment a complete copy of the newest step is on
    disk under a name `latest_checkpoint` finds."""
    aside = final.with_name(final.name + PREVIOUS)
    if final.exists():
        if aside.exists():  # left by a crash after the last re-save's rename: `final` is newer
            shutil.rmtree(aside)
        os.replace(final, aside)
        fsync_dir(root)
        faults.maybe_kill(faults.KILL_IN_RESAVE, step)
    os.replace(partial, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    # `latest` names a complete checkpoint: copies set aside by this or an interrupted re-save go,
    # and so do the folders of saves that never finished.
    for old in [*root.glob(f"step_*{PREVIOUS}"), *root.glob("step_*.partial")]:
        shutil.rmtree(old, ignore_errors=True)


def _save_file(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of a finished checkpoint; CheckpointError if absent or unreadable."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no manifest.json); {suggest_other(folder)}")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError
    except (ValueError, OSError):
        raise CheckpointError(f"checkpoint {folder} has a corrupted manifest.json; {suggest_other(folder)}") from None
    return manifest


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {folder} has no readable meta.json; {suggest_other(folder)}") from None


MISSING, MISMATCH, UNREADABLE = 0, 1, 2
_PROBLEM = {MISSING: "is missing", MISMATCH: "does not match its recorded sha256", UNREADABLE: "cannot be read"}


def check_files(folder: Path, items: list[tuple[str, dict]]) -> tuple[int, int] | None:
    """(index in `items`, MISSING / MISMATCH / UNREADABLE) of the first file of `items` (manifest
    entries) that is absent or differs from its recorded size and sha256; None when all match."""
    for i, (rel, want) in enumerate(items):
        p = folder / rel
        try:
            if p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
                return i, MISMATCH
        except FileNotFoundError:
            return i, MISSING
        except OSError:
            return i, UNREADABLE
    return None


def bad_file_message(folder: Path, rel: str, kind: int) -> str:
    return f"checkpoint {folder} is corrupted: {rel} {_PROBLEM[kind]}; {suggest_other(folder)}"


def verify(folder: Path) -> dict:
    """Check the manifest; return meta.json. Raises CheckpointError naming the first bad file.
    (One process reads every file; a run shares the work, see `trainer.resume.find_resume`.)"""
    items = list(read_manifest(folder).items())
    bad = check_files(folder, items)
    if bad is not None:
        raise CheckpointError(bad_file_message(folder, items[bad[0]][0], bad[1]))
    return read_meta(folder)


def suggest_other(folder: Path) -> str:
    others = [p for _, p in _complete_checkpoints(folder.parent) if p != folder]
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
