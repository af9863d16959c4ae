"""The alt-gvr recipes at reduced size through the CLI: a tiny base on random play of gvr_arith, then
generator, verifier and refiner LoRA adapters on one engine, alternating (alt-gvr) or all at every
step (alt-gvr-simultaneous); the summary compares the pipeline with the generator alone."""

from __future__ import annotations

import json

import pytest

from tests.test_marl_train import BASE, run_train

ROLES = ("generator", "verifier", "refiner")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gvr")
    out = run_train(root, "base", *[a for a in BASE if not a.startswith("train.max_steps")], "train.max_steps=30",
                    recipe="alt-gvr-base")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _args(root, steps: int):
    base = root / "runs" / "base"
    return [*(f"agents.{a}.init_from={base}" for a in ROLES), "rl.episodes_per_step=8", "rl.max_new_tokens=3",
            "env.eval_episodes=8", f"train.max_steps={steps}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", "train.progress=false", "tracking.wandb=disabled"]


def _rows(root, name):
    return [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_alternating_phases_take_turns_and_the_summary_has_the_generator_alone(root):
    out = run_train(root, "alt", *_args(root, 4), "train.phase_steps=1", recipe="alt-gvr")
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r for r in _rows(root, "alt") if "phase" in r]
    assert [r["phase"] for r in steps] == [0, 1, 2, 0]
    for r, role in zip(steps, ("generator", "verifier", "refiner", "generator")):
        assert [a for a in ROLES if f"agent/{a}/policy_loss" in r] == [role]
    s = json.loads((root / "runs" / "alt" / "summary.json").read_text())
    assert set(s["eval_metrics"]) == {"generator_correct", "verifier_right", "refiner_changed"}
    assert all(0.0 <= v <= 1.0 for v in s["eval_metrics"].values()) and 0.0 <= s["success"] <= 1.0


def test_the_simultaneous_twin_updates_every_role_at_every_step(root):
    out = run_train(root, "sim", *_args(root, 2), recipe="alt-gvr-simultaneous")
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r for r in _rows(root, "sim") if "success" in r and "step_time_s" in r]
    assert len(steps) == 2 and all("phase" not in r for r in steps)
    assert all(f"agent/{a}/policy_loss" in r for r in steps for a in ROLES)
