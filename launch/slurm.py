"""`python -m launch slurm RECIPE [key=value ...]` (`make slurm`): render the sbatch script of a recipe
and submit it.

The script comes from launch/sbatch.template, filled from the recipe's `launch:` section (nodes,
procs_per_node, gpus_per_node, cpus_per_task, partition, time, account, requeue, signal_seconds,
slurm_extra, setup) after the overrides and the command-line flags (--nodes, --gpus-per-node,
--partition, --time, --account, which become `launch.*` overrides so that the job trains exactly the
recipe that was validated here). It is written to `<run dir>/slurm/job.sbatch` and submitted with
`sbatch`; Slurm's log of the job goes to `<run dir>/slurm/<job id>.out`, the ranks' logs to
`<run dir>/logs/`. `--dry-run` prints the script and writes nothing. How the job runs, stops before
its time limit and requeues itself is described in the template.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from trainer.recipe import REPO_ROOT, ConfigError, check_layout, load_recipe
from trainer.schema import Recipe

TEMPLATE = Path(__file__).resolve().parent / "sbatch.template"
EXIT_USAGE = 2
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SlurmError(Exception):
    """sbatch is missing or refused the job; the message is one line."""


def time_limit_seconds(value: str) -> int | None:
    """Seconds of a Slurm time limit: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds; None for UNLIMITED/INFINITE."""
    v = value.strip()
    if v.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", v)
    if not m:
        raise ConfigError(f"launch.time={value!r} is not a Slurm time limit (minutes, mm:ss, hh:mm:ss, "
                          "d-hh, d-hh:mm or d-hh:mm:ss)")
    days, a, b, c = m.groups()
    if days is not None:  # d-hh[:mm[:ss]]
        parts = [int(a), int(b or 0), int(c or 0)]
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if c is not None:  # hh:mm:ss
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # mm:ss
        return int(a) * 60 + int(b)
    return int(a) * 60  # minutes


def flag_overrides(args) -> list[str]:
    """The command-line flags as `launch.*` overrides (strings JSON-quoted: YAML would read an unquoted
    12:00:00 as a number)."""
    out = []
    if args.nodes is not None:
        out.append(f"launch.nodes={args.nodes}")
    if args.gpus_per_node is not None:
        out.append(f"launch.gpus_per_node={args.gpus_per_node}")
        if args.gpus_per_node > 0 and not any(o.startswith("launch.procs_per_node=") for o in args.overrides):
            out.append(f"launch.procs_per_node={args.gpus_per_node}")  # one process per GPU
    for key in ("partition", "time", "account"):
        value = getattr(args, key)
        if value is not None:
            out.append(f"launch.{key}={json.dumps(str(value))}")
    return out


def load_for_slurm(recipe_arg: str, overrides: list[str]) -> Recipe:
    try:
        recipe = load_recipe(recipe_arg, overrides)
    except ConfigError as e:
        if "'launch.time'" in str(e) and "string" in str(e):
            raise ConfigError(f"{e}; quote the time limit in YAML, e.g. launch.time=\"'24:00:00'\"") from None
        raise
    check_layout(recipe, recipe.world_size())
    ln = recipe.launch
    if ln.gpus_per_node and ln.procs_per_node != ln.gpus_per_node:
        raise ConfigError(f"launch.procs_per_node={ln.procs_per_node} must equal launch.gpus_per_node="
                          f"{ln.gpus_per_node} (one process per GPU)")
    if ln.backend == "nccl" and not ln.gpus_per_node:
        raise ConfigError("launch.backend=nccl needs GPU nodes: set launch.gpus_per_node (--gpus-per-node)")
    if ln.time is not None:
        limit = time_limit_seconds(ln.time)
        if limit is not None and ln.signal_seconds >= limit:
            raise ConfigError(f"launch.signal_seconds={ln.signal_seconds} must be shorter than the time limit "
                              f"launch.time={ln.time} ({limit} s)")
    for opt in ln.slurm_extra:
        if not opt.startswith("-") or "\n" in opt:
            raise ConfigError(f"launch.slurm_extra item {opt!r} must be one sbatch option such as --exclusive")
    return recipe


def run_dir(recipe: Recipe) -> Path:
    return (Path(recipe.run.output_dir) / recipe.run.name).resolve()


def render(recipe: Recipe, recipe_arg: str, overrides: list[str], python: str | None = None,
           template: Path = TEMPLATE) -> str:
    """The sbatch script. Lines with a placeholder whose value is None are left out."""
    ln = recipe.launch
    rdir = run_dir(recipe)
    slurm_dir = rdir / "slurm"
    recipe_path = Path(recipe_arg)
    if recipe_path.suffix in (".yaml", ".yml") and recipe_path.exists():
        recipe_arg = str(recipe_path.resolve())  # the job may start in another folder
    q = shlex.quote
    values: dict[str, str | None] = {
        "header": f"{recipe.run.name}: {recipe.run.description}".strip().rstrip(":").replace("\n", " "),
        "script": str(slurm_dir / "job.sbatch"),
        "job_name": recipe.run.name,
        "nodes": str(ln.nodes),
        "procs_per_node": str(ln.procs_per_node),
        "gpus_per_node": str(ln.gpus_per_node) if ln.gpus_per_node else None,
        "cpus_per_task": str(ln.cpus_per_task) if ln.cpus_per_task else None,
        "partition": ln.partition,
        "time": ln.time,
        "account": ln.account,
        "workdir": str(Path.cwd()),
        "slurm_dir": str(slurm_dir),
        "signal_seconds": str(ln.signal_seconds),
        "requeue_flag": "--requeue" if ln.requeue else "--no-requeue",
        "requeue": "1" if ln.requeue else "0",
        "slurm_extra": "\n".join(f"#SBATCH {opt}" for opt in ln.slurm_extra) or None,
        "setup": "\n".join(ln.setup) or None,
        "repo": q(str(REPO_ROOT)),
        "python": q(python or sys.executable),
        "recipe": q(recipe_arg),
        "overrides": " ".join(q(o) for o in overrides),
    }
    lines = []
    for line in template.read_text().splitlines():
        names = _PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise ValueError(f"{template}: unknown placeholder(s) {unknown}")
        if any(values[n] is None for n in names):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


NO_SBATCH = ("sbatch not found on PATH: run this on a Slurm login node, or print the script with --dry-run "
             "(make slurm DRY_RUN=1)")


def sbatch(script: Path) -> str:
    """Submit; the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SlurmError(NO_SBATCH)
    out = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        msg = " ".join((out.stderr or out.stdout).split()) or f"exit status {out.returncode}"
        raise SlurmError(f"sbatch refused {script}: {msg}")
    return out.stdout.strip().split(";")[0]


