"""Start a recipe on several processes, and supervise it.

`python -m launch train RECIPE` calls `run_deepspeed` when the recipe asks for more than one
process (`launch.procs_per_node` x `launch.nodes`). On one node, and on each node of a Slurm job, it
starts the per-node launcher (launch/node.py) with the world_info the `deepspeed` runner would have
built: it starts this node's ranks with the environment DeepSpeed's per-node launcher gives them, without
that launcher's torch import and once-a-second polling (~2.5 s of every launch on a small machine).
Several nodes through ssh/pdsh (`launch.hostfile`) go through the `deepspeed` runner, which starts
DeepSpeed's per-node launcher on every node. Each rank re-enters the same command line with
RANK/LOCAL_RANK/WORLD_SIZE set by the launcher. Rank 0 owns the console; rank r>0 writes to
`<run>/logs/rank<r>.log`. Every rank records its pid and, on a clean exit, its exit status in
`<run>/logs/`, so that when the job fails this supervisor can name the rank that died first.
The per-node launcher stops the remaining ranks as soon as one exits with an error; a rank
stuck in a collective is bounded by `launch.timeout_s`.

Stopping: SIGTERM or SIGUSR1 to this supervisor is delivered to the ranks themselves (the children of
the per-node launcher), which save a checkpoint together at the next step and exit with
128+signal. The launcher in between (the per-node launcher; for ssh jobs DeepSpeed's runner too) starts
with both signals ignored, so a signal sent to the whole process tree (which is how Slurm signals a job
step) cannot kill it before the ranks have saved; once its ranks run, the per-node launcher's own SIGTERM
handler passes SIGTERM on to them, which is what they are stopping on already.
(Several nodes through ssh/pdsh with `launch.hostfile`: the ranks are remote, so the supervisor sends
SIGTERM to DeepSpeed's runner instead, as before.)

Inside a Slurm job (launch/slurm.py renders the script) one supervisor runs per node: the script
exports LAUNCH_MASTER_ADDR/LAUNCH_MASTER_PORT, the node rank is the srun task's SLURM_NODEID, and the
per-node launcher starts only this node's ranks (`slurm_layout`).
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
from dataclasses import dataclass
from pathlib import Path

from launch import node
from trainer.schema import Recipe


def logs_dir(recipe: Recipe) -> Path:
    return Path(recipe.run.output_dir) / recipe.run.name / "logs"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def deepspeed_command(recipe_arg: str, overrides: list[str], procs_per_node: int, nodes: int = 1,
                      master_port: int | None = None, hostfile: str | None = None) -> list[str]:
    """The `deepspeed` runner command for a job over several nodes through ssh/pdsh (`launch.hostfile`):
    the runner starts every node's per-node launcher."""
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [exe, "--log_level", "warning", "--num_gpus", str(procs_per_node),
           "--master_port", str(master_port or free_port()), "--no_local_rank", "--module"]
    if nodes > 1:
        cmd += ["--num_nodes", str(nodes)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    return cmd + ["launch", "train", recipe_arg, *overrides]


def node_launch_command(recipe_arg: str, overrides: list[str], devices: dict[str, list[int]], node_rank: int,
                        master_addr: str, master_port: int) -> list[str]:
    """The per-node launcher (launch/node.py) for this node's ranks, with the world_info the `deepspeed`
    runner would build for DeepSpeed's. `devices`: every node of the job in node-rank order with its device
    indices (the launcher numbers node r's ranks after those of the nodes before it and gives the ranks
    the node's devices through CUDA_VISIBLE_DEVICES)."""
    return node.command(devices, node_rank, master_addr, master_port,
                        [sys.executable, "-u", "-m", "launch", "train", recipe_arg, *overrides])


GPU_DEVICE_NODES = ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/kfd")  # NVIDIA's driver; AMD's ROCm


def cuda_visible(device_nodes: tuple[str, ...] = GPU_DEVICE_NODES) -> bool:
    """torch.cuda.is_available(), as the ranks will find it. On a machine with no GPU driver at all the
    answer is no without importing torch, which the supervisor otherwise never needs (~1.5 s of every
    multi-rank launch)."""
    if not any(os.path.exists(p) for p in device_nodes):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def launcher_env(procs_per_node: int) -> dict:
    env = dict(os.environ)
    # DeepSpeed's CPU accelerator counts LOCAL_SIZE as its "devices"; on GPU nodes it counts GPUs.
    if not cuda_visible():
        env["LOCAL_SIZE"] = str(procs_per_node)
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs_per_node)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH")]))
    return env


