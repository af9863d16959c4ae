"""marl-traffic: the recipe chain end to end through the CLI at a reduced size (a tiny base pretrained
on the traffic corpus, two RL steps of short 2x2grid episodes), and the loop's evaluation metrics
mechanism (env.eval_metrics: final-info means, an env's baseline_metrics on the same episodes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agents import train as agents_train
from agents.envs import ENVS, register_env
from tests.trainutil import env
from trainer.dims import ParallelDims
from trainer.schema import Recipe

# ---- env.eval_metrics (agents/train.py) -------------------------------------------------------------


def test_final_info_means_average_each_key_over_the_episodes_that_have_it():
    finals = [{"a": {"w": 2.0, "t": 0}, "b": {"w": 2.0, "t": 0}},
              {"a": {"w": 4.0, "t": 1}, "b": {"w": 4.0, "t": 1}},
              {"a": {"t": 2}}]
    dims = ParallelDims.plan(1, 0)
    assert agents_train._final_info_means(finals, ["w", "t", "missing"], dims) == {"w": 3.0, "t": 1.0,
                                                                                    "missing": None}


class _WithBaseline:
    """Enough of an env for baseline_summary: its baseline's figures depend on the episode's seed."""

    calls: list[int] = []

    def __init__(self, with_baseline=True):
        if with_baseline:
            self.baseline_metrics = self._baseline

    def _baseline(self, seed):
        _WithBaseline.calls.append(seed)
        return {"w": 10.0, "t": 0, "seed_odd": seed % 2}

    def close(self):
        pass


def _recipe(env_section: dict) -> Recipe:
    return Recipe.model_validate({"env": env_section, "agents": {"a": {}}})


@pytest.fixture
def fake_env():
    register_env("with_baseline", _WithBaseline)
    yield "with_baseline"
    ENVS.pop("with_baseline", None)


def test_baseline_summary_runs_the_baseline_once_per_evaluation_episode(fake_env):
    _WithBaseline.calls = []
    recipe = _recipe({"name": fake_env, "eval_episodes": 6, "eval_metrics": ["w", "t"]})
    dims = ParallelDims.plan(1, 0)
    out = agents_train.baseline_summary(recipe, dims, {"w": 5.0, "t": 0.0})
    assert out == {"eval_metrics": {"w": 5.0, "t": 0.0}, "baseline": {"w": 10.0, "t": 0.0},
                   "eval_ratio": {"w": 0.5, "t": None}}  # a zero baseline has no ratio
    assert _WithBaseline.calls == agents_train.eval_seeds(recipe, dims)[1][1]  # the evaluation's env seeds
    assert len(set(_WithBaseline.calls)) == 6


def test_baseline_summary_without_metrics_or_baseline(fake_env):
    dims = ParallelDims.plan(1, 0)
    assert agents_train.baseline_summary(_recipe({"name": fake_env}), dims, {}) == {}
    register_env(fake_env, lambda: _WithBaseline(with_baseline=False))
    recipe = _recipe({"name": fake_env, "eval_metrics": ["w"]})
    assert agents_train.baseline_summary(recipe, dims, {"w": 1.0}) == {"eval_metrics": {"w": 1.0}}


# ---- the recipe chain through the CLI -----------------------------------------------------------------

SHORT_ENV = ["env.args.num_seconds=60", "env.args.delta_time=10"]  # 6 decisions per light
BASE = ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=2", "model.d_model=32", "model.max_seq_len=128",
        "model.kernels=torch", "data.vocab_size=300", "data.seq_len=64", "data.max_documents=12",
        "parallel.micro_batch=8", "train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=20",
        "train.eval_batches=2", "train.sample_tokens=4", "optim.warmup_steps=2", *SHORT_ENV]
RL = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "rl.episodes_per_step=2",
      "rl.max_env_steps=6", "env.eval_episodes=2", *SHORT_ENV]


def _train(root, recipe, *overrides):
    cmd = [sys.executable, "-m", "launch", "train", recipe, f"run.output_dir={root}/runs",
           f"data.cache_dir={root}/cache", "train.progress=false", "tracking.wandb=disabled", *overrides]
    return subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=300)


def test_the_recipe_chain_runs_end_to_end_and_the_summary_holds_the_ratio_and_teleports(tmp_path):
    base = _train(tmp_path, "marl-traffic-base", *BASE)  # the run `recipe:marl-traffic-base` names
    assert base.returncode == 0, base.stderr[-3000:]
    corpus = list((tmp_path / "cache" / "env-corpus").glob("traffic-*.jsonl"))
    docs = [json.loads(line)["text"] for line in corpus[0].read_text().splitlines()]
    assert len(docs) == 12 and all(d.count("Next phase (0-3)?") == 6 * 4 for d in docs)  # whole episodes

    out = _train(tmp_path, "marl-traffic", *RL)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training it first" not in out.stdout  # the chain found the finished base
    run = tmp_path / "runs" / "marl-traffic"
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 2 and set(s["agents"]) == {"tl_1", "tl_2", "tl_5", "tl_6"}
    assert set(s["eval_metrics"]) == set(s["baseline"]) == {"mean_waiting_time", "teleports"}
    assert s["eval_metrics"]["mean_waiting_time"] > 0 and s["baseline"]["mean_waiting_time"] > 0
    assert s["eval_ratio"]["mean_waiting_time"] == pytest.approx(
        s["eval_metrics"]["mean_waiting_time"] / s["baseline"]["mean_waiting_time"])
    assert s["eval_metrics"]["teleports"] >= 0 and s["baseline"]["teleports"] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_metric/mean_waiting_time" in r for r in rows)
    assert "ratio: mean_waiting_time" in out.stdout
