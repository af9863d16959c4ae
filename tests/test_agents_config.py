"""The multi-agent sections of a recipe (`agents:`, `env:`, `rl:`): what validates, and the one-line
errors (exit 2) for what cannot run, through the real command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.trainutil import REPO, env

PAIR = ["env.name=signaling", "agents.speaker.alpha=0.01", "agents.listener.gamma=0.9"]


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)


def test_a_signaling_pair_validates_with_per_agent_settings():
    out = _launch("validate", "gpt-tiny", *PAIR, "env.args={n_objects: 4}", "agents.listener.algorithm=grpo",
                  "rl.group_size=4", "rl.episodes_per_step=16")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["agents"]["speaker"]["alpha"] == 0.01 and cfg["agents"]["speaker"]["gamma"] == 1.0
    assert cfg["agents"]["listener"]["gamma"] == 0.9 and cfg["agents"]["listener"]["algorithm"] == "grpo"
    assert cfg["env"] == {"name": "signaling", "args": {"n_objects": 4}, "seed": None, "eval_episodes": 200,
                          "eval_options": {}, "eval_group_by": None, "eval_swap": {}, "eval_metrics": []}


@pytest.mark.parametrize("overrides, words", [
    ([*PAIR, "agents.speaker.alpha=-0.5"], "agents.speaker.alpha"),
    ([*PAIR, "agents.listener.gamma=1.5"], "agents.listener.gamma"),
    ([*PAIR, "agents.speaker.tempo=1"], "unknown key 'agents.speaker.tempo'; allowed here: adapter, algorithm"),
    (["env.name=chess", "agents.white.alpha=0.0"], "unknown env 'chess'; known envs: debate_arith, gvr_arith, openspiel, signaling, split_arith"),
    ([*PAIR, "env.args={n_things: 3}"], "env 'signaling' has no argument 'n_things'"),
    (["env.name=signaling", "agents.speaker.alpha=0.0", "agents.judge.alpha=0.0"],
     "env 'signaling' has agents speaker, listener; the recipe names speaker, judge (missing listener) (unknown judge)"),
    ([*PAIR, "agents.listener.algorithm=grpo"], "use algorithm=grpo: it needs rl.group_size >= 2"),
    ([*PAIR, "rl.group_size=3"], "rl.episodes_per_step=64 must be a multiple of rl.group_size=3"),
    (["env.name=signaling"], "env.name=signaling needs agents"),
    (["agents.speaker.alpha=0.0"], "need an environment: set env.name"),
    ([*PAIR, "agents.speaker.trainable=false", "agents.listener.trainable=false"], "nothing to train"),
])
def test_bad_multi_agent_settings_stop_with_one_line(overrides, words):
    out = _launch("validate", "gpt-tiny", *overrides)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr


def test_an_agents_recipe_goes_to_the_agents_loop_not_pretraining(tmp_path):
    """No silent fallback: an agents recipe is never run by the pre-training loop with its agents
    ignored. Here the agents start from the recipe's model.* with no tokenizer: the agents loop says so."""
    out = _launch("train", "gpt-tiny", *PAIR, f"run.output_dir={tmp_path}")
    assert out.returncode == 2
    assert "agents.speaker.init_from is null" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "gpt-tiny" / "summary.json").exists()