def adopt_launcher_env(env: dict | None = None) -> None:
    """In a rank started by another launcher than DeepSpeed's: torchrun (and `accelerate launch
    --multi_gpu`, which runs torchrun) name the node's process count LOCAL_WORLD_SIZE; DeepSpeed's CPU
    accelerator counts LOCAL_SIZE as the node's devices (else its NUMA nodes), and DeepSpeed derives the
    number of nodes from that count (e.g. ZeRO-3's gradient reduction). `launcher_env` sets it for ours."""
    env = os.environ if env is None else env
    if "LOCAL_SIZE" not in env and env.get("LOCAL_WORLD_SIZE"):
        env["LOCAL_SIZE"] = env["LOCAL_WORLD_SIZE"]


def check_accelerate_env(recipe: Recipe, env: dict | None = None) -> None:
    """`accelerate launch` passes its own training settings to the ranks in ACCELERATE_* variables;
    nothing here reads them (the recipe is the one source of the DeepSpeed config, precision and
    compilation), so a setting that asks for something the recipe does not say is refused, in one
    line naming the recipe key to use, instead of being silently ignored."""
    env = os.environ if env is None else env
    from trainer.errors import UsageError

    hint = "; accelerate only starts the processes here (docs/launchers.md)"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UsageError("accelerate launch --use_deepspeed (or a DEEPSPEED accelerate config) passes DeepSpeed "
                         "settings this project does not read: the recipe is the DeepSpeed config; launch with "
                         "--multi_gpu" + hint)
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UsageError("accelerate launch --use_fsdp (or an FSDP accelerate config) asks for FSDP: this project "
                         "shards with DeepSpeed ZeRO (parallel.zero_stage); launch with --multi_gpu" + hint)
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision != "no" and not (precision == "bf16" and recipe.train.precision == "bf16"):
        raise UsageError(f"accelerate launch --mixed_precision {precision} is not applied by this project: use "
                         f"--mixed_precision no and the recipe's train.precision (now {recipe.train.precision}; "
                         "fp32 or bf16)" + hint)
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo != "no":
        raise UsageError(f"accelerate launch --dynamo_backend {dynamo} is not applied by this project: use "
                         "--dynamo_backend no and the recipe's train.compile=true" + hint)


@dataclass(frozen=True)
class NodeLayout:
    """Where this node's launcher sits in a multi-node job (one launcher per node, no ssh)."""

    node_rank: int
    nodes: int
    master_addr: str
    master_port: int


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RESEND_S = 1.0  # how often the supervisor looks for ranks that have not had a stop signal yet


def slurm_layout(recipe: Recipe, env: dict | None = None) -> NodeLayout | None:
    """The layout inside the srun step of the job script from launch/slurm.py, else None.

    The script exports LAUNCH_MASTER_ADDR (first host of the allocation) and LAUNCH_MASTER_PORT
    (20000 + job id % 20000); srun runs one task per node, whose SLURM_NODEID is its node rank."""
    from trainer.recipe import ConfigError

    env = os.environ if env is None else env
    addr, port = env.get("LAUNCH_MASTER_ADDR"), env.get("LAUNCH_MASTER_PORT")
    if not addr or not port:
        return None
    if "SLURM_NODEID" not in env:
        raise ConfigError("LAUNCH_MASTER_ADDR is set but this is not a Slurm job step (no SLURM_NODEID); run "
                          "the launcher with srun, one task per node (see launch/sbatch.template)")
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or nodes)
    if nodes != recipe.launch.nodes:
        raise ConfigError(f"launch.nodes={recipe.launch.nodes} but this Slurm job step has {nodes} node(s); "
                          f"submit with --nodes {recipe.launch.nodes} (make slurm NODES=...)")
    if tasks != nodes:
        raise ConfigError(f"the Slurm job step runs {tasks} tasks on {nodes} node(s); the launcher needs exactly "
                          "one task per node (srun --ntasks-per-node=1)")
    return NodeLayout(int(env["SLURM_NODEID"]), nodes, addr, int(port))


def _ignore_stop_signals() -> None:  # runs in the launcher child between fork and exec
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _rank_processes(proc: subprocess.Popen) -> list:
    """The rank processes: the children of the per-node launcher, ours (launch/node.py), which
    `run_deepspeed` started itself (`proc`), or DeepSpeed's, started by the `deepspeed` runner."""
    import psutil

    try:
        top = psutil.Process(proc.pid)
        launchers = [top] if "launch.node" in proc.args else top.children()
        return [rank for launcher in launchers for rank in launcher.children()]
    except psutil.Error:
        return []


