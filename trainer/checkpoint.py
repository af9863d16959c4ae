"""Atomic, verifiable checkpoints around DeepSpeed's own sharded save.

Layout of `<run>/checkpoints/`:
    step_00000200/            one finished checkpoint
        <DeepSpeed files>     model/optimizer/scheduler shards, one set per rank
        loop_rank<r>.pt       the loop's own state of rank r: RNG states, data sampler position
        meta.json             step, resolved config, tokenizer hash, layout
        manifest.json         size and sha256 of every file above (written last)
    latest                    name of the newest finished checkpoint (replaced atomically)

A save writes into `step_N.partial/`, renames it to `step_N/` once every rank has finished and the
manifest is on disk, and only then points `latest` at it. A crash at any moment therefore leaves
`latest` on the previous complete checkpoint; a leftover `.partial` folder is removed by the next
save. Loading verifies the manifest, so a truncated or altered file is refused with a message.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from . import faults
from .distributed import barrier
from .files import atomic_write_text, fsync_dir, sha256_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used. The message is one line for the user."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save(engine, root: Path, step: int, loop_state: dict, meta: dict, rank: int, keep: int,
         extra: dict[str, object] | None = None) -> Path:
    """Collective: every rank must call it. Returns the finished checkpoint folder. `extra`:
    {file name: object} that rank 0 adds with torch.save (covered by the manifest like the rest)."""
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    partial = root / f"{name}.partial"
    final = root / name
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
    barrier()
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
    own = partial / f"loop_rank{rank}.pt"
    tmp = own.with_suffix(".tmp")
    torch.save(loop_state, tmp)
    os.replace(tmp, own)
    barrier()
    faults.maybe_kill(faults.KILL_IN_SAVE, step)
    if rank == 0:
        for file_name, obj in (extra or {}).items():
            torch.save(obj, partial / file_name)
        (partial / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        atomic_write_text(partial / "manifest.json", json.dumps(_manifest(partial), indent=1))
        os.replace(partial, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", name + "\n")
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


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


def load(engine, folder: Path, rank: int | None) -> dict:
    """Collective. Loads DeepSpeed state into `engine` and returns this rank's loop state
    (rank None: rank 0's, for a resume in another layout whose ranks differ)."""
    ok, client = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)
    if ok is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}")
    own = folder / f"loop_rank{rank if rank is not None else 0}.pt"
    if not own.exists():
        raise CheckpointError(f"checkpoint {folder} has no loop state for rank {rank} "
                              "(saved with a different number of processes)")
    return torch.load(own, weights_only=False)
