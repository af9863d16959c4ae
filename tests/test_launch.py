"""The multi-process launch path: the per-node launcher against DeepSpeed's, per-rank logs, a dying rank."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import node
from launch.multiproc import (
    deepspeed_command,
    describe_failure,
    first_error,
    node_launch_command,
    usage_error_report,
)
from tests.trainutil import env, run_train


def test_launch_commands_one_node_per_node_and_over_ssh():
    import base64
    import json

    cmd = node_launch_command("gpt-tiny", ["train.max_steps=3"], {"localhost": [0, 1, 2, 3]}, 0, "127.0.0.1", 29512)
    assert cmd[1:4] == ["-u", "-m", "launch.node"]
    rank_cmd = cmd[cmd.index("--") + 1:]
    assert rank_cmd == [sys.executable, "-u", "-m", "launch", "train", "gpt-tiny", "train.max_steps=3"]
    opts = dict(a[2:].split("=", 1) for a in cmd[:cmd.index("--")] if a.startswith("--") and "=" in a)
    assert json.loads(base64.urlsafe_b64decode(opts["world_info"])) == {"localhost": [0, 1, 2, 3]}
    assert (opts["master_addr"], opts["master_port"], opts["node_rank"]) == ("127.0.0.1", "29512", "0")
    # DeepSpeed's runner builds the same world_info for a local launch of 4 processes
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, encode_world_info

    assert encode_world_info(apply_num_nodes_and_gpus({"localhost": [0]}, -1, 4)) == opts["world_info"]
    ssh = deepspeed_command("r", [], procs_per_node=2, nodes=3, hostfile="/tmp/hosts")
    assert ssh[0].endswith("deepspeed") and ssh[ssh.index("--num_nodes") + 1] == "3"
    assert ssh[ssh.index("--hostfile") + 1] == "/tmp/hosts" and ssh[ssh.index("--num_gpus") + 1] == "2"


ENV_DUMP = """
import json, os, sys
from pathlib import Path
Path(sys.argv[1], os.environ["RANK"] + ".json").write_text(json.dumps(dict(os.environ)))
"""


def test_the_node_launcher_gives_each_rank_deepspeeds_environment(tmp_path):
    """launch/node.py against DeepSpeed's per-node launcher on the same world_info (node 1 of a
    2 x 2 job on GPUs 2 and 3, node 0 named first): every rank sees the same environment, variable for
    variable (RANK, LOCAL_RANK, WORLD_SIZE, CROSS_RANK, LOCAL_SIZE, CUDA_VISIBLE_DEVICES, ...)."""
    script = tmp_path / "dump.py"
    script.write_text(ENV_DUMP)
    world = {"n0": [2, 3], "n1": [2, 3]}
    info = base64.urlsafe_b64encode(json.dumps(world).encode()).decode()
    where = [f"--world_info={info}", "--node_rank=1", "--master_addr=n0", "--master_port=20042"]
    envs = {}
    for name, cmd in (("deepspeed", [sys.executable, "-u", "-m", "deepspeed.launcher.launch", *where,
                                     "--no_local_rank", str(script)]),
                      ("ours", node.command(world, 1, "n0", 20042, [sys.executable, "-u", str(script)]))):
        out = tmp_path / name
        out.mkdir()
        # `import deepspeed` sets PYTORCH_NVML_BASED_CUDA_CHECK in its process, so DeepSpeed's launcher
        # hands it on; our ranks set it when they import deepspeed. Both get it here, whether or not this
        # test process has imported deepspeed yet (the comparison must not depend on test order).
        proc = subprocess.run([*cmd, str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=env(DS_ACCELERATOR="cpu", PYTORCH_NVML_BASED_CUDA_CHECK="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        envs[name] = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(envs["ours"]) == sorted(envs["deepspeed"]) == ["2", "3"]
    for rank in ("2", "3"):
        ds, ours = envs["deepspeed"][rank], envs["ours"][rank]
        assert ours == ds, {k: (ours.get(k), ds.get(k)) for k in set(ours) | set(ds) if ours.get(k) != ds.get(k)}
    assert {k: envs["ours"]["3"][k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CROSS_RANK", "LOCAL_SIZE",
                                               "CUDA_VISIBLE_DEVICES")} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "CROSS_RANK": "1", "LOCAL_SIZE": "2",
        "CUDA_VISIBLE_DEVICES": "2,3"}


# Each rank: a SIGTERM handler that leaves terminated<RANK>, then ready<RANK>, then a minute's sleep. The rank
# named in argv[2], if any, instead exits with 3 once every other rank is ready (so each can tell it was stopped).
RANKS = """
import os, signal, sys, time
from pathlib import Path
out, rank, world = Path(sys.argv[1]), os.environ["RANK"], int(os.environ["WORLD_SIZE"])
if sys.argv[2:] == [rank]:
    while not all((out / f"ready{r}").exists() for r in range(world) if str(r) != rank):
        time.sleep(0.01)
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *a: ((out / f"terminated{rank}").write_text(""), sys.exit(143)))
(out / f"ready{rank}").write_text("")
time.sleep(60)
"""


def _two_ranks(tmp_path: Path, *failing: str) -> list[str]:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    return node.command({"localhost": [0, 1]}, 0, "127.0.0.1", 1, [sys.executable, str(script), str(tmp_path), *failing])


def test_the_node_launcher_stops_the_other_ranks_when_one_fails_and_passes_its_status_on(tmp_path):
    """Rank 1 exits with 3 once rank 0 is ready; rank 0 would sleep for a minute: it gets SIGTERM, and the
    launcher exits with 3 as soon as rank 0 has gone (no polling interval). The launcher runs as its own
    process, as in a job: in this one it would reap the test process's other children and take its signals."""
    t0 = time.perf_counter()
    proc = subprocess.run(_two_ranks(tmp_path, "1"), capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (tmp_path / "terminated0").exists() and not (tmp_path / "terminated1").exists()
    assert time.perf_counter() - t0 < 30


def test_sigterm_to_the_node_launcher_stops_every_rank_and_exits_1(tmp_path):
    """What Slurm or a user's kill does to the launcher reaches both ranks (each one's handler runs),
    and the launcher exits with 1 once they have gone, not after the ranks' minute of sleep."""
    proc = subprocess.Popen(_two_ranks(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)) and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-3000:]
    assert all((tmp_path / f"terminated{r}").exists() for r in (0, 1))
    assert time.perf_counter() - t0 < 30