def _catches(pid: int, signum: int) -> bool | None:
    """Whether process `pid` has a handler installed for `signum` (None: cannot tell, not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return None


def _signal_ranks(proc: subprocess.Popen, signum: int, delivered: set[int]) -> None:
    """Deliver `signum` once to each rank. A SIGUSR1 waits until the rank's training loop has its
    handler installed (before that the rank ignores it); once delivered it is not repeated, since a
    rank that is already exiting has Python's default disposition back and would die of it."""
    import psutil

    for rank in _rank_processes(proc):
        if rank.pid in delivered or (signum == signal.SIGUSR1 and _catches(rank.pid, signum) is False):
            continue
        try:
            rank.send_signal(signum)
        except psutil.Error:
            pass
        delivered.add(rank.pid)


def slurm_gpu_ids(recipe: Recipe, env: dict | None = None) -> list[int] | None:
    """The GPUs Slurm gave this node's task (CUDA_VISIBLE_DEVICES), when they are plain indices and
    one per process. The per-node launcher would otherwise number the node's GPUs from 0, which picks
    another job's GPUs on a shared node without device cgroups."""
    env = os.environ if env is None else env
    ids = [i.strip() for i in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip()]
    if not recipe.launch.gpus_per_node or len(ids) != recipe.launch.procs_per_node or not all(
            i.isdigit() for i in ids):
        return None
    return [int(i) for i in ids]


def run_deepspeed(recipe: Recipe, recipe_arg: str, overrides: list[str]) -> int:
    stop: dict = {}
    delivered: set[int] = set()
    proc: subprocess.Popen | None = None
    direct = True  # the ranks are this machine's: signal them directly

    def forward(signum, frame):
        # Straight to the ranks: they save a checkpoint together at the next step and exit with
        # 128+signum. (The per-node launcher would turn SIGTERM into a 30 s terminate-then-kill.)
        # SIGUSR1 is Slurm's "time is nearly up" warning.
        if stop.get("signal") != signum:
            delivered.clear()  # a different signal goes to every rank again
        stop["signal"] = signum
        if proc is not None:
            if direct:
                _signal_ranks(proc, signum, delivered)
            elif proc.poll() is None:  # ssh multi-node: DeepSpeed's runner stops the remote ranks
                proc.send_signal(signal.SIGTERM)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    logs = logs_dir(recipe)
    logs.mkdir(parents=True, exist_ok=True)
    layout = slurm_layout(recipe)
    direct = layout is not None or recipe.launch.nodes == 1
    ppn = recipe.launch.procs_per_node
    first = (layout.node_rank if layout else 0) * ppn
    local_ranks = range(first, first + ppn) if layout else range(recipe.world_size())
    for r in local_ranks:  # on a shared file system, the other nodes' records are theirs to clear
        for stale in (logs / f"rank{r}.pid", logs / f"rank{r}.exit", logs / f"rank{r}.error"):
            stale.unlink(missing_ok=True)
    if layout is not None:
        gpus = slurm_gpu_ids(recipe)
        devices = {f"node{i}": gpus or list(range(ppn)) for i in range(layout.nodes)}
        cmd = node_launch_command(recipe_arg, overrides, devices, layout.node_rank, layout.master_addr,
                                  layout.master_port)
    elif recipe.launch.nodes == 1 and not recipe.launch.hostfile:
        cmd = node_launch_command(recipe_arg, overrides, {"localhost": list(range(ppn))}, 0, "127.0.0.1",
                                  free_port())
    else:
        cmd = deepspeed_command(recipe_arg, overrides, ppn, recipe.launch.nodes, hostfile=recipe.launch.hostfile)
    env = launcher_env(ppn)
    if stop:  # stopped before any rank started: nothing to save
        name = signal.Signals(stop["signal"]).name
        print(f"stopped: {name} received before the ranks started; no checkpoint written", file=sys.stderr,
              flush=True)
        return 128 + int(stop["signal"])
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_stop_signals if direct else None)
    while True:
        try:
            rc = proc.wait(timeout=RESEND_S)
            break
        except subprocess.TimeoutExpired:
            # Ranks that were still starting (before the training loop installed its handlers)
            # or did not exist yet get the signal now.
            if stop and direct:
                _signal_ranks(proc, stop["signal"], delivered)
        except KeyboardInterrupt:
            # The launcher got the same SIGINT (same process group) and forwards it to the ranks.
            continue
    stopped = rc in {128 + int(s) for s in (signal.SIGINT, *STOP_SIGNALS)}  # checkpoint saved; rank 0 said so
    if stopped and stop:
        # A rank that had not seen the signal yet when the ranks agreed to stop reports SIGTERM; the
        # launcher passes on whichever rank exited first. Report the signal this supervisor got.
        rc = 128 + int(stop["signal"])
    if rc != 0 and not stopped:
        first = first_error(logs, local_ranks)
        if rc == 2 or (first is not None and first[1] == 2):
            # A usage error ended the job. The per-node launcher passes on the first rank to fail, often
            # one the usage error broke; and when every rank refuses, the first to exit can
            # get rank 0 stopped before rank 0 printed its line. So the line is repeated here unless rank
            # 0 recorded that it printed it.
            rc = 2
            line = usage_error_report(logs, local_ranks)
            if line is not None:
                print(line, file=sys.stderr, flush=True)
        else:
            print(f"error: {describe_failure(logs, local_ranks, rc)}", file=sys.stderr, flush=True)
    return rc


