"""Shared by the multi-agent learning benchmarks: run a recipe through the CLI, read its summary, and
keep finished rows in a JSON file beside the results table (a rerun adds only the missing ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_recipe(recipe: str, name: str, runs: Path, overrides: list[str]) -> tuple[dict, float]:
    """`python -m launch train RECIPE run.name=NAME ...` (one thread unless OMP_NUM_THREADS says
    otherwise); returns the run's summary.json and the wall time in seconds."""
    cmd = [sys.executable, "-m", "launch", "train", recipe, f"run.name={name}", f"run.output_dir={runs}",
           "train.progress=false", "tracking.wandb=disabled", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads((runs / name / "summary.json").read_text()), wall


class Rows:
    """The finished rows of a benchmark, stored as JSON beside its table."""

    def __init__(self, table: Path):
        self.store = Path(table).with_suffix(".json")
        self.rows: list[dict] = json.loads(self.store.read_text()) if self.store.exists() else []
        self._lock = threading.Lock()

    def run_missing(self, jobs: Iterable[tuple[dict, Callable[[], dict]]], parallel: int = 1) -> None:
        """For each (key, make_row) whose key has no row yet, make_row() and store it; `parallel` runs
        at a time (each a subprocess with one thread)."""
        todo = [make for key, make in jobs if not self.has(**key)]
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            for future in [pool.submit(make) for make in todo]:
                self.add(future.result())

    def has(self, **key) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.rows)

    def add(self, row: dict) -> None:
        with self._lock:
            self.rows.append(row)
            self.store.parent.mkdir(parents=True, exist_ok=True)
            self.store.write_text(json.dumps(self.rows, indent=1))
            print(row, flush=True)
