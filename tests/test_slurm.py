"""`python -m launch slurm`: the rendered sbatch script, the per-node launcher, and real jobs on a
one-node Slurm cluster started on loopback by tests/slurm_cluster.py, plus a two-node job on two
slurmd in network namespaces of this machine. The cluster tests are skipped, with the reason, when
slurm-wlm and munge are not installed or this is not root (and the two-node one when network
namespaces cannot be made here)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch import cli
from launch.multiproc import NodeLayout, node_launch_command, slurm_gpu_ids, slurm_layout
from launch.slurm import render, time_limit_seconds
from tests.slurm_cluster import SlurmCluster, netns_unavailable_reason, unavailable_reason
from tests.trainutil import REPO, TINY, env, metrics, train_cmd, train_losses
from trainer.recipe import ConfigError, load_recipe

# Two CPU ranks (data parallel) on one node. 120 steps take 5-15 s: long enough to interrupt mid-run.
TWO_PROCS = ["launch.procs_per_node=2", "parallel.zero_stage=0", "parallel.micro_batch=4", "train.eval_every=50"]
STEPS = 120


def slurm_cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "launch", "slurm", *argv]


# ---- the rendered script (no Slurm needed) -------------------------------------------------------
def test_dry_run_renders_the_script_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["slurm", "gpt-tiny", "train.max_steps=10", "run.name=dry", "--nodes", "2",
                     "--gpus-per-node", "4", "--partition", "gpu", "--time", "12:00:00", "--account", "acme",
                     "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    for line in ("#SBATCH --job-name=dry", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00",
                 "#SBATCH --account=acme", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={tmp_path}/runs/dry/slurm/%j.out",
                 f"#SBATCH --chdir={tmp_path}"):
        assert line in out.splitlines(), line
    assert "#SBATCH --cpus-per-task" not in out  # unset: left out
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    launch_line = out[out.index(srun):].split("&\n")[0]
    assert "-m launch train gpt-tiny tracking.group=slurm-$SLURM_JOB_ID train.max_steps=10 run.name=dry" in launch_line
    # the flags became launch.* overrides, so the job trains the recipe validated here (4 ranks/node)
    for o in ("launch.nodes=2", "launch.gpus_per_node=4", "launch.procs_per_node=4", "'launch.time=\"12:00:00\"'"):
        assert o in launch_line, o
    assert "$RESUME" in launch_line and 'if [ "$RESTART" -gt 0 ]; then RESUME=train.resume=auto; fi' in out
    assert "LAUNCH_MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in out
    assert 'LAUNCH_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in out
    assert "trap on_warning USR1" in out and 'kill -USR1 "$srun_pid"' in out
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out and "REQUEUE=1" in out
    syntax = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_render_options_from_the_launch_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ["launch.requeue=false", "launch.signal_seconds=120", "launch.cpus_per_task=16",
                 "launch.slurm_extra=[--exclusive, --qos=high]",
                 "launch.setup=['module load cuda/12.4', 'source /opt/venv/bin/activate']"]
    recipe = load_recipe("gpt-tiny", overrides)
    text = render(recipe, "gpt-tiny", overrides, python="/opt/venv/bin/python")
    lines = text.splitlines()
    for line in ("#SBATCH --no-requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --exclusive", "#SBATCH --qos=high", "module load cuda/12.4",
                 "source /opt/venv/bin/activate", "REQUEUE=0", "PYTHON=/opt/venv/bin/python"):
        assert line in lines, line
    for absent in ("--gpus-per-node", "--partition", "--time", "--account", "#SBATCH --requeue"):
        assert not any(ln.startswith("#SBATCH " + absent) for ln in lines), absent
    # the exclusive/qos lines belong to the #SBATCH block (sbatch stops reading at the first command)
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert lines.index("#SBATCH --qos=high") < first_command
    # a recipe given as a file path is made absolute for the job
    custom = tmp_path / "mine.yaml"
    custom.write_text("defaults: [model/gpt-tiny, data/stdlib, optim/adamw-cosine, parallel/single, run/default]\n")
    text = render(load_recipe(str(custom.name)), "mine.yaml", [])
    assert f"-m launch train {custom}" in text


@pytest.mark.parametrize("overrides, flags, message", [
    (["train.max_stepz=3"], [], "unknown key 'train.max_stepz'"),
    ([], ["--nodes", "0"], "launch.nodes"),
    ([], ["--time", "1:2:3:4"], "launch.time"),
    (["launch.time=12:00:00"], [], "quote the time limit"),
    ([], ["--time", "00:04:00"], "launch.signal_seconds=300 must be shorter than the time limit"),
    (["launch.procs_per_node=2"], ["--gpus-per-node", "4"], "must equal launch.gpus_per_node=4"),
    (["launch.backend=nccl"], [], "launch.backend=nccl needs GPU nodes"),
    (["launch.slurm_extra=[exclusive]"], [], "must be one sbatch option"),
    (["launch.procs_per_node=3", "parallel.tp=2"], [], "not divisible"),
])
def test_config_errors_are_one_line_and_exit_2(overrides, flags, message, capsys):
    code = cli.main(["slurm", "gpt-tiny", *overrides, *flags, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_missing_sbatch_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code = cli.main(["slurm", "gpt-tiny", "run.name=nosbatch"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "sbatch not found" in err, err
    assert not (tmp_path / "runs").exists()


def test_time_limits():
    assert time_limit_seconds("90") == 90 * 60
    assert time_limit_seconds("10:30") == 630
    assert time_limit_seconds("12:00:00") == 43200
    assert time_limit_seconds("2-00") == 172800
    assert time_limit_seconds("1-02:03") == 86400 + 2 * 3600 + 180
    assert time_limit_seconds("1-02:03:04") == 86400 + 2 * 3600 + 184
    assert time_limit_seconds("UNLIMITED") is None
    with pytest.raises(ConfigError):
        time_limit_seconds("soon")


# ---- the per-node launcher inside a job step -----------------------------------------------------
def test_slurm_layout_from_the_job_step_environment(tmp_path):
    recipe = load_recipe("gpt-tiny", ["launch.nodes=3", "launch.procs_per_node=2"])
    step = {"LAUNCH_MASTER_ADDR": "node-a", "LAUNCH_MASTER_PORT": "20042", "SLURM_NODEID": "2",
            "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_NUM_TASKS": "3"}
    assert slurm_layout(recipe, {}) is None  # not in a job from launch/slurm.py: the plain local launch
    layout = slurm_layout(recipe, step)
    assert layout == NodeLayout(node_rank=2, nodes=3, master_addr="node-a", master_port=20042)
    with pytest.raises(ConfigError, match="launch.nodes=3 but this Slurm job step has 2 node"):
        slurm_layout(recipe, {**step, "SLURM_STEP_NUM_NODES": "2"})
    with pytest.raises(ConfigError, match="one task per node"):
        slurm_layout(recipe, {**step, "SLURM_STEP_NUM_TASKS": "6"})
    cmd = node_launch_command("gpt-tiny", [], {f"node{i}": [0, 1] for i in range(3)}, layout.node_rank,
                              layout.master_addr, layout.master_port)
    opts = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    assert (opts["node_rank"], opts["master_port"], opts["master_addr"]) == ("2", "20042", "node-a")
    # DeepSpeed's runner, given a hostfile of the 3 nodes and --no_ssh, builds the same world_info
    from deepspeed.launcher.runner import encode_world_info, parse_inclusion_exclusion

    hosts = {"node0": 2, "node1": 2, "node2": 2}
    assert opts["world_info"] == encode_world_info(parse_inclusion_exclusion(hosts, "", ""))


def test_gpu_node_keeps_the_gpus_slurm_gave_the_task():
    recipe = load_recipe("gpt-tiny", ["launch.nodes=2", "launch.procs_per_node=2", "launch.gpus_per_node=2"])
    assert slurm_gpu_ids(recipe, {"CUDA_VISIBLE_DEVICES": "2,3"}) == [2, 3]
    assert slurm_gpu_ids(recipe, {"CUDA_VISIBLE_DEVICES": "GPU-1c2d,GPU-77aa"}) is None  # UUIDs: leave them
    assert slurm_gpu_ids(recipe, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) is None  # not one per process
    assert slurm_gpu_ids(load_recipe("gpt-tiny", ["launch.procs_per_node=2"]), {"CUDA_VISIBLE_DEVICES": "2,3"}) is None
    # the world_info the supervisor gives the per-node launcher for those GPUs: DeepSpeed's runner's, from
    # a hostfile of the 2 nodes and --include node0:2,3@node1:2,3
    from deepspeed.launcher.runner import encode_world_info, parse_inclusion_exclusion

    runner = encode_world_info(parse_inclusion_exclusion({"node0": 4, "node1": 4}, "node0:2,3@node1:2,3", ""))
    cmd = node_launch_command("gpt-tiny", [], {"node0": [2, 3], "node1": [2, 3]}, 1, "n0", 20001)
    assert f"--world_info={runner}" in cmd


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_to_the_supervisor_checkpoints_every_rank(tmp_path, sig):
    """The supervisor (`python -m launch train` with 2 ranks) passes SIGUSR1/SIGTERM to the ranks, not
    to the per-node launcher. SIGUSR1 is sent as soon as rank 1 exists: the ranks ignore it until their
    training loop has its handler, and get it then. SIGTERM is sent mid-run. Either way the ranks
    save a checkpoint together and the run exits with 128 + the signal."""
    name = sig.name.lower()
    proc = subprocess.Popen(train_cmd(tmp_path, name, *TWO_PROCS, f"train.max_steps={STEPS}"), cwd=tmp_path,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = (lambda: (tmp_path / "runs" / name / "logs" / "rank1.pid").exists()) if sig == signal.SIGUSR1 else (
        lambda: (tmp_path / "runs" / name / "metrics.jsonl").exists()
        and (tmp_path / "runs" / name / "metrics.jsonl").read_text().count("\n") >= 3)
    deadline = time.time() + 120
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + sig, err[-3000:]
    # (a rank that had not seen the signal yet when the ranks agreed to stop names SIGTERM)
    assert re.search(r"SIG(USR1|TERM) received: saved checkpoint", err) and "error:" not in err, err[-3000:]
    ck = tmp_path / "runs" / name / "checkpoints"
    step = int((ck / "latest").read_text().strip().split("_")[1])
    assert 1 <= step < STEPS and max(train_losses(tmp_path, name)) == step
    logs = tmp_path / "runs" / name / "logs"
    codes = {(logs / f"rank{r}.exit").read_text().split()[0] for r in (0, 1)}
    assert codes <= {"138", "143"} and str(128 + sig) in codes, codes


# ---- real jobs on a local cluster ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(_cluster_dir(tmp_path_factory, "slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _cluster_dir(tmp_path_factory, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    if len(str(root)) > 60:  # munged's socket path must fit in sun_path (108 bytes)
        import tempfile

        root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("slurmruns")


@pytest.fixture(scope="module")
def reference(root, cluster):
    """The uninterrupted run with plain `python -m launch train`, started at once in the background."""
    proc = subprocess.Popen(train_cmd(root, "reference", *TWO_PROCS, f"train.max_steps={STEPS}"), cwd=root,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    box: dict = {}

    def losses() -> dict[int, float]:
        if "losses" not in box:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            box["losses"] = train_losses(root, "reference")
            assert sorted(box["losses"]) == list(range(1, STEPS + 1))
        return box["losses"]

    yield losses
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def submit(cluster: SlurmCluster, root: Path, name: str, *extra: str) -> tuple[int, str]:
    """`python -m launch slurm` through the real command line; the job id and its stdout."""
    overrides = [*TINY, *TWO_PROCS, f"run.name={name}", f"run.output_dir={root}/runs",
                 f"data.cache_dir={root}/cache", f"train.max_steps={STEPS}", *extra]
    out = subprocess.run(slurm_cli("gpt-tiny", *overrides, "--time", "00:30:00"), cwd=root,
                         env=cluster.env(env()), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    m = re.search(r"submitted job (\d+)", out.stdout)
    assert m, out.stdout
    return int(m.group(1)), out.stdout


def finished(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def slurm_log(root: Path, name: str, job_id: int) -> str:
    path = root / "runs" / name / "slurm" / f"{job_id}.out"
    return path.read_text() if path.exists() else f"(no Slurm log at {path})"


@pytest.mark.slurm
def test_job_trains_two_ranks_like_a_local_run(cluster, root, reference):
    t0 = time.time()
    job_id, stdout = submit(cluster, root, "job")
    run = root / "runs" / "job"
    assert f"{run}/slurm/{job_id}.out" in stdout and f"{run}/logs" in stdout
    assert (run / "slurm" / "job.sbatch").read_text().startswith("#!/bin/bash")
    info = cluster.wait_job(job_id, finished, timeout=240)
    log = slurm_log(root, "job", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert f"rendezvous localhost:{20000 + job_id % 20000}" in log
    assert "run directory:" in log and "training exited with status 0" in log
    # the same losses as the plain multi-process launch, step for step
    assert train_losses(root, "job") == reference()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    logs = run / "logs"
    assert (logs / "rank1.log").exists() and not (logs / "rank0.log").exists()
    assert [(logs / f"rank{r}.exit").read_text().split()[0] for r in (0, 1)] == ["0", "0"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["tracking"]["group"] == f"slurm-{job_id}" and config["launch"]["time"] == "00:30:00"
    print(f"slurm job: {time.time() - t0:.0f}s")


@pytest.mark.slurm
def test_warning_signal_checkpoints_requeues_and_continues_exactly(cluster, root, reference):
    t0 = time.time()
    job_id, _ = submit(cluster, root, "preempted")
    mpath = root / "runs" / "preempted" / "metrics.jsonl"

    def steps_done() -> int:
        try:
            return max((r["step"] for r in metrics(root, "preempted") if "loss" in r), default=0)
        except (FileNotFoundError, ValueError):  # not written yet / a line being written
            return 0

    deadline = time.time() + 180
    while time.time() < deadline and steps_done() < 10:
        assert not finished(cluster.job(job_id)), slurm_log(root, "preempted", job_id)[-3000:]
        time.sleep(0.1)
    assert mpath.exists(), slurm_log(root, "preempted", job_id)[-3000:]
    # What Slurm does `launch.signal_seconds` before the time limit (--signal=B:USR1@...)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    info = cluster.wait_job(job_id, lambda i: int(i.get("Restarts", 0)) >= 1, timeout=120)
    info = cluster.wait_job(job_id, finished, timeout=240)
    log = slurm_log(root, "preempted", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-4000:]
    first, _, second = log.partition(f"job {job_id} restart 1 ")
    assert second, log[-4000:]
    m = re.search(r"SIG(?:USR1|TERM) received: saved checkpoint \S*step_(\d+) at step (\d+)", first)
    assert m and "training exited with status 138" in first and "requeueing job" in first, first[-4000:]
    saved = int(m.group(2))
    assert 10 <= saved < STEPS
    assert f"resumed from step_{saved:08d}" in second and "training exited with status 0" in second, second[-3000:]
    # The history reads as one run, and every loss (before and after the requeue) is bit-identical
    # to the uninterrupted reference.
    losses = train_losses(root, "preempted")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference()
    assert (root / "runs" / "preempted" / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    print(f"interrupted at step {saved}; requeued slurm job: {time.time() - t0:.0f}s")


# ---- two nodes: two slurmd in network namespaces on this machine ----------------------------------
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, cluster):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(_cluster_dir(tmp_path_factory, "slurm2"), cluster_name="recipes2", netns_nodes=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.mark.slurm
def test_two_node_job_one_rank_per_node(two_nodes, root, reference):
    """nodes=2 x procs_per_node=1: each node's launcher starts its one rank without ssh, they meet at
    node0 over the (virtual) network, and train exactly like two ranks on one node."""
    t0 = time.time()
    job_id, _ = submit(two_nodes, root, "twonodes", "launch.procs_per_node=1", "--nodes", "2")
    info = two_nodes.wait_job(job_id, finished, timeout=240)
    log = slurm_log(root, "twonodes", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["NodeList"] == "node[0-1]" and f"rendezvous node0:{20000 + job_id % 20000}" in log
    assert train_losses(root, "twonodes") == reference()
    logs = root / "runs" / "twonodes" / "logs"
    assert [(logs / f"rank{r}.exit").read_text().split()[0] for r in (0, 1)] == ["0", "0"]
    assert (logs / "rank1.log").exists()
    print(f"two-node slurm job: {time.time() - t0:.0f}s")


HYBRID = ["sync.strategy=hybrid", "sync.across=diloco", "sync.every=2", "train.max_steps=6",
          "parallel.micro_batch=2", "train.peak_tflops=1"]  # a given MFU ceiling: no sgemm measurement per rank


@pytest.mark.slurm
def test_hybrid_runs_one_replica_per_node(two_nodes, root):
    """sync.strategy=hybrid on 2 nodes x 2 ranks with sync.replicas unset: one replica per node
    (DeepSpeed's all-reduce inside the node, DiLoCo across nodes), exactly as the same 2 x 2 layout
    launched on one machine with sync.replicas=2."""
    local = subprocess.run(train_cmd(root, "hybrid-local", *TINY, "launch.procs_per_node=4", *HYBRID,
                                     "sync.replicas=2"), cwd=root, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    job_id, _ = submit(two_nodes, root, "hybrid", "launch.procs_per_node=2", *HYBRID, "--nodes", "2")
    info = two_nodes.wait_job(job_id, finished, timeout=400)
    log = slurm_log(root, "hybrid", job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert train_losses(root, "hybrid") == train_losses(root, "hybrid-local")
    rows = [json.loads(x) for x in (root / "runs" / "hybrid" / "metrics.jsonl").read_text().splitlines()]
    assert [r["consensus_dist"] for r in rows if r.get("step") in (2, 4, 6) and "consensus_dist" in r] == [0.0] * 3


# ---- .ci/run, run for real with stub programs ------------------------------------------------------
SLURM_PROGRAMS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "slurmctld", "slurmd", "munged", "mungekey")


def _stub(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text("#!/bin/sh\n" + body + "\n")
    (folder / name).chmod(0o755)


def _run_ci(tmp_path: Path, apt_get: str, slurm_present: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    """A copy of .ci/run in an empty checkout with stubs first on PATH: `make` writes make.log,
    `id -u` says root, `apt-get` appends its arguments to apt.log and runs `apt_get`; the Slurm
    programs are stubs made here (slurm_present) or by that apt-get."""
    # PATH is the stubs and links to the few tools the script uses, so a Slurm installed here is not
    # seen; the script itself adds /usr/sbin:/sbin, where Debian's slurm-wlm puts only the daemons.
    if all(shutil.which(b, path="/usr/sbin:/sbin") for b in SLURM_PROGRAMS):
        pytest.skip("every Slurm program is in /usr/sbin or /sbin here: .ci/run would find them whatever the stubs do")
    checkout, stubs, tools = tmp_path / "checkout", tmp_path / "stubs", tmp_path / "tools"
    (checkout / ".ci").mkdir(parents=True)
    stubs.mkdir()
    tools.mkdir()
    for tool in ("dirname", "mktemp", "grep", "tail", "rm", "chmod"):
        (tools / tool).symlink_to(shutil.which(tool))
    shutil.copy(REPO / ".ci" / "run", checkout / ".ci" / "run")
    # make's line: its arguments | the skip reason it was given | where it ran | whether sbatch was there
    _stub(stubs, "make", f'echo "$*|${{RECIPES_SLURM_UNAVAILABLE-unset}}|$PWD|$(command -v sbatch || echo none)"'
                         f' > {tmp_path}/make.log')
    _stub(stubs, "id", "echo 0")
    _stub(stubs, "apt-get", f'echo "$*" >> {tmp_path}/apt.log\n{apt_get}')
    for name in SLURM_PROGRAMS if slurm_present else ():
        _stub(stubs, name, "exit 0")
    out = subprocess.run([shutil.which("bash"), str(checkout / ".ci" / "run")], env={"PATH": f"{stubs}:{tools}"},
                         capture_output=True, text=True, timeout=60)
    return out, checkout


def test_ci_says_why_the_slurm_tests_skip_when_apt_get_fails(tmp_path, monkeypatch):
    out, checkout = _run_ci(tmp_path, 'echo "E: Unable to locate package slurm-wlm"; exit 100')
    assert out.returncode == 0, out.stderr
    reason = "CI could not install slurm-wlm and munge (apt-get failed: E: Unable to locate package slurm-wlm)"
    assert (tmp_path / "make.log").read_text() == f"test|{reason}|{checkout}|none\n"
    assert f"warning: {reason}; the Slurm tests will be skipped" in out.stderr
    monkeypatch.setenv("RECIPES_SLURM_UNAVAILABLE", reason)
    assert unavailable_reason() == reason  # what the Slurm tests' skip line says


def test_ci_installs_slurm_before_make_test(tmp_path):
    stubs = tmp_path / "stubs"
    install = "; ".join(f'printf "#!/bin/sh\\n" > {stubs}/{b}; chmod +x {stubs}/{b}' for b in SLURM_PROGRAMS)
    out, checkout = _run_ci(tmp_path, f'case "$*" in *install*) {install};; esac')
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update", "install -y slurm-wlm munge"]
    # make test ran after the install, without a skip reason: the Slurm tests run
    assert (tmp_path / "make.log").read_text() == f"test|unset|{checkout}|{stubs}/sbatch\n"


def test_ci_leaves_an_installed_slurm_alone(tmp_path):
    out, checkout = _run_ci(tmp_path, "exit 1", slurm_present=True)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "apt.log").exists()
    assert (tmp_path / "make.log").read_text() == f"test|unset|{checkout}|{tmp_path}/stubs/sbatch\n"