def test_the_earliest_recorded_failure_is_the_one_reported(tmp_path):
    # DeepSpeed's launcher passes on whichever failed rank it polls first; the supervisor reads the
    # ranks' exit records instead, so a usage error (2) on rank 0 is not masked by the ranks it broke.
    (tmp_path / "rank0.exit").write_text("2 100.5\n")
    (tmp_path / "rank1.exit").write_text("1 101.0\n")
    (tmp_path / "rank2.exit").write_text("0 99.0\n")
    assert first_error(tmp_path, range(3)) == (0, 2)
    assert "rank 0 exited with status 2" in describe_failure(tmp_path, 3, 1)
    (tmp_path / "rank1.exit").write_text("1 100.0\n")
    assert first_error(tmp_path, range(3)) == (1, 1)
    assert first_error(tmp_path, range(2, 3)) is None



def test_a_usage_error_line_is_repeated_unless_rank_0_printed_it(tmp_path):
    # Every rank refuses the same recipe; rank 1 exits first and the launcher stops rank 0 before its
    # line reaches the terminal (a CI flake): the supervisor prints the first refusing rank's line.
    for r in range(3):
        (tmp_path / f"rank{r}.error").write_text(f"the layout differs (seen by rank {r})\n")
    (tmp_path / "rank2.exit").write_text("2 100.0\n")
    (tmp_path / "rank1.exit").write_text("2 99.0\n")
    line = usage_error_report(tmp_path, range(3))
    assert line.startswith("error: the layout differs (seen by rank 1) (rank 1; log: ")
    assert line.endswith("rank1.log)")
    (tmp_path / "rank0.exit").write_text("2 100.5\n")  # rank 0 recorded its exit: it printed its line
    assert usage_error_report(tmp_path, range(3)) is None
    (tmp_path / "rank0.exit").unlink()
    (tmp_path / "rank1.exit").write_text("1 99.0\n")  # broken by the error, not refusing: rank 2's line
    assert "(seen by rank 2)" in usage_error_report(tmp_path, range(3))
    (tmp_path / "rank2.exit").write_text("1 100.0\n")  # nobody exited refusing: the lowest rank's line
    assert "(seen by rank 0) (rank 0)" in usage_error_report(tmp_path, range(3))
    assert usage_error_report(tmp_path, range(2, 3)) == (
        f"error: the layout differs (seen by rank 2) (rank 2; log: {tmp_path / 'rank2.log'})")


