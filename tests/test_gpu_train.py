"""bench/gpu_train.py and the `train` step of bench/gpu_check.sh: the GPU check's full training run.

The reference is our own loop: a real `python -m launch train` run on CPU in fp32. The plain loop
(run under a Python that hides DeepSpeed, pydantic, PyYAML, tokenizers, NumPy, ..., as on the
lent GPU machine) must log the same per-step losses, gradient norms and validation losses, and
the FLOP count behind its MFU must be the loop's. The script's train step then runs in a CPU
rehearsal both ways: with our loop's modules hidden it says so in one line of the results file and
records the plain loop's bf16 run; with them present it runs our loop and records its summary.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.gpu_machine import NOT_ON_GPU_MACHINE, bare_python_env
from tests.trainutil import REPO, TINY, env, metrics, run_train

STEPS = 8
PLAN = [*TINY, "train.eval_every=4", f"train.max_steps={STEPS}", "train.peak_tflops=null"]  # ceilings measured
HIDDEN = (*NOT_ON_GPU_MACHINE, "numpy")  # the plain loop needs neither NumPy


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A prepared plan (the CLI, as a user makes build/gpu-data) and our loop's fp32 run of it."""
    root = tmp_path_factory.mktemp("gpu_train")
    cache = f"data.cache_dir={root}/cache"
    out = subprocess.run([sys.executable, "bench/gpu_train.py", "prepare", str(root / "plan"), *PLAN, cache],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = run_train(root, "ref", *PLAN)  # trainutil puts TINY and the same cache first
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _plain(root, name, *args, hidden=HIDDEN, timeout=300):
    e = bare_python_env(root / f"site-{name}", hidden)
    return subprocess.run([sys.executable, "bench/gpu_train.py", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_plan_is_the_recipes(root):
    """The plan carries the recipe's resolved model, batch, optimiser and the loop's token streams."""
    from trainer import checkpoint as ckpt
    from trainer.recipe import load_recipe

    plan = json.loads((root / "plan" / "plan.json").read_text())
    meta = ckpt.verify(ckpt.latest_checkpoint(root / "runs" / "ref" / "checkpoints"))  # what the loop trained
    assert plan["model"] == {k: v for k, v in meta["model_config"].items() if k != "extra"}
    assert plan["data"]["cache_key"] == meta["data_cache_key"] and plan["data"]["vocab_size"] == meta["vocab_size"]
    for name in ("train.bin", "val.bin"):  # the loop's own token streams, byte for byte
        assert (root / "plan" / name).read_bytes() == (root / "cache" / meta["data_cache_key"] / name).read_bytes()
    r = load_recipe("gpt-tiny", PLAN)
    assert plan["optim"] == {k: getattr(r.optim, k) for k in plan["optim"]} and len(plan["optim"]) == 9
    assert plan["train"]["max_steps"] == STEPS and plan["parallel"]["micro_batch"] == r.parallel.micro_batch


def test_torch_only_pieces_equal_the_loops():
    """The plain loop's sampler, evaluation sample and schedule against trainer's own."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_train
    finally:
        sys.path.remove(str(REPO / "bench"))
    from trainer.data import ShardedSampler, eval_sample
    from trainer.ds_config import lr_lambda
    from trainer.recipe import load_recipe

    for n, bs, world in ((97, 5, 1), (97, 5, 3), (40, 4, 2)):
        for rank in range(world):
            ours, theirs = gpu_train.Sampler(n, bs, rank, world, 11), ShardedSampler(n, bs, rank, world, 11)
            assert [ours.next_indices() for _ in range(30)] == [theirs.next_indices() for _ in range(30)]
    for n, bs, mb in ((100, 8, 3), (10, 8, 3), (1358, 32, 20), (7, 2, None)):
        assert gpu_train.eval_sample(n, bs, mb) == eval_sample(n, bs, mb).tolist()
    for overrides in (["optim.warmup_steps=30", "train.max_steps=350"], ["optim.schedule=constant"],
                      ["optim.warmup_steps=500", "train.max_steps=100"]):
        r = load_recipe("gpt-tiny", overrides)
        fn = lr_lambda(r)
        plan_optim = {k: getattr(r.optim, k) for k in ("warmup_steps", "schedule", "min_lr_ratio")}
        assert all(gpu_train.lr_multiplier(plan_optim, r.train.max_steps, s) == fn(s)
                   for s in range(r.train.max_steps + 3))


def test_plain_loop_reproduces_our_loop_in_fp32(root):
    out = _plain(root, "fp32", "train", "--plan", str(root / "plan"), "--out", str(root / "fp32"), "--device", "cpu",
                 "--precision", "fp32")
    assert out.returncode == 0, out.stderr[-3000:]
    ours, plain = metrics(root, "ref"), _rows(root / "fp32" / "metrics.jsonl")
    for key, rel in (("loss", 1e-6), ("grad_norm", 1e-5), ("val_loss", 1e-6), ("val_loss_full", 1e-6)):
        a = [(r["step"], r[key]) for r in ours if r.get(key) is not None]
        b = [(r["step"], r[key]) for r in plain if r.get(key) is not None]
        assert [s for s, _ in a] == [s for s, _ in b] and a, key
        for (step, x), (_, y) in zip(a, b):
            assert y == pytest.approx(x, rel=rel), (key, step)
    s = json.loads((root / "fp32" / "summary.json").read_text())
    ref = json.loads((root / "runs" / "ref" / "summary.json").read_text())
    # MFU's numerator: the loop's FLOP/token is its mfu x peak / tokens/s.
    assert s["flops_per_token"] == pytest.approx(ref["mfu"] * ref["peak_flops"] / ref["tokens_per_s"], rel=1e-9)
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / s["peak_flops"], rel=1e-12)
    for key in ("val_bpb_full", "gzip_bpb", "val_tokens", "val_tokens_full", "final_train_loss"):
        assert s[key] == pytest.approx(ref[key], rel=1e-6), key
    assert s["steps"] == STEPS and s["stopped"] is None and s["ranks"] == 1


def _rehearsal(root, name, hidden, steps="train", plan="plan", **extra_env):
    """`GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_STEPS=train bash bench/gpu_check.sh` on the plan."""
    e = bare_python_env(root / f"site-{name}", hidden, PYTHON=sys.executable, GPU_CHECK_ALLOW_CPU="1",
                        GPU_CHECK_STEPS=steps, GPU_CHECK_DATA=str(root / plan), GPU_CHECK_OUT=str(root / name),
                        GPU_CHECK_TRAIN_OUT=str(root / name / "train"), GPU_CHECK_TRAIN_ARGS=f"--steps {STEPS}",
                        **extra_env)
    out = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=e, capture_output=True, text=True,
                         timeout=600)
    results = [p for p in (root / name).glob("*.md")]
    assert len(results) == 1, (out.stdout[-3000:], out.stderr[-3000:])
    return out, results[0].read_text()


def _section(text):
    sec = text.split("<!-- gpu_train:begin -->", 1)[1].split("<!-- gpu_train:end -->", 1)[0]
    table = {}
    for line in sec.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            table[cells[0]] = cells[1]
    return sec, table


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("%"))


def test_gpu_check_without_our_loops_modules_says_so_and_trains_in_bf16(root):
    out, text = _rehearsal(root, "bare", HIDDEN)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert any(line.split()[:2] == ["train", "ok"] for line in out.stdout.splitlines()), out.stdout[-2000:]
    sec, table = _section(text)
    note = [line for line in sec.splitlines() if "cannot run" in line]
    assert len(note) == 1 and "python -m launch train gpt-tiny" in note[0]
    for module in ("deepspeed", "pydantic", "yaml", "tokenizers"):
        assert module in note[0].split("lacks", 1)[1], note[0]
    assert "bench/gpu_train.py train" in note[0] and "bf16 autocast" in note[0] and "1 process" in note[0]
    s = json.loads((root / "bare" / "train" / "gpu-train" / "summary.json").read_text())
    assert s["precision"].startswith("bf16") and s["steps"] == STEPS and s["ranks"] == 1
    # The section shows the run's figures ...
    assert _number(table["final val loss (fixed sample)"]) == round(s["final_val_loss"], 4)
    assert _number(table["tokens/s (EMA, as the loop's summary)"]) == round(s["tokens_per_s"])
    assert _number(table["MFU per device"]) == round(100 * s["mfu"], 2)
    assert s["peak_flops_source"] in table["MFU per device"] and "measured CPU bf16 gemm" in s["peak_flops_source"]
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / s["peak_flops"], rel=1e-12)
    # ... and bf16 trains what fp32 trains: our loop's fp32 losses within bf16 rounding (about 1e-4
    # here), and not bit for bit (the autocast is in effect).
    ref = metrics(root, "ref")
    ref_loss = {r["step"]: r["loss"] for r in ref if "loss" in r}
    diffs = [r["loss"] - ref_loss[r["step"]] for r in _rows(root / "bare" / "train" / "gpu-train" / "metrics.jsonl")
             if "loss" in r]
    assert len(diffs) == STEPS and max(map(abs, diffs)) < 5e-3 and any(diffs), diffs
    ref_val = [r for r in ref if "val_loss_full" in r][-1]
    assert s["val_loss_full"] != ref_val["val_loss_full"]
    assert abs(s["val_loss_full"] - ref_val["val_loss_full"]) < 5e-3
    assert s["val_loss_full"] < math.log(512) - 0.3  # it learned


def test_gpu_check_runs_our_loop_where_it_can(root):
    out, text = _rehearsal(root, "full", ())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sec, table = _section(text)
    assert "cannot run" not in sec
    run = root / "full" / "train" / "runs" / "gpu-check-train"
    s = json.loads((run / "summary.json").read_text())
    assert table["ran"].startswith("our loop: `") and "-m launch train gpt-tiny" in table["ran"]
    assert "train.precision=bf16" in table["ran"] and table["steps"] == f"{STEPS} of {STEPS}"
    assert _number(table["final val loss (fixed sample)"]) == round(s["final_val_loss"], 4)
    assert _number(table["val loss, full split"]) == round(s["val_loss_full"], 4)
    assert _number(table["tokens/s (EMA, as the loop's summary)"]) == round(s["tokens_per_s"])
    assert _number(table["MFU per device"]) == round(100 * s["mfu"], 2)
    assert s["peak_flops_source"] in table["MFU per device"]
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "bf16"
    assert "precision: bf16" in out.stdout  # the loop's own start line


def test_a_failed_kernel_build_sends_the_training_run_to_the_reference_ops(root):
    """With model.kernels=auto (the recipe's default) and the build step failing (no compiler), the
    training run uses kernels=torch instead of building again inside its time limit."""
    out = _plain(root, "pauto", "prepare", str(root / "plan-auto"), *[o for o in PLAN if o != "model.kernels=torch"],
                 f"data.cache_dir={root}/cache", hidden=())
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((root / "plan-auto" / "plan.json").read_text())["model"]["kernels"] == "auto"
    out, text = _rehearsal(root, "nobuild", HIDDEN, steps="build train", plan="plan-auto",
                           LLMK_BUILD_DIR=str(root / "empty-kernel-cache"), CXX="/bin/false")
    assert out.returncode == 1  # the build step failed, and says so
    assert "build failed: the training run uses kernels=torch" in out.stdout
    status = dict(line.split()[:2] for line in out.stdout.split("=== summary", 1)[1].splitlines()[1:3])
    assert status == {"build": "FAILED", "train": "ok"}, out.stdout[-2000:]
    _, table = _section(text)
    assert table["precision, kernels"].endswith("model.kernels=torch (PyTorch reference ops)")


def test_gpu_check_without_a_plan_stops_in_one_line(tmp_path):
    e = bare_python_env(tmp_path / "site", HIDDEN)
    out = subprocess.run([sys.executable, "bench/gpu_train.py", "gpu-check", "--plan", str(tmp_path / "none"),
                          "--out", str(tmp_path / "o"), "--results", str(tmp_path / "r.md"), "--device", "cpu"],
                         cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "bench/gpu_train.py prepare" in out.stderr
    assert "NOT RUN" in (tmp_path / "r.md").read_text()


@pytest.mark.dist
def test_two_ranks_of_ddp_train_what_one_process_trains(root):
    """The 2-GPU branch (torchrun, DDP; gloo here) against one process with the same global batch:
    ShardedSampler deals each global batch to the ranks in order, so both see the same sequences."""
    out = _plain(root, "p16", "prepare", str(root / "plan16"), *PLAN, f"data.cache_dir={root}/cache",
                 "parallel.micro_batch=16", hidden=())
    assert out.returncode == 0, out.stderr[-3000:]
    one = _plain(root, "one", "train", "--plan", str(root / "plan16"), "--out", str(root / "one"), "--device", "cpu",
                 "--precision", "bf16")
    assert one.returncode == 0, one.stderr[-3000:]
    e = bare_python_env(root / "site-two", HIDDEN)
    two = subprocess.run([sys.executable, "bench/gpu_train.py", "gpu-check", "--plan", str(root / "plan"), "--out",
                          str(root / "two"), "--results", str(root / "two.md"), "--device", "cpu", "--procs", "2"],
                         cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 ranks of torch DDP over gloo (torchrun)" in (root / "two.md").read_text()
    s = json.loads((root / "two" / "gpu-train" / "summary.json").read_text())
    assert s["ranks"] == 2 and s["backend"] == "gloo" and s["global_batch"] == 16
    # The same sequences on both sides (bf16 autocast), so only the order of the sums differs. The
    # periodic evaluations differ on purpose: the fixed sample is eval_batches x micro_batch blocks.
    keys = ("loss", "val_loss_full")
    a = {(r["step"], k): r[k] for r in _rows(root / "one" / "metrics.jsonl") for k in keys if k in r}
    b = {(r["step"], k): r[k] for r in _rows(root / "two" / "gpu-train" / "metrics.jsonl") for k in keys if k in r}
    assert a.keys() == b.keys() and len(a) == STEPS + 1
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-3), k
