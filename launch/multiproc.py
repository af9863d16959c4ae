"""Start a recipe on several processes through the `deepspeed` launcher, and supervise it.

`python -m launch train RECIPE` calls `run_deepspeed` when the recipe asks for more than one
process (`launch.procs_per_node` x `launch.nodes`). Each rank re-enters the same command line with
RANK/LOCAL_RANK/WORLD_SIZE set by the launcher. Rank 0 owns the console; rank r>0 writes to
`<run>/logs/rank<r>.log`. Every rank records its pid and, on a clean exit, its exit status in
`<run>/logs/`, so that when the job fails this supervisor can name the rank that died first.
DeepSpeed's per-node launcher stops the remaining ranks as soon as one exits with an error; a rank
stuck in a collective is bounded by `launch.timeout_s`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from trainer.schema import Recipe


def logs_dir(recipe: Recipe) -> Path:
    return Path(recipe.run.output_dir) / recipe.run.name / "logs"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def deepspeed_command(recipe_arg: str, overrides: list[str], procs_per_node: int, nodes: int = 1,
                      master_port: int | None = None, master_addr: str | None = None,
                      hostfile: str | None = None, node_rank: int | None = None) -> list[str]:
    """The `deepspeed` launcher command that starts every local rank of this recipe.

    With `node_rank` set (e.g. one launcher per node started by Slurm's srun), the launcher runs
    without ssh: each node starts only its own ranks."""
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [exe, "--log_level", "warning", "--num_gpus", str(procs_per_node), "--master_port", str(master_port or free_port()),
           "--no_local_rank", "--module"]
    if node_rank is not None:
        cmd += ["--no_ssh", "--node_rank", str(node_rank), "--num_nodes", str(nodes)]
    elif nodes > 1:
        cmd += ["--num_nodes", str(nodes)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    return cmd + ["launch", "train", recipe_arg, *overrides]


def launcher_env(procs_per_node: int) -> dict:
    env = dict(os.environ)
    # DeepSpeed's CPU accelerator counts LOCAL_SIZE as its "devices"; on GPU nodes it counts GPUs.
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        on_gpu = False
    if not on_gpu:
        env["LOCAL_SIZE"] = str(procs_per_node)
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs_per_node)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH")]))
    return env


def run_deepspeed(recipe: Recipe, recipe_arg: str, overrides: list[str]) -> int:
    logs = logs_dir(recipe)
    logs.mkdir(parents=True, exist_ok=True)
    for stale in list(logs.glob("rank*.pid")) + list(logs.glob("rank*.exit")):
        stale.unlink()
    cmd = deepspeed_command(recipe_arg, overrides, recipe.launch.procs_per_node, recipe.launch.nodes,
                            hostfile=recipe.launch.hostfile)
    proc = subprocess.Popen(cmd, env=launcher_env(recipe.launch.procs_per_node))

    def forward(signum, frame):
        # DeepSpeed's launcher turns SIGTERM into SIGTERM for every rank; the ranks then save a
        # checkpoint together and exit. SIGUSR1 is Slurm's "time is nearly up" warning.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            # The launcher got the same SIGINT (same process group) and forwards it to the ranks.
            continue
    if rc not in (0, 2):  # 2: a usage error that rank 0 has already reported in one line
        print(f"error: {describe_failure(logs, recipe.world_size(), rc)}", file=sys.stderr, flush=True)
    return rc


def describe_failure(logs: Path, world: int, rc: int) -> str:
    """Name the rank that failed: the first whose recorded exit status is an error, else one that
    never recorded a status (killed by a signal)."""
    exits = {}
    for r in range(world):
        f = logs / f"rank{r}.exit"
        if f.exists():
            exits[r] = f.read_text().split()
    errors = sorted(((float(v[1]), r, int(v[0])) for r, v in exits.items() if v and v[0] not in ("0",)),
                    key=lambda t: t[0])
    vanished = [r for r in range(world) if r not in exits and (logs / f"rank{r}.pid").exists()]
    if vanished:
        r = vanished[0]
        return (f"rank {r} died without an exit status (killed by a signal?); the launcher stopped the "
                f"other ranks (exit {rc}). Logs: {logs}")
    if errors:
        _, r, code = errors[0]
        return f"rank {r} exited with status {code}; the launcher stopped the other ranks. Logs: {logs}"
    return f"the deepspeed launcher exited with status {rc}. Logs: {logs}"


def setup_rank_process(recipe: Recipe) -> None:
    """Inside a launched rank: log files for rank > 0, pid and exit-status records."""
    rank = int(os.environ.get("RANK", "0"))
    logs = logs_dir(recipe)
    logs.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        log = open(logs / f"rank{rank}.log", "a", buffering=1)
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    (logs / f"rank{rank}.pid").write_text(str(os.getpid()))


def record_exit(recipe: Recipe, code: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    path = logs_dir(recipe) / f"rank{rank}.exit"
    path.write_text(f"{code} {time.time()}\n")


def register_exit_record(recipe: Recipe) -> dict:
    """Write the exit record from atexit too, so an exception path is also covered."""
    box = {"code": 1}
    atexit.register(lambda: record_exit(recipe, box["code"]))
    return box