def _exit_records(logs: Path, ranks: range) -> dict[int, list[str]]:
    exits = {}
    for r in ranks:
        f = logs / f"rank{r}.exit"
        if f.exists():
            exits[r] = f.read_text().split()
    return exits


def first_error(logs: Path, ranks: range) -> tuple[int, int] | None:
    """(rank, status) of the earliest recorded non-zero exit, or None."""
    exits = _exit_records(logs, ranks)
    errors = sorted((float(v[1]), r, int(v[0])) for r, v in exits.items() if v and v[0] != "0")
    return (errors[0][1], errors[0][2]) if errors else None


def usage_error_report(logs: Path, ranks: range) -> str | None:
    """The line to print for a job that a usage error ended, or None when rank 0 has printed it already
    (its exit record, written after its message, says 2). The message is the one recorded by the first
    rank to exit with a usage error, else by the lowest rank that recorded one before it was stopped."""
    exits = _exit_records(logs, ranks)
    if 0 in ranks and exits.get(0, [""])[0] == "2":
        return None
    refused = sorted((float(v[1]), r) for r, v in exits.items() if v and v[0] == "2")
    candidates = [r for _, r in refused] + list(ranks)
    for r in candidates:
        why = logs / f"rank{r}.error"
        if why.exists():
            where = "" if r == 0 else f"; log: {logs / f'rank{r}.log'}"
            return f"error: {why.read_text().strip()} (rank {r}{where})"
    return f"error: a rank refused the recipe (exit 2) without recording why. Logs: {logs}"


def describe_failure(logs: Path, ranks: int | range, rc: int) -> str:
    """Name the rank that failed: the first whose recorded exit status is an error, else one that
    never recorded a status (killed by a signal). `ranks`: the world size, or the ranks to look at."""
    ranks = range(ranks) if isinstance(ranks, int) else ranks
    exits = _exit_records(logs, ranks)
    vanished = [r for r in ranks if r not in exits and (logs / f"rank{r}.pid").exists()]
    if vanished:
        r = vanished[0]
        return (f"rank {r} died without an exit status (killed by a signal?); the launcher stopped the "
                f"other ranks (exit {rc}). Logs: {logs}")
    first = first_error(logs, ranks)
    if first is not None:
        r, code = first
        return f"rank {r} exited with status {code}; the launcher stopped the other ranks. Logs: {logs}"
    return f"the per-node launcher exited with status {rc}. Logs: {logs}"


def setup_rank_process(recipe: Recipe) -> None:
    """Inside a launched rank: log files for rank > 0, pid and exit-status records.

    The rank inherited SIGTERM and SIGUSR1 ignored from the launcher (see `run_deepspeed`). SIGTERM
    gets its default back (stop at once) until the training loop installs its checkpoint-and-stop
    handlers; SIGUSR1 stays ignored until then, and the supervisor repeats it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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


def record_usage_error(recipe: Recipe, msg: str) -> None:
    """The one-line usage error a rank found, for the launcher to print when that rank was the first
    to refuse (a rank other than 0 writes to its log, not to the terminal)."""
    rank = int(os.environ.get("RANK", "0"))
    (logs_dir(recipe) / f"rank{rank}.error").write_text(msg + "\n")


def register_exit_record(recipe: Recipe) -> dict:
    """Write the exit record from atexit too, so an exception path is also covered."""
    box = {"code": 1}
    atexit.register(lambda: record_exit(recipe, box["code"]))
    return box
