"""Every parallel layout trains the same model to the same losses as one process.

Each layout runs through the real launcher path (`python -m launch train` -> `deepspeed` ->
ranks) on CPU with gloo, in float32, with the same seed and global batch as the single-process
reference. The first 10 losses must match within a relative 1e-4 (pipeline: 1e-3) and the
consolidated weights after those steps within the same tolerance.
"""

from __future__ import annotations

import pytest
import torch

from launch.export import consolidated_state_dict
from tests.trainutil import run_train, train_losses
from trainer import checkpoint as ckpt

STEPS = 10
# Single process: 8 sequences per step. Each layout keeps the global batch at 8.
REFERENCE = ["parallel.micro_batch=8", "parallel.global_batch=8"]

# layout -> (recipe in recipes/, overrides that keep the global batch at 8, tolerance). The
# recipes' own parallel settings (ZeRO stage, tp, pp, process count) are what is tested.
LAYOUTS = {
    "zero1": ("gpt-tiny-zero1", ["parallel.micro_batch=4"], 1e-4),
    "zero2": ("gpt-tiny-zero2", ["parallel.micro_batch=4"], 1e-4),
    "zero3": ("gpt-tiny-zero3", ["parallel.micro_batch=4"], 1e-4),
    "zero3-offload": ("gpt-tiny-zero3-offload", ["parallel.micro_batch=4"], 1e-4),
    "zero1-accum": ("gpt-tiny-zero1", ["parallel.micro_batch=2"], 1e-4),
    "tp2": ("gpt-tiny-tp2", ["parallel.micro_batch=8"], 1e-4),
    "tp2-sp": ("gpt-tiny-tp2", ["parallel.micro_batch=8", "parallel.sequence_parallel=true"], 1e-4),
    "tp2-dp2-zero1": ("gpt-tiny-tp2-dp2-zero1", ["parallel.micro_batch=4"], 1e-4),
    "pp2": ("gpt-tiny-pp2", ["parallel.micro_batch=4"], 1e-3),
    "pp2-dp2-zero1": ("gpt-tiny-pp2", ["parallel.zero_stage=1", "launch.procs_per_node=4",
                                       "parallel.micro_batch=2"], 1e-3),
    "tp2-pp2": ("gpt-tiny-tp2-pp2", ["parallel.micro_batch=4"], 1e-3),
}

COMMON = [f"train.max_steps={STEPS}", "train.eval_every=1000", "train.sample_tokens=0", "optim.warmup_steps=3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def reference(root):
    out = run_train(root, "single", *COMMON, *REFERENCE)
    assert out.returncode == 0, out.stderr[-3000:]
    return train_losses(root, "single"), _weights(root, "single")


def _weights(root, name) -> dict[str, torch.Tensor]:
    folder = ckpt.latest_checkpoint(root / "runs" / name / "checkpoints")
    return consolidated_state_dict(folder, ckpt.verify(folder))


@pytest.mark.dist
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(root, reference, layout):
    recipe, overrides, tol = LAYOUTS[layout]
    out = run_train(root, layout, *COMMON, *overrides, "parallel.global_batch=8", recipe=recipe, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ref_losses, ref_weights = reference
    losses = train_losses(root, layout)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(ref_losses[step], rel=tol), f"step {step}"
    assert ref_losses[STEPS] < ref_losses[1] - 0.05  # the model did move
    weights = _weights(root, layout)
    assert weights.keys() == ref_weights.keys()
    for k, w in ref_weights.items():
        torch.testing.assert_close(weights[k].float(), w.float(), rtol=tol, atol=tol * 0.1, msg=k)