SUPERVISOR_ONLY = """
import subprocess, sys
sys.path.insert(0, {repo!r})
started = []
class Launcher:  # stands in for the per-node launcher: the ranks' work is not this test's
    pid = 0
    def __init__(self, cmd, **kwargs): started.append(cmd)
    def wait(self, timeout=None): return 0
    def poll(self): return 0
subprocess.Popen = Launcher
from launch.cli import main
rc = main(["train", "gpt-tiny", "run.output_dir={out}/runs", "data.cache_dir={out}/cache", "launch.procs_per_node=2",
           "sync.strategy=ring", "sync.replicas=2"])
print(rc, len(started), "launch.node" in started[0], "torch" in sys.modules)
"""


def test_the_supervisor_starts_the_ranks_without_importing_torch(tmp_path):
    """`python -m launch train` with several processes checks the recipe (sync settings included) and
    starts the per-node launcher without importing torch (~1.5 s of every launch): on a machine
    without a GPU driver it needs torch for nothing. (Checked in a fresh interpreter.)"""
    import subprocess
    import sys

    from launch.multiproc import GPU_DEVICE_NODES, cuda_visible
    from tests.trainutil import REPO

    if any(Path(p).exists() for p in GPU_DEVICE_NODES):
        pytest.skip("a GPU driver is present: the supervisor asks torch whether CUDA is usable")
    assert cuda_visible() is False
    code = SUPERVISOR_ONLY.format(repo=str(REPO), out=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["0", "1", "True", "False"], out.stdout

RANK_END = """
import atexit, sys, threading, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from trainer.rank_exit import end_process
out = Path({out!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("joined")
threading.Thread(target=late).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(2)  # idle workers left running, as torch.compile's compile pool leaves them
pool.submit(lambda: None).result()
sys.stdout.write("buffered, not flushed")
end_process(3)
(out / "after").write_text("end_process returned")
"""


def test_a_rank_ends_as_a_normal_exit_would_without_the_teardown(tmp_path):
    """end_process: the status given, other threads joined (an idle thread pool's workers told to
    stop first, or the join waits forever), atexit handlers run, buffered output written; nothing
    after it runs."""
    import subprocess
    import sys

    from tests.trainutil import REPO

    script = RANK_END.format(repo=str(REPO), out=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "buffered, not flushed"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    assert not (tmp_path / "after").exists()


@pytest.mark.dist
def test_rank_logs_and_console(tmp_path):
    out = run_train(tmp_path, "two", "train.max_steps=3", "launch.procs_per_node=2", "parallel.zero_stage=1",
                    "parallel.micro_batch=4")
    assert out.returncode == 0, out.stderr[-3000:]
    logs = tmp_path / "runs" / "two" / "logs"
    assert (logs / "rank1.log").exists() and not (logs / "rank0.log").exists()
    assert out.stdout.count("run directory:") == 1  # only rank 0 prints the summary
    assert (logs / "rank0.exit").read_text().split()[0] == "0"
    assert (logs / "rank1.exit").read_text().split()[0] == "0"


@pytest.mark.dist
def test_a_dying_rank_stops_the_job_and_is_named(tmp_path):
    t0 = time.time()
    out = run_train(tmp_path, "dies", "train.max_steps=200", "launch.procs_per_node=2", "parallel.zero_stage=1",
                    "parallel.micro_batch=4", "launch.timeout_s=60", timeout=240,
                    RECIPES_FAULT_KILL_AFTER_STEP="3", RECIPES_FAULT_RANK="1")
    elapsed = time.time() - t0
    assert out.returncode != 0
    assert "rank 1 died" in out.stderr, out.stderr[-2000:]
    assert elapsed < 120, f"the surviving rank took {elapsed:.0f}s to stop"
