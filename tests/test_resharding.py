"""A run continues in another parallel layout: weights resharded exactly, Adam's moments and step
count, the schedule and the data position carried over, the loss continuing as if never moved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.trainutil import run_train, train_losses
from trainer import optim_state
from trainer.checkpoint import step_dir_name

STEPS = 10
CUT = 6
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=1000", "train.sample_tokens=0", "optim.warmup_steps=3",
          "parallel.global_batch=8", f"train.checkpoint_every={CUT}"]
SINGLE = ["parallel.micro_batch=8"]
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2", "launch.procs_per_node=4", "parallel.micro_batch=4"]
ZERO1 = ["parallel.zero_stage=1", "launch.procs_per_node=2", "parallel.micro_batch=4"]
ZERO2 = ["parallel.zero_stage=2", "launch.procs_per_node=2", "parallel.micro_batch=4"]
ZERO3 = ["parallel.zero_stage=3", "launch.procs_per_node=2", "parallel.micro_batch=4"]
TP2_DP2_ZERO3 = ["parallel.zero_stage=3", "parallel.tp=2", "launch.procs_per_node=4", "parallel.micro_batch=4"]
BF16 = ["train.precision=bf16"]
LAYOUTS = {"single": SINGLE, "tp2pp2": TP2_PP2, "zero1": ZERO1, "zero2": ZERO2, "zero3": ZERO3,
           "tp2dp2zero3": TP2_DP2_ZERO3, "pp2-bf16": ["parallel.pp=2", "launch.procs_per_node=2", *BF16],
           "single-bf16": [*SINGLE, *BF16]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reshard")


@pytest.fixture(scope="module")
def reference(root):
    out = run_train(root, "ref", *COMMON, *SINGLE)
    assert out.returncode == 0, out.stderr[-3000:]
    return train_losses(root, "ref")


@pytest.fixture(scope="module")
def cut(root):
    """`cut(layout)`: the run directory of a run in that layout killed after its step-CUT checkpoint;
    trained once per layout, copied by every move that starts from it."""
    done = {}

    def get(layout: str):
        if layout not in done:
            name = f"cut-{layout}"
            out = run_train(root, name, *COMMON, *LAYOUTS[layout], timeout=600, RECIPES_FAULT_KILL_AFTER_STEP=str(CUT))
            assert out.returncode != 0 and max(train_losses(root, name)) == CUT, out.stderr[-3000:]
            done[layout] = root / "runs" / name
        return done[layout]

    return get


ADAM = f"model/{optim_state.FILE}"  # the model component's layout-independent moments


def _adam(folder):
    return torch.load(folder / ADAM, weights_only=False)


def _assert_same_moments(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Equal keys (the single-process model's parameter names) and step; moments within `rel` of
    the largest moment of their kind (an attention key bias has an exactly-zero gradient in exact
    arithmetic: its moments are rounding noise, ~1e-12 of the rest)."""
    assert a["step"] == b["step"]
    assert list(a["moments"]) == list(b["moments"])
    for i in range(2):
        scale = max(v[i].abs().max().item() for v in a["moments"].values())
        for k in a["moments"]:
            torch.testing.assert_close(b["moments"][k][i], a["moments"][k][i], rtol=0, atol=rel * scale, msg=k)


