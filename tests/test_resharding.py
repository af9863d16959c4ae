"""A run continues in another parallel layout: weights resharded exactly, the schedule and data
position carried over, the loss continuing without a jump."""

from __future__ import annotations

import shutil

import pytest

from tests.trainutil import run_train, train_losses

STEPS = 10
CUT = 6
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=1000", "train.sample_tokens=0", "optim.warmup_steps=3",
          "parallel.global_batch=8", f"train.checkpoint_every={CUT}"]
SINGLE = ["parallel.micro_batch=8"]
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2", "launch.procs_per_node=4", "parallel.micro_batch=4"]
ZERO2 = ["parallel.zero_stage=2", "launch.procs_per_node=2", "parallel.micro_batch=4"]
TP2_DP2_ZERO3 = ["parallel.zero_stage=3", "parallel.tp=2", "launch.procs_per_node=4", "parallel.micro_batch=4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reshard")


@pytest.fixture(scope="module")
def reference(root):
    out = run_train(root, "ref", *COMMON, *SINGLE)
    assert out.returncode == 0, out.stderr[-3000:]
    return train_losses(root, "ref")


def _move(root, name, first, second):
    """Train `first` up to step CUT, then continue the same run directory with `second`."""
    out = run_train(root, name, *COMMON, *first, timeout=600, RECIPES_FAULT_KILL_AFTER_STEP=str(CUT))
    assert out.returncode != 0 and max(train_losses(root, name)) == CUT
    out = run_train(root, name, *COMMON, *second, "train.resume=auto", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "in another layout" in out.stdout
    return out, train_losses(root, name)


@pytest.mark.dist
@pytest.mark.parametrize("first, second, name", [(TP2_PP2, ZERO2, "tp2pp2-to-zero2"),
                                                 (ZERO2, TP2_PP2, "zero2-to-tp2pp2"),
                                                 (TP2_DP2_ZERO3, SINGLE, "tp2dp2zero3-to-single")])
def test_move_between_tp_pp_and_zero(root, reference, first, second, name):
    out, losses = _move(root, name, first, second)
    assert "optimizer state RESET" in out.stdout
    assert sorted(losses) == list(range(1, STEPS + 1))
    for s in range(1, CUT + 1):
        assert losses[s] == pytest.approx(reference[s], rel=1e-3)
    # the first step after the move sees exactly the resharded weights on the same batch
    assert losses[CUT + 1] == pytest.approx(reference[CUT + 1], rel=1e-3)
    # then a fresh Adam at the decayed learning rate: no jump, the loss keeps falling with the reference
    for s in range(CUT + 2, STEPS + 1):
        assert abs(losses[s] - reference[s]) < 0.05, (s, losses[s], reference[s])
    assert losses[STEPS] < losses[CUT]
    shutil.rmtree(root / "runs" / name)


ZERO1 = ["parallel.zero_stage=1", "launch.procs_per_node=2", "parallel.micro_batch=4"]
ZERO3 = ["parallel.zero_stage=3", "launch.procs_per_node=2", "parallel.micro_batch=4"]


@pytest.mark.dist
@pytest.mark.parametrize("first, second, name", [(ZERO1, ZERO2, "zero1-to-zero2"),
                                                 (SINGLE, ZERO3, "single-to-zero3")])
def test_zero_moves_keep_adam_state(root, reference, first, second, name):
    out, losses = _move(root, name, first, second)
    assert "Adam state carried over" in out.stdout
    # weights, Adam moments and step count all carried: the run continues as if never moved
    for s in range(1, STEPS + 1):
        assert losses[s] == pytest.approx(reference[s], rel=1e-4), s
    shutil.rmtree(root / "runs" / name)