def submit(args) -> int:
    """`python -m launch slurm`: validate, render, write, submit; print the job id and the log paths."""
    overrides = [*args.overrides, *flag_overrides(args)]
    recipe = load_for_slurm(args.recipe, overrides)  # ConfigError -> one line, exit 2 (launch/cli.py)
    text = render(recipe, args.recipe, overrides)
    if args.dry_run:
        print(text, end="")
        return 0
    if shutil.which("sbatch") is None:  # before writing anything
        print(f"error: {NO_SBATCH}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    rdir = run_dir(recipe)
    script = rdir / "slurm" / "job.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    try:
        job_id = sbatch(script)
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    ln = recipe.launch
    where = f"{ln.nodes} node(s) x {ln.procs_per_node} process(es)" + (f", {ln.gpus_per_node} GPU(s)/node"
                                                                        if ln.gpus_per_node else "")
    print(f"submitted job {job_id} ({where}): {script}")
    print(f"  Slurm log:  {script.parent / (job_id + '.out')}")
    print(f"  rank logs:  {rdir / 'logs'}/   metrics: {rdir / 'metrics.jsonl'}")
    print(f"  watch:      squeue -j {job_id}")
    print(f"  stop:       scancel --signal=TERM {job_id}   (checkpoint, then end; plain scancel kills after "
          "the cluster's KillWait)")
    print(f"  requeue:    scancel --signal=USR1 --batch {job_id}   (checkpoint, then continue in a new allocation)")
    return 0