def _move(root, cut, name, first, second, prepare=None):
    """Continue a copy of `first`'s run (killed at step CUT) in the layout `second`."""
    shutil.copytree(cut(first), root / "runs" / name)
    if prepare is not None:
        prepare(root / "runs" / name / "checkpoints" / step_dir_name(CUT))
    out = run_train(root, name, *COMMON, *LAYOUTS[second], "train.resume=auto", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "in another layout" in out.stdout
    return out, train_losses(root, name)


@pytest.mark.dist
@pytest.mark.parametrize("first, second", [("tp2pp2", "zero2"), ("zero2", "tp2pp2"), ("tp2dp2zero3", "single")])
def test_move_between_tp_pp_and_zero(root, reference, cut, first, second):
    name = f"{first}-to-{second}"
    out, losses = _move(root, cut, name, first, second)
    assert "Adam state carried over" in out.stdout
    assert sorted(losses) == list(range(1, STEPS + 1))
    # weights, Adam moments and step count all carried: the run continues as if never moved
    for s in range(1, STEPS + 1):
        assert losses[s] == pytest.approx(reference[s], rel=1e-4), s
    # the moments each layout gathers (at the cut, and at the end after the move) are the
    # single-process model's, by its parameter names
    ref = root / "runs" / "ref" / "checkpoints"
    _assert_same_moments(_adam(ref / step_dir_name(CUT)), _adam(cut(first) / "checkpoints" / step_dir_name(CUT)))
    _assert_same_moments(_adam(ref / step_dir_name(STEPS)),
                         _adam(root / "runs" / name / "checkpoints" / step_dir_name(STEPS)))
    shutil.rmtree(root / "runs" / name)


@pytest.mark.dist
def test_restored_moments_regather_exactly(root, cut):
    """ZeRO-2's moments restored into tensor x pipeline parallelism and saved again without an
    update (one step whose update the NaN veto skips): the file tp2 x pp2 gathers is the one ZeRO-2
    wrote, bit for bit."""
    src = cut("zero2") / "checkpoints" / step_dir_name(CUT)
    out = run_train(root, "regather", *COMMON, *TP2_PP2, f"train.max_steps={CUT + 1}", f"train.resume={src}",
                    timeout=600, RECIPES_FAULT_NAN_STEPS=str(CUT + 1))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Adam state carried over" in out.stdout and f"step {CUT + 1}: non-finite loss" in out.stdout
    a, b = _adam(src), _adam(root / "runs" / "regather" / "checkpoints" / step_dir_name(CUT + 1))
    assert a["step"] == b["step"] == CUT and list(a["moments"]) == list(b["moments"])
    for k, (ea, eas) in a["moments"].items():
        assert torch.equal(b["moments"][k][0], ea) and torch.equal(b["moments"][k][1], eas), k
    shutil.rmtree(root / "runs" / "regather")


def _drop_adam_file(folder):
    (folder / ADAM).unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest[ADAM]
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.dist
def test_move_without_adam_state_resets(root, reference, cut):
    """A checkpoint without adam_full.pt (ZeRO-0 in bf16, older versions) moves with a fresh Adam:
    said so, and visibly off the uninterrupted run (what the 1e-4 above would catch)."""
    out, losses = _move(root, cut, "tp2pp2-to-zero2-reset", "tp2pp2", "zero2", prepare=_drop_adam_file)
    assert "optimizer state RESET" in out.stdout and f"holds no {optim_state.FILE}" in out.stdout
    # the first step after the move sees exactly the resharded weights on the same batch
    assert losses[CUT + 1] == pytest.approx(reference[CUT + 1], rel=1e-4)
    # then a fresh Adam at the decayed learning rate: no jump, but not the reference either
    rel = [abs(losses[s] - reference[s]) / reference[s] for s in range(CUT + 2, STEPS + 1)]
    assert max(rel) > 1e-3, rel
    assert max(rel) < 0.01, rel
    assert losses[STEPS] < losses[CUT]
    shutil.rmtree(root / "runs" / "tp2pp2-to-zero2-reset")


@pytest.mark.dist
def test_bf16_zero0_takes_no_adam_state(root, cut):
    """In bf16 a pipeline's ZeRO-0 optimizer (DeepSpeed's BF16_Optimizer) reaches its moments by
    parameter and saves them; ZeRO-0 without a pipeline (FP16_Optimizer in bf16) cannot take them:
    the move resets the optimizer and says why."""
    src = cut("pp2-bf16") / "checkpoints" / step_dir_name(CUT)
    saved = _adam(src)
    assert saved["step"] == CUT and "blocks.1.mlp.fc.weight" in saved["moments"]
    assert all(float(v[1].abs().max()) > 0 for k, v in saved["moments"].items() if "k_proj.bias" not in k)
    out, losses = _move(root, cut, "pp2bf16-to-single-bf16", "pp2-bf16", "single-bf16")
    assert "optimizer state RESET" in out.stdout and "this layout (ZeRO-0 in bf16)" in out.stdout
    assert sorted(losses) == list(range(1, STEPS + 1))
    shutil.rmtree(root / "runs" / "pp2bf16-to-single-bf16")


@pytest.mark.dist
@pytest.mark.parametrize("first, second", [("zero1", "zero2"), ("single", "zero3")])
def test_zero_moves_keep_adam_state(root, reference, cut, first, second):
    name = f"{first}-to-{second}"
    out, losses = _move(root, cut, name, first, second)
    assert "Adam state carried over" in out.stdout
    # weights, Adam moments and step count all carried: the run continues as if never moved
    for s in range(1, STEPS + 1):
        assert losses[s] == pytest.approx(reference[s], rel=1e-4), s
    shutil.rmtree(root / "runs" / name)
