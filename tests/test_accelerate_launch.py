"""`accelerate launch` starts a recipe's ranks as well as the deepspeed launcher does.

The recipe stays the one source of the DeepSpeed config; accelerate only starts the processes
(`--multi_gpu` runs torchrun, which sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; on a
machine without GPUs the ranks use gloo on CPU). See docs/launchers.md.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.multiproc import adopt_launcher_env
from tests.trainutil import REPO, env, metrics, run_train, train_cmd

ZERO1 = ["train.max_steps=4", "parallel.micro_batch=4", "train.eval_every=2"]
RECIPE = "gpt-tiny-zero1"  # 2 processes, ZeRO-1

# The command documented in docs/launchers.md, before `-m launch train RECIPE ...`.
ACCELERATE = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "0"]


def accelerate_exe() -> str:
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("accelerate is not installed")
    return exe


def test_documented_command_is_the_tested_one():
    text = (REPO / "docs" / "launchers.md").read_text()
    assert "accelerate " + " ".join(ACCELERATE) + " -m launch train" in text


def test_torchrun_local_world_size_becomes_deepspeeds_local_size():
    e = {"LOCAL_WORLD_SIZE": "2"}
    adopt_launcher_env(e)
    assert e["LOCAL_SIZE"] == "2"
    e = {"LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "4"}  # set by our launcher: kept
    adopt_launcher_env(e)
    assert e["LOCAL_SIZE"] == "4"


@pytest.mark.dist
def test_accelerate_launch_logs_the_deepspeed_launchers_losses(tmp_path):
    ds = run_train(tmp_path, "ds", *ZERO1, recipe=RECIPE)
    assert ds.returncode == 0, ds.stderr[-3000:]

    cmd = train_cmd(tmp_path, "acc", *ZERO1, recipe=RECIPE)
    assert cmd[1:3] == ["-m", "launch"]
    cmd = [accelerate_exe(), *ACCELERATE, *cmd[1:]]
    acc = subprocess.run(cmd, cwd=tmp_path, env=env(HF_HOME=str(tmp_path / "hf-home")), capture_output=True,
                         text=True, timeout=300)
    assert acc.returncode == 0, acc.stderr[-3000:]
    assert "not passed to `accelerate launch`" not in acc.stderr  # every default is given on the line
    assert acc.stdout.count("run directory:") == 1  # rank 0 owns the console
    assert "world: 2 (dp=2 tp=1 pp=1 zero=1)" in acc.stdout
    logs = tmp_path / "runs" / "acc" / "logs"
    assert (logs / "rank1.log").exists() and (logs / "rank1.exit").read_text().split()[0] == "0"

    rows = {name: [r for r in metrics(tmp_path, name) if "loss" in r or "val_loss" in r] for name in ("ds", "acc")}
    assert [r["step"] for r in rows["acc"]] == [r["step"] for r in rows["ds"]]
    for a, d in zip(rows["acc"], rows["ds"], strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in d:
                assert a[key] == pytest.approx(d[key], rel=1e-6, abs=0), (key, a["step"])
