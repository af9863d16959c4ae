"""The marl-split-arith recipes at reduced size through the CLI: a tiny base on random play of
split_arith, then per-role LoRA adapters (two adapters on one engine, the swap evaluation) and one
shared adapter (marl-split-arith-shared: one adapter, both roles' losses in its update)."""

from __future__ import annotations

import json

import pytest

from tests.test_marl_train import BASE, run_train
from trainer import checkpoint as ckpt


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    out = run_train(root, "base", *[a for a in BASE if not a.startswith("train.max_steps")], "train.max_steps=40",
                    recipe="marl-split-arith-base")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _args(root, *agents):
    base = root / "runs" / "base"
    return [*(f"agents.{a}.init_from={base}" for a in agents), "rl.episodes_per_step=8", "rl.max_new_tokens=3",
            "env.eval_episodes=8", "train.max_steps=2", "train.eval_every=2", "train.progress=false",
            "tracking.wandb=disabled"]


def test_per_role_adapters_share_one_engine_and_are_swapped_at_evaluation(root):
    out = run_train(root, "roles", *_args(root, "first", "second"), recipe="marl-split-arith")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((root / "runs" / "roles" / "summary.json").read_text())
    assert summary["eval_swap"] == {"first": "second", "second": "first"}
    assert 0.0 <= summary["success_swapped"] <= 1.0 and 0.0 <= summary["success"] <= 1.0
    meta = ckpt.verify(ckpt.latest_checkpoint(root / "runs" / "roles" / "checkpoints"))
    assert meta["components"] == ["lora_0"] and set(meta["lora"]["lora_0"]["adapters"]) == {"first", "second"}


def test_the_shared_recipe_trains_one_adapter_for_both_roles(root):
    out = run_train(root, "shared", *_args(root, "first"), recipe="marl-split-arith-shared")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "second (reinforce, alpha 0.001, LoRA r=8, policy of first)" in out.stdout
    meta = ckpt.verify(ckpt.latest_checkpoint(root / "runs" / "shared" / "checkpoints"))
    assert meta["components"] == ["lora_0"] and set(meta["lora"]["lora_0"]["adapters"]) == {"first"}
    rows = [json.loads(line) for line in (root / "runs" / "shared" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "agent/second/policy_loss" in r]
    assert len(steps) == 2 and all(r["agent/second/lr"] == r["agent/first/lr"] == 1e-3 for r in steps)
