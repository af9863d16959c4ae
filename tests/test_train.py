"""End-to-end runs of the training loop through the real command line."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from tests.trainutil import env, metrics, run_train, train_cmd, train_losses


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def test_short_run_learns_and_writes_outputs(root):
    out = run_train(root, "basic", "train.max_steps=30", "train.checkpoint_every=10", "tracking.wandb=offline")
    assert out.returncode == 0, out.stderr[-3000:]
    run = root / "runs" / "basic"
    rows = metrics(root, "basic")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for r in steps:
        assert {"step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= r.keys()
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.5, (first, last)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20, 25, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # warm-up then cosine decay, peak at the end of warm-up
    lrs = [r["lr"] for r in steps]
    assert lrs[0] < lrs[1] and max(lrs) == pytest.approx(lrs[1]) and lrs[-1] < lrs[5]
    for name in ("config.yaml", "ds_config.json", "loss.png", "summary.json", "tokenizer.json", "samples.txt"):
        assert (run / name).exists(), name
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["zero_optimization"]["stage"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert 0 < summary["val_bpb"] < 8 and 0 < summary["gzip_bpb"] < 8
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000020", "step_00000030"]  # train.keep_checkpoints=2
    assert list(run.glob("wandb/offline-run-*")), "W&B offline run files are missing"
    assert "run directory:" in out.stdout and "bits per byte" in out.stdout and "sample:" in out.stdout


def test_exact_resume_after_sigkill(root):
    ref = run_train(root, "ref", "train.max_steps=12", "train.checkpoint_every=4", "model.dropout=0.1")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_train(root, "killed", "train.max_steps=12", "train.checkpoint_every=4", "model.dropout=0.1",
                       RECIPES_FAULT_KILL_AFTER_STEP="8")
    assert killed.returncode == -signal.SIGKILL
    assert max(train_losses(root, "killed")) == 8
    resumed = run_train(root, "killed", "train.max_steps=12", "train.checkpoint_every=4", "model.dropout=0.1",
                        "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = train_losses(root, "ref"), train_losses(root, "killed")
    assert list(b) == list(range(1, 13))
    for step in range(9, 13):
        assert a[step] == b[step], f"step {step}: {a[step]!r} != {b[step]!r} (must be bit-identical)"
    va = [r["val_loss"] for r in metrics(root, "ref") if "val_loss" in r]
    vb = [r["val_loss"] for r in metrics(root, "killed") if "val_loss" in r]
    assert va == vb
    # Resuming a finished run at its own max_steps trains nothing: it evaluates, samples, and says so.
    again = run_train(root, "ref", "train.max_steps=12", "train.checkpoint_every=4", "model.dropout=0.1",
                      "train.resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "no training step in this run" in again.stdout and "Traceback" not in again.stderr


def test_kill_during_save_keeps_previous_checkpoint(root):
    out = run_train(root, "midsave", "train.max_steps=12", "train.checkpoint_every=4",
                    RECIPES_FAULT_KILL_IN_SAVE="8")
    assert out.returncode == -signal.SIGKILL
    ck = root / "runs" / "midsave" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert (ck / "step_00000008.partial").is_dir() and not (ck / "step_00000008").exists()
    resumed = run_train(root, "midsave", "train.max_steps=12", "train.checkpoint_every=4", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000004" in resumed.stdout
    assert not (ck / "step_00000008.partial").exists()
    assert (ck / "latest").read_text().strip() == "step_00000012"


def test_corrupted_checkpoint_is_refused_and_older_one_still_loads(root):
    out = run_train(root, "corrupt", "train.max_steps=8", "train.checkpoint_every=4")
    assert out.returncode == 0, out.stderr[-3000:]
    ck = root / "runs" / "corrupt" / "checkpoints"
    target = ck / "step_00000008" / "model" / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    bad = run_train(root, "corrupt", "train.max_steps=10", "train.resume=auto")
    assert bad.returncode == 2
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "corrupted" in err[0] and "mp_rank_00_model_states.pt" in err[0], bad.stderr
    assert "train.resume=" in err[0] and "step_00000004" in err[0]
    good = run_train(root, "corrupt", "train.max_steps=10", f"train.resume={ck / 'step_00000004'}")
    assert good.returncode == 0, good.stderr[-3000:]
    assert "resumed from step_00000004" in good.stdout


def test_tokenizer_mismatch_on_resume_is_refused(root):
    out = run_train(root, "tokmis", "train.max_steps=4")
    assert out.returncode == 0, out.stderr[-3000:]
    bad = run_train(root, "tokmis", "train.max_steps=6", "train.resume=auto", "data.vocab_size=600")
    assert bad.returncode == 2
    assert "different tokenizer" in bad.stderr and "Traceback" not in bad.stderr


def test_nan_loss_is_skipped_and_counted(root):
    out = run_train(root, "nanskip", "train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=10",
                    RECIPES_FAULT_NAN_STEPS="3,4")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["step"]: r for r in metrics(root, "nanskip") if "skipped_steps" in r}
    assert rows[3]["loss"] is None and rows[4]["loss"] is None
    assert rows[8]["skipped_steps"] == 2 and rows[2]["skipped_steps"] == 0
    assert all(r["loss"] is not None for s, r in rows.items() if s not in (3, 4))
    # the skipped updates left weights and Adam moments exactly as they were after step 2
    ck = root / "runs" / "nanskip" / "checkpoints"
    w2, w4, w6 = (_model_and_optimizer(ck / f"step_0000000{s}") for s in (2, 4, 6))
    for a, b in zip(w2, w4):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(w2, w6))


def _model_and_optimizer(folder):
    states = torch.load(folder / "model" / "mp_rank_00_model_states.pt", weights_only=False)
    tensors = list(states["module"].values())
    for st in states["optimizer"]["state"].values():
        tensors += [st["exp_avg"], st["exp_avg_sq"]]
    return tensors


def test_nan_loss_stops_after_max_consecutive(root):
    out = run_train(root, "nanstop", "train.max_steps=10", "train.max_nan_steps=2",
                    RECIPES_FAULT_NAN_STEPS="3,4,5")
    assert out.returncode == 3
    assert "2 consecutive non-finite losses up to step 4" in out.stderr
    out = run_train(root, "nanstop2", "train.max_steps=10", "train.nan_policy=stop", RECIPES_FAULT_NAN_STEPS="2")
    assert out.returncode == 3 and "train.nan_policy=stop" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_then_exits(root, sig):
    name = f"sig{sig.value}"
    proc = subprocess.Popen(train_cmd(root, name, "train.max_steps=100000", "train.log_every=1"), cwd=root,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mpath = root / "runs" / name / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (mpath.exists() and mpath.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, err[-2000:]
    assert f"{sig.name} received: saved checkpoint" in err
    ck = root / "runs" / name / "checkpoints"
    step = int((ck / "latest").read_text().strip().split("_")[1])
    assert step >= 3 and max(train_losses(root, name)) == step


def test_bf16_mixed_precision_run_learns(root):
    out = run_train(root, "bf16", "train.max_steps=20", "train.precision=bf16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "precision: bf16" in out.stdout
    losses = train_losses(root, "bf16")
    assert losses[20] < losses[1] - 0.3


def test_fused_and_torch_kernels_train_alike_and_share_checkpoints(root):
    fused = run_train(root, "k-fused", "train.max_steps=8", "model.kernels=fused", "train.checkpoint_every=4")
    assert fused.returncode == 0, fused.stderr[-3000:]
    assert "kernels: fused" in fused.stdout
    torch_ = run_train(root, "k-torch", "train.max_steps=8", "model.kernels=torch")
    assert torch_.returncode == 0, torch_.stderr[-3000:]
    a, b = train_losses(root, "k-fused"), train_losses(root, "k-torch")
    for step in range(1, 9):
        assert a[step] == pytest.approx(b[step], rel=1e-4), step
    # a checkpoint written with fused kernels resumes with the references (same parameters)
    ck = root / "runs" / "k-fused" / "checkpoints" / "step_00000004"
    resumed = run_train(root, "k-mixed", "train.max_steps=8", "model.kernels=torch", f"train.resume={ck}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = train_losses(root, "k-mixed")
    for step in range(5, 9):
        assert c[step] == pytest.approx(a[step], rel=1e-4), step


def test_compile_trains_like_eager_and_its_checkpoint_loads_without_compile(root):
    """train.compile=true: the same losses as eager (float32, fused kernels), a checkpoint with the
    same keys that an eager run resumes from."""
    # train.peak_tflops: a given MFU ceiling, no sgemm measurement at each run's start and end (not checked here)
    eager = run_train(root, "c-eager", "train.max_steps=4", "model.kernels=fused", "train.checkpoint_every=2",
                      "train.peak_tflops=1")
    assert eager.returncode == 0, eager.stderr[-3000:]
    comp = run_train(root, "c-comp", "train.max_steps=4", "model.kernels=fused", "train.checkpoint_every=2",
                     "train.compile=true", "train.peak_tflops=1")
    assert comp.returncode == 0, comp.stderr[-3000:]
    assert "compile: the model's forward runs under torch.compile" in comp.stdout
    a, b = train_losses(root, "c-eager"), train_losses(root, "c-comp")
    assert sorted(b) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert abs(b[step] - a[step]) <= 1e-4, (step, a[step], b[step])
    ck = root / "runs" / "c-comp" / "checkpoints" / "step_00000002"
    keys = [set(torch.load(root / "runs" / n / "checkpoints" / "step_00000002" / "model" / "mp_rank_00_model_states.pt",
                           weights_only=False)["module"]) for n in ("c-eager", "c-comp")]
    assert keys[0] == keys[1]
    resumed = run_train(root, "c-resumed", "train.max_steps=4", "model.kernels=fused", f"train.resume={ck}",
                        "train.peak_tflops=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = train_losses(root, "c-resumed")
    for step in (3, 4):
        assert abs(c[step] - b[step]) <= 1e-4, (step, b[step], c[step])


@pytest.mark.parametrize("override, fragment", [("parallel.pp=2", "parallel.pp=2"),
                                                ("parallel.zero_stage=3", "parallel.zero_stage=3")])
def test_compile_refuses_pipeline_and_zero3(override, fragment):
    from trainer.recipe import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=f"train.compile=true cannot be combined with {fragment}"):
        load_recipe("gpt-tiny", ["train.compile=true", override])
    load_recipe("gpt-tiny", [override])  # fine without compile


@pytest.mark.parametrize("make_path, fragment", [
    (lambda tmp: tmp / "does-not-exist", "does-not-exist"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "empty"),
])
def test_bad_data_path_is_one_line_exit_2(tmp_path, make_path, fragment):
    path = make_path(tmp_path)
    out = run_train(tmp_path, "baddata", "train.max_steps=2", f"data.path={path}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr
    assert not (tmp_path / "runs" / "baddata" / "checkpoints").exists()
