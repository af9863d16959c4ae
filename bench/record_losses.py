"""Record the first N training losses of every recipe in recipes/, or compare them with a record.

A refactor of the loop, the engine set-up or the checkpoints must leave every recipe's losses
bit-identical on the same machine; this is the check, run before and after the change:

    python bench/record_losses.py --out bench/results/losses-before.json        # on the old commit
    python bench/record_losses.py --compare bench/results/losses-before.json    # on the new one

Each recipe runs as a user runs it (`python -m launch train <recipe>`, through the deepspeed
launcher where the recipe has several processes) at its own size, for N steps, with evaluation,
sampling and W&B off. Losses are compared as the exact floats written to metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def subprocess_env() -> dict:
    """This environment for a `python -m launch` child: the repository on the path, no fault
    injection, no W&B, no rank variables of an enclosing job."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RECIPES_FAULT", "WANDB"))}
    e.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def record(recipe: str, steps: int, root: Path, cache: Path) -> list[float]:
    cmd = [sys.executable, "-m", "launch", "train", recipe, f"train.max_steps={steps}",
           "train.eval_every=100000", "train.sample_tokens=0", "train.progress=false",
           "tracking.wandb=disabled", f"run.output_dir={root}",
           f"run.name={recipe}", f"data.cache_dir={cache}"]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{recipe} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    rows = [json.loads(x) for x in (root / recipe / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][:steps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", help="write the record here (json)")
    ap.add_argument("--compare", help="compare with this record; exit 1 on any difference")
    ap.add_argument("--recipes", nargs="*", help="default: every recipe in recipes/")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "data"))
    args = ap.parse_args()
    recipes = args.recipes or sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    before = json.loads(Path(args.compare).read_text())["losses"] if args.compare else {}
    losses, differ = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for r in recipes:
            t0 = time.time()
            losses[r] = record(r, args.steps, Path(tmp), Path(args.cache))
            verdict = ""
            if args.compare:
                same = losses[r] == before.get(r)
                differ += [] if same else [r]
                verdict = "  bit-identical" if same else f"  DIFFERENT (before: {before.get(r)})"
            print(f"{r:28s} {time.time() - t0:6.1f} s  {losses[r][0]:.6f} .. {losses[r][-1]:.6f}{verdict}", flush=True)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "bench/record_losses.py", *sys.argv[1:]]), "commit": commit,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "steps": args.steps, "losses": losses}, indent=1) + "\n")
    if differ:
        print(f"{len(differ)} recipe(s) changed: {', '.join(differ)}")
        return 1
    if args.compare:
        print(f"all {len(recipes)} recipes: first {args.steps} losses bit-identical to {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def cpu_name() -> str:
    """The CPU's model name (for results files)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(path, text: str) -> None:
    """Print a results table and write it to `path` (its folder created)."""
    print(text)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


def write_marked_section(path, text: str, begin: str, end: str) -> None:
    """Replace the section of results file `path` between the markers `begin` and `end` with `text`
    (which carries the markers; other sections stay), or append it; written atomically."""
    import re

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda m: text, old, count=1)
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)
