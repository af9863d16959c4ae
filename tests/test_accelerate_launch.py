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

from launch.multiproc import adopt_launcher_env, check_accelerate_env
from tests.trainutil import REPO, env, metrics, run_train, train_cmd
from trainer.errors import UsageError
from trainer.recipe import load_recipe

ZERO1 = ["train.max_steps=4", "parallel.micro_batch=4", "train.eval_every=2"]
RECIPE = "gpt-tiny-zero1"  # 2 processes, ZeRO-1

# The command documented in docs/launchers.md, before `-m launch train RECIPE ...`.
ACCELERATE = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "0"]

# The `deepspeed` runner's options in docs/launchers.md, before `-m launch train RECIPE ...`.
DEEPSPEED = ["--num_gpus", "2", "--no_local_rank"]


def accelerate_exe() -> str:
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("accelerate is not installed")
    return exe


def test_documented_command_is_the_tested_one():
    text = (REPO / "docs" / "launchers.md").read_text()
    assert "accelerate " + " ".join(ACCELERATE) + " -m launch train" in text
    assert "deepspeed " + " ".join(DEEPSPEED) + " --module launch train" in text


def test_torchrun_local_world_size_becomes_deepspeeds_local_size():
    e = {"LOCAL_WORLD_SIZE": "2"}
    adopt_launcher_env(e)
    assert e["LOCAL_SIZE"] == "2"
    e = {"LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "4"}  # set by our launcher: kept
    adopt_launcher_env(e)
    assert e["LOCAL_SIZE"] == "4"


# What accelerate's launcher puts in each rank's environment (accelerate/utils/launch.py) for the
# documented command, and for options whose settings this project would not apply.
DOCUMENTED_ENV = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


@pytest.mark.parametrize("extra, precision, refused", [
    ({}, "auto", None),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16", None),  # the same as the recipe's: nothing ignored
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "auto", "--use_deepspeed"),
    ({"ACCELERATE_USE_FSDP": "true"}, "auto", "--use_fsdp"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "fp32", "--mixed_precision bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "auto", "--mixed_precision fp16"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "auto", "--dynamo_backend inductor"),
])
def test_accelerate_settings_the_recipe_does_not_say_are_refused(extra, precision, refused):
    recipe = load_recipe(RECIPE, [f"train.precision={precision}"])
    environ = {**DOCUMENTED_ENV, **extra}
    if refused is None:
        check_accelerate_env(recipe, environ)
        return
    with pytest.raises(UsageError, match=f"^accelerate launch {refused} ") as err:
        check_accelerate_env(recipe, environ)
    assert "\n" not in str(err.value)


def test_a_rank_refuses_accelerates_deepspeed_settings_in_one_line(tmp_path):
    """A rank as `accelerate launch --use_deepspeed` starts it: exit 2 and one line, before any
    process group or data (the whole run: docs/launchers.md)."""
    rank_env = {**env(ACCELERATE_USE_DEEPSPEED="true", **DOCUMENTED_ENV),  # env() drops rank variables: set after
                "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    out = subprocess.run(train_cmd(tmp_path, "refused", recipe=RECIPE), cwd=tmp_path, env=rank_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: accelerate launch --use_deepspeed "), out.stderr
    assert not (tmp_path / "runs" / "refused").exists() and not (tmp_path / "cache").exists()


@pytest.mark.dist
def test_accelerate_launch_and_the_deepspeed_runner_log_our_launchers_losses(tmp_path):
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

    # DeepSpeed's own runner by hand (docs/launchers.md): on one node our supervisor starts its own per-node
    # launcher (launch/node.py), so this is the path an ssh multi-node job takes through the runner
    runner = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    cmd = [runner, *DEEPSPEED, "--module", *train_cmd(tmp_path, "runner", *ZERO1, recipe=RECIPE)[2:]]
    by_hand = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert "world: 2 (dp=2 tp=1 pp=1 zero=1)" in by_hand.stdout

    runs = ("ds", "acc", "runner")
    rows = {name: [r for r in metrics(tmp_path, name) if "loss" in r or "val_loss" in r] for name in runs}
    for other in ("acc", "runner"):
        assert [r["step"] for r in rows[other]] == [r["step"] for r in rows["ds"]]
        for a, d in zip(rows[other], rows["ds"], strict=True):
            for key in ("loss", "val_loss", "grad_norm"):
                if key in d:
                    assert a[key] == pytest.approx(d[key], rel=1e-6, abs=0), (other, key, a["step"])
