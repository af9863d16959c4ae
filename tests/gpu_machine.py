"""A Python that looks like the lent GPU machine's: torch and this repository, none of our other pins.

`bare_python_env(folder, hidden)` writes a sitecustomize.py into `folder` that hides the top-level
packages `hidden` from every import finder (`import x` raises ModuleNotFoundError and
`importlib.util.find_spec("x")` returns None, as on a Python that lacks them), except copies found
under `allow_under`. It returns an environment (the folder first on PYTHONPATH) under which every
Python started, its subprocesses included (bash scripts, torchrun workers), loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.trainutil import REPO, env

# Top-level packages of requirements.txt (and ours that need them) that the GPU machine's Python lacks.
NOT_ON_GPU_MACHINE = ("deepspeed", "transformers", "pydantic", "tokenizers", "tqdm", "yaml", "wandb",
                      "datasets", "safetensors", "matplotlib", "trainer", "launch")

SITECUSTOMIZE = """
import sys

HIDDEN = {hidden!r}
ALLOW_UNDER = {allow_under!r}


def _allowed(spec):
    places = [spec.origin or ""] + list(spec.submodule_search_locations or [])
    return ALLOW_UNDER is not None and any(str(p).startswith(ALLOW_UNDER) for p in places)


class Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        find = getattr(self.inner, "find_spec", None)
        spec = find(name, path, target) if find else None
        if spec is not None and name.split(".")[0] in HIDDEN and not _allowed(spec):
            return None
        return spec

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""


def bare_python_env(folder: Path, hidden=NOT_ON_GPU_MACHINE, allow_under: Path | None = None, **extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(
        hidden=tuple(hidden), allow_under=str(allow_under) if allow_under else None))
    e = env(**extra)
    e["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO)])
    return e
