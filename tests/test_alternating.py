"""train.schedule: alternating (agents/schedule.py): agents take turns to update, phase by phase; the
frozen ones keep their weights and optimizer state bit for bit, and a resume inside a phase
continues it. Two LoRA adapters on one engine (marl-split-arith at reduced size), the harder case:
their engine steps in every phase."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from agents.schedule import active_agents, phase_index
from tests.test_marl_train import BASE, run_train
from trainer.recipe import load_recipe

STEPS = ["train.schedule=alternating", "train.phase_steps=2", "train.max_steps=6", "train.checkpoint_every=2",
         "train.keep_checkpoints=10"]


def test_phases_follow_the_order_and_repeat():
    r = load_recipe("marl-split-arith", ["train.schedule=alternating", "train.phase_steps=3"])
    assert [active_agents(r, s) for s in (0, 2, 3, 5, 6)] == [{"first"}, {"first"}, {"second"}, {"second"}, {"first"}]
    assert phase_index(r, 7) == 0
    r = load_recipe("marl-split-arith", ["train.schedule=alternating", "train.phase_steps=1",
                                         "train.phase_order=[first+second, second]"])
    assert [active_agents(r, s) for s in range(3)] == [{"first", "second"}, {"second"}, {"first", "second"}]
    assert active_agents(load_recipe("marl-split-arith", []), 5) is None  # simultaneous


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("alternating")
    out = run_train(root, "base", *[a for a in BASE if not a.startswith("train.max_steps")], "train.max_steps=40",
                    recipe="marl-split-arith-base")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _args(root):
    base = root / "runs" / "base"
    return [f"agents.first.init_from={base}", f"agents.second.init_from={base}", "rl.episodes_per_step=8",
            "rl.max_new_tokens=3", "env.eval_episodes=8", "train.eval_every=6", "train.progress=false",
            "tracking.wandb=disabled"]


def _adapter_state(run: Path, step: int, agent: str) -> dict[str, torch.Tensor]:
    """The agent's adapter weights and their AdamW moments in the checkpoint of `step`."""
    sd = torch.load(run / "checkpoints" / f"step_{step:08d}" / "lora_0" / "mp_rank_00_model_states.pt",
                    map_location="cpu", weights_only=False)
    names = [n for n, p in sd["module"].items() if "lora" in n]
    group = ["first", "second"].index(agent)  # one optimizer group per adapter, in the order of agents
    out = {n: sd["module"][n] for n in names if f".{agent}." in n}
    opt = sd["optimizer"]
    for pid in opt["param_groups"][group]["params"]:
        for k, v in opt["state"].get(pid, {}).items():
            out[f"opt{pid}.{k}"] = v
    assert out, f"no adapter weights of {agent}"
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_frozen_adapter_and_its_optimizer_state_stay_bit_identical(root):
    out = run_train(root, "alt", *_args(root), *STEPS, recipe="marl-split-arith")
    assert out.returncode == 0, out.stderr[-3000:]
    run = root / "runs" / "alt"
    s = {(step, a): _adapter_state(run, step, a) for step in (2, 4, 6) for a in ("first", "second")}
    # steps 3-4: second's phase (first frozen); steps 5-6: first's phase (second frozen)
    assert _equal(s[2, "first"], s[4, "first"]) and not _equal(s[2, "second"], s[4, "second"])
    assert _equal(s[4, "second"], s[6, "second"]) and not _equal(s[4, "first"], s[6, "first"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "phase" in r]
    assert [r["phase"] for r in steps] == [0, 0, 1, 1, 0, 0]
    assert all(("agent/first/policy_loss" in r) == (r["phase"] == 0) for r in steps)
    assert all(("agent/second/policy_loss" in r) == (r["phase"] == 1) for r in steps)


def test_resume_inside_a_phase_continues_it_bit_for_bit(root):
    if not (root / "runs" / "alt" / "summary.json").exists():
        pytest.skip("needs test_a_frozen_adapter_and_its_optimizer_state_stay_bit_identical")
    killed = run_train(root, "killed", *_args(root), *STEPS, recipe="marl-split-arith",
                       RECIPES_FAULT_KILL_AFTER_STEP="3")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(root, "killed", *_args(root), *STEPS, "train.resume=auto", recipe="marl-split-arith")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def per_step(name):
        rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith(("agent/", "success", "phase"))}
                for r in rows if "phase" in r}

    a, b = per_step("alt"), per_step("killed")
    assert [a[k] for k in range(3, 7)] == [b[k] for k in range(3, 7)]
    for step in (4, 6):
        for agent in ("first", "second"):
            assert _equal(_adapter_state(root / "runs" / "alt", step, agent),
                          _adapter_state(root / "runs" / "killed", step, agent))


@pytest.mark.parametrize("override,message", [
    ("train.phase_order=[first, third]", "train.phase_order: 'third' names 'third', which is not a trainable agent"),
    ("parallel.zero_stage=1", "train.schedule=alternating with LoRA agents first, second on one base needs "
                              "parallel.zero_stage=0"),
])
def test_bad_schedules_are_one_line(root, override, message):
    out = run_train(root, "bad", *_args(root), *STEPS, override, recipe="marl-split-arith")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message in out.stderr.strip().splitlines()[-1]
