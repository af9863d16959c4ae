"""The multi-agent RL loop end to end (`python -m launch train marl-signaling ...`): a tiny base
pretrained on random play, two agents with their own engines, resume after SIGKILL bit for bit, two
processes against one, export per agent, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.trainutil import REPO, env, metrics


def run_train(root, name, *overrides, recipe, timeout=600, **env_extra):
    """`python -m launch train RECIPE` with the recipe's own data (not the stdlib of tests.trainutil)."""
    cmd = [sys.executable, "-m", "launch", "train", recipe, f"run.name={name}", f"run.output_dir={root}/runs",
           f"data.cache_dir={root}/cache", *overrides]
    return subprocess.run(cmd, cwd=root, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)

BASE = ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=2", "model.d_model=32", "model.max_seq_len=64", "model.kernels=torch",
        "data.vocab_size=300", "data.seq_len=64", "data.max_documents=600", "parallel.micro_batch=8",
        "train.max_steps=200", "train.eval_every=100", "train.checkpoint_every=100", "train.eval_batches=2",
        "train.progress=false", "tracking.wandb=disabled", "train.sample_tokens=4", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A module-wide folder with a base trained on a small corpus of random signalling play (long
    enough for its listener to name a candidate now and then, so that returns vary)."""
    root = tmp_path_factory.mktemp("marl")
    out = run_train(root, "base", *BASE, recipe="marl-signaling-base")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def agents_args(root, *extra: str) -> list[str]:
    base = root / "runs" / "base"
    return [f"agents.speaker.init_from={base}", f"agents.listener.init_from={base}", "rl.episodes_per_step=8",
            "rl.max_new_tokens=3", "env.eval_episodes=8", "train.eval_every=3", "train.progress=false",
            "tracking.wandb=disabled", "agents.speaker.lr=3e-3", "agents.listener.lr=3e-3", *extra]


def _marl(root, name, *extra, **env):
    return run_train(root, name, *agents_args(root, *extra), recipe="marl-signaling", **env)


def _rows(root, name):
    return [r for r in metrics(root, name) if "agent/speaker/return" in r or "eval_success" in r]


def _timeless_rows(root, name):
    """The run's step and evaluation rows without the wall-clock figures."""
    return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s", "rollout_s")}
            for r in _rows(root, name)]


def _killed_and_resumed(root, name, args, kill_after: int) -> list[dict]:
    """Run `name` until SIGKILL after step `kill_after`, resume it to the end; its timeless rows."""
    killed = _marl(root, name, *args, RECIPES_FAULT_KILL_AFTER_STEP=str(kill_after))
    assert killed.returncode != 0
    resumed = _marl(root, name, *args, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return _timeless_rows(root, name)


def test_training_logs_every_agent_and_writes_summary_and_plot(root):
    out = _marl(root, "plain", "train.max_steps=4", "train.checkpoint_every=2")
    assert out.returncode == 0, out.stderr[-3000:]
    run = root / "runs" / "plain"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["agents"]) == {"speaker", "listener"}
    for name in ("speaker", "listener"):
        d = summary["agents"][name]
        assert 0.0 <= d["return"] <= 1.0 and d["entropy"] >= 0.0
    assert 0.0 <= summary["success"] <= 1.0
    # with the message blanked, the listener is at chance (a random candidate among 10, here 8 episodes)
    assert "success_with_eval_options" in summary
    # env.eval_group_by: target -> success per object, from the final infos of every evaluation episode
    by = summary["success_by"]
    assert set(by) <= {"apple", "boat", "candle", "drum", "egg", "feather", "guitar", "hammer", "igloo", "jacket"}
    assert summary["success_min_by"] == min(by.values())
    rows = [r for r in metrics(root, "plain") if "agent/speaker/return" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for name in ("speaker", "listener"):
            for key in ("return", "entropy", "success", "kl", "loss"):
                assert r[f"agent/{name}/{key}"] is not None, (name, key)
        # the shared reward: both agents' returns are the team's success
        assert r["agent/speaker/return"] == r["agent/listener/return"] == r["success"]
    assert (run / "agents.png").stat().st_size > 0
    # the agents moved away from the base (KL > 0 after updates) and the checkpoint holds both
    assert rows[-1]["agent/speaker/kl"] > 0
    from trainer import checkpoint as ckpt

    meta = ckpt.verify(ckpt.latest_checkpoint(run / "checkpoints"))
    assert meta["components"] == ["agent_speaker", "agent_listener"]


def test_resume_after_sigkill_reproduces_every_metric_bit_for_bit(root):
    args = ["train.max_steps=6", "train.checkpoint_every=3"]
    full = _marl(root, "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    assert _killed_and_resumed(root, "killed", args, 4) == _timeless_rows(root, "full")
    assert json.loads((root / "runs" / "full" / "summary.json").read_text())["agents"] == \
        json.loads((root / "runs" / "killed" / "summary.json").read_text())["agents"]


@pytest.mark.dist
def test_two_processes_play_the_same_episodes_as_one(root):
    one = _marl(root, "one", "train.max_steps=2", "train.checkpoint_every=100")
    two = _marl(root, "two", "train.max_steps=2", "train.checkpoint_every=100", "launch.procs_per_node=2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a = [r for r in metrics(root, "one") if "agent/speaker/return" in r]
    b = [r for r in metrics(root, "two") if "agent/speaker/return" in r]
    # the episodes do not depend on the number of processes: the same successes, and the same
    # losses (the global baseline and normaliser) within float tolerance
    assert [r["success"] for r in a] == [r["success"] for r in b]
    for ra, rb in zip(a, b):
        for name in ("speaker", "listener"):
            assert ra[f"agent/{name}/loss"] == pytest.approx(rb[f"agent/{name}/loss"], abs=1e-5)
            assert ra[f"agent/{name}/entropy"] == pytest.approx(rb[f"agent/{name}/entropy"], abs=1e-5)


def _zero3_matches_zero0(root, prefix: str, args: list[str], keys) -> None:
    """Runs `<prefix>0` (ZeRO-0, one process) and `<prefix>3` (ZeRO-3, two): the same episodes (team
    successes) and the same per-agent figures `keys` within 1e-5 at every step."""
    one = _marl(root, f"{prefix}0", *args)
    two = _marl(root, f"{prefix}3", *args, "parallel.zero_stage=3", "launch.procs_per_node=2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = ([r for r in metrics(root, f"{prefix}{z}") if "agent/speaker/return" in r] for z in (0, 3))
    assert [r["success"] for r in a] == [r["success"] for r in b] and len(a) == 2
    for ra, rb in zip(a, b):
        for key in keys:
            assert ra[f"agent/{key}"] == pytest.approx(rb[f"agent/{key}"], abs=1e-5), key


@pytest.mark.dist
def test_zero3_over_two_processes_trains_as_zero0_on_one_and_exports(root, tmp_path):
    """Full-weight agents (a PPO speaker with its value head, a REINFORCE listener) with their weights,
    gradients and Adam moments partitioned by ZeRO-3 over two ranks: the episodes and figures of one
    unpartitioned process; the checkpoint consolidates for export."""
    args = ["train.max_steps=2", "train.checkpoint_every=100", "env.args.n_objects=2", "rl.max_new_tokens=4",
            "agents.speaker.algorithm=ppo", "agents.speaker.ppo_epochs=2"]
    _zero3_matches_zero0(root, "z", args, ("speaker/loss", "speaker/value_loss", "speaker/entropy", "listener/loss",
                                           "listener/kl"))
    # SIGKILL after step 1 (checkpointed) and resume: the partitioned run's figures bit for bit
    z3 = [*args[:1], "train.checkpoint_every=1", *args[2:], "parallel.zero_stage=3", "launch.procs_per_node=2"]
    assert _killed_and_resumed(root, "z3-k", z3, 1) == _timeless_rows(root, "z3")
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(root / "runs" / "z3"), str(tmp_path / "hf")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(root / "runs" / "z0" / "checkpoints")
    want = consolidated_state_dict(folder, ckpt.verify(folder), "agent_speaker")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "speaker").state_dict()
    # the same weights after the same two steps, whichever layout trained them
    assert torch.allclose(got["model.embed_tokens.weight"], want["tok_emb.weight"], atol=1e-5)


@pytest.mark.dist
def test_lora_agents_under_zero3_over_two_processes_train_as_zero0_on_one(root):
    """The shared base, both adapters and a PPO agent's value head partitioned over two ranks; the
    rollout's per-row adapters gather their shards (agents.lora._gathered)."""
    args = ["train.max_steps=2", "train.checkpoint_every=100", "env.args.n_objects=2", "rl.max_new_tokens=4", *LORA,
            "agents.listener.algorithm=ppo"]
    _zero3_matches_zero0(root, "lz", args, ("speaker/policy_loss", "speaker/kl", "listener/value_loss",
                                            "listener/entropy", "listener/kl"))


def test_export_writes_one_hugging_face_folder_per_agent(root, tmp_path):
    out = _marl(root, "exp", "train.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(root / "runs" / "exp"), str(tmp_path / "hf")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(root / "runs" / "exp" / "checkpoints")
    meta = ckpt.verify(folder)
    from model import GPT, GPTConfig

    ids = torch.tensor([[5, 17, 42, 9, 3]])
    for name in ("speaker", "listener"):
        # transformers' own model on the exported folder gives the logits of the agent's weights in our GPT
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / name).eval()
        ours = GPT(GPTConfig(**{**meta["agent_model_configs"][name], "kernels": "torch"}), init=False)
        ours.load_state_dict(consolidated_state_dict(folder, meta, f"agent_{name}"))
        with torch.no_grad():
            want = ours.eval()(ids)
            want = want[0] if isinstance(want, tuple) else want
            got = hf(ids).logits
        assert torch.allclose(got[..., :want.shape[-1]], want, atol=1e-4), name
        assert (tmp_path / "hf" / name / "tokenizer.json").exists()
    a = consolidated_state_dict(folder, meta, "agent_speaker")
    b = consolidated_state_dict(folder, meta, "agent_listener")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=2", "launch.procs_per_node=2"], "tp = pp = 1"),
    (["launch.procs_per_node=3"], "multiple of the processes (3)"),
    (["agents.speaker.init_from=/nonexistent/run"], "no such directory"),
    (["agents.speaker.adapter=lora", "agents.listener.adapter=lora", "agents.speaker.algorithm=ppo",
      "agents.speaker.ppo_epochs=2"], "got speaker 2, listener 1"),
])
def test_bad_settings_stop_with_one_line(root, overrides, message):
    out = _marl(root, "bad", "train.max_steps=2", *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in out.stderr


LORA = ["agents.speaker.adapter=lora", "agents.listener.adapter=lora", "agents.speaker.lora_rank=4",
        "agents.listener.lora_rank=2", "agents.speaker.lr=1e-2", "agents.listener.lr=5e-3"]


def test_lora_agents_share_one_engine_resume_bit_for_bit_and_export_merged(root, tmp_path):
    args = ["train.max_steps=4", "train.checkpoint_every=2", *LORA]
    full = _marl(root, "lora", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    assert _killed_and_resumed(root, "lora-k", args, 3) == _timeless_rows(root, "lora")
    rows = [r for r in metrics(root, "lora") if "agent/speaker/lr" in r]
    assert rows[-1]["agent/speaker/lr"] == 1e-2 and rows[-1]["agent/listener/lr"] == 5e-3  # one group each

    from agents.lora import add_adapters, merged_state_dict
    from model import GPT, GPTConfig
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(root / "runs" / "lora" / "checkpoints")
    meta = ckpt.verify(folder)
    assert meta["components"] == ["lora_0"]  # one engine holds both adapters over one base
    state = consolidated_state_dict(folder, meta, "lora_0")
    base_folder = ckpt.latest_checkpoint(root / "runs" / "base" / "checkpoints")
    base = consolidated_state_dict(base_folder, ckpt.verify(base_folder), "model")
    # the base stayed frozen: every weight under the adapters is the base run's, bit for bit
    for k, v in state.items():
        if ".lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    assert any(".lora_B.speaker" in k and v.abs().sum() > 0 for k, v in state.items())

    res = subprocess.run([sys.executable, "-m", "launch", "export", str(root / "runs" / "lora"), str(tmp_path / "hf")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    cfg = meta["lora"]["lora_0"]
    model = GPT(GPTConfig(**{**cfg["config"], "kernels": "torch"}), init=False)
    add_adapters(model, cfg["adapters"])
    model.load_state_dict(state)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    for name in ("speaker", "listener"):
        ref = GPT(GPTConfig(**{**cfg["config"], "kernels": "torch"}), init=False)
        ref.load_state_dict(merged_state_dict(model, name))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / name).eval()
        with torch.no_grad():
            want = ref.eval()(ids)
            want = want[0] if isinstance(want, tuple) else want
            got = hf(ids).logits
        assert torch.allclose(got[..., :want.shape[-1]], want, atol=1e-4), name


PPO = ["agents.speaker.algorithm=ppo", "agents.speaker.ppo_epochs=2", "agents.listener.algorithm=ppo",
       "agents.listener.ppo_epochs=3", "agents.listener.adapter=lora", "agents.listener.lora_rank=2",
       "agents.listener.lr=5e-3"]


def test_ppo_agents_train_value_heads_resume_bit_for_bit_and_export_without_them(root, tmp_path):
    """A full-weight PPO speaker (its own engine, 2 passes) and a LoRA PPO listener (3 passes)."""
    args = ["train.max_steps=4", "train.checkpoint_every=2", "env.args.n_objects=2", "rl.max_new_tokens=4", *PPO]  # returns vary
    full = _marl(root, "ppo", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    assert _killed_and_resumed(root, "ppo-k", args, 3) == _timeless_rows(root, "ppo")
    rows = [r for r in metrics(root, "ppo") if "agent/speaker/return" in r]
    assert 0 < sum(r["success"] for r in rows) < len(rows)
    for name in ("speaker", "listener"):
        for r in rows:
            assert r[f"agent/{name}/value_loss"] >= 0 and 0 <= r[f"agent/{name}/clip_fraction"] <= 1
        # the figures of the last pass: the policy has moved from the one that played the episodes
        assert any(r[f"agent/{name}/approx_kl"] > 0 for r in rows), name

    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(root / "runs" / "ppo" / "checkpoints")
    meta = ckpt.verify(folder)
    assert meta["components"] == ["agent_speaker", "lora_0"]
    speaker, lora = (consolidated_state_dict(folder, meta, c) for c in meta["components"])
    # each value head trained from zero, the LoRA agent's beside its adapter
    assert speaker["value_heads.speaker.weight"].abs().sum() > 0
    assert lora["value_heads.listener.weight"].abs().sum() > 0
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(root / "runs" / "ppo"), str(tmp_path / "hf")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    from model import GPT, GPTConfig

    ours = GPT(GPTConfig(**{**meta["agent_model_configs"]["speaker"], "kernels": "torch"}), init=False)
    ours.load_state_dict({k: v for k, v in speaker.items() if not k.startswith("value_heads.")})
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        want = ours.eval()(ids)
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "speaker").eval()(ids).logits
    assert torch.allclose(got[..., :want.shape[-1]], want, atol=1e-4)
    assert (tmp_path / "hf" / "listener" / "config.json").exists()


def test_a_shared_policy_is_one_engine_and_swapping_it_changes_nothing(root):
    """agents.listener.policy_of=speaker: both roles act and learn with the speaker's weights (one
    engine, both losses in each update); env.eval_swap then swaps a policy with itself."""
    out = _marl(root, "shared", "train.max_steps=3", "env.args.n_objects=2", "rl.max_new_tokens=4",
                "agents.listener.policy_of=speaker",
                "env.eval_swap={speaker: listener, listener: speaker}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "listener (reinforce, alpha 0.001, policy of speaker)" in out.stdout
    summary = json.loads((root / "runs" / "shared" / "summary.json").read_text())
    assert summary["success_swapped"] == summary["success"]
    from trainer import checkpoint as ckpt

    meta = ckpt.verify(ckpt.latest_checkpoint(root / "runs" / "shared" / "checkpoints"))
    assert meta["components"] == ["agent_speaker"]
    rows = [r for r in metrics(root, "shared") if "agent/listener/policy_loss" in r]
    assert len(rows) == 3 and all(r["agent/listener/lr"] == r["agent/speaker/lr"] for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["agents.listener.policy_of=judge"], "agents.listener.policy_of=judge: must name another agent"),
    (["agents.listener.policy_of=speaker", "agents.listener.lr=1e-3"],
     "agents.listener.lr comes from speaker (0.003); leave it unset (got 0.001)"),
    (["env.eval_swap={speaker: judge}"], "env.eval_swap: speaker: judge names an agent"),
])
def test_bad_shared_policy_settings_stop_with_one_line(root, overrides, message):
    out = _marl(root, "bad-shared", "train.max_steps=1", *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr


def test_a_frozen_lora_agent_keeps_the_base(root):
    out = _marl(root, "lora-frozen", "train.max_steps=2", *LORA, "agents.listener.trainable=false")
    assert out.returncode == 0, out.stderr[-3000:]
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(root / "runs" / "lora-frozen" / "checkpoints")
    state = consolidated_state_dict(folder, ckpt.verify(folder), "lora_0")
    frozen_b = [v for k, v in state.items() if ".lora_B.listener" in k]
    assert frozen_b and all(torch.count_nonzero(v) == 0 for v in frozen_b)  # peft's init B = 0, never stepped
    assert any(torch.count_nonzero(v) > 0 for k, v in state.items() if ".lora_B.speaker" in k)


def test_an_env_that_raises_stops_the_run_naming_where_and_keeps_the_last_checkpoint(root):
    out = _marl(root, "envfault", "train.max_steps=6", "train.checkpoint_every=2", RECIPES_FAULT_ENV_RAISE_AT_STEP="4")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "step 4: env 'signaling' raised at episode 0" in last and "acting agent(s) speaker" in last, last
    assert "injected env fault" in last and "step_00000002 is kept" in last and "Traceback" not in out.stderr
    from trainer import checkpoint as ckpt

    folder = ckpt.latest_checkpoint(root / "runs" / "envfault" / "checkpoints")
    assert folder.name == "step_00000002" and ckpt.verify(folder)["step"] == 2


def test_sigterm_saves_every_agent_then_resume_finishes_the_run(root):
    import signal
    import time

    cmd = [sys.executable, "-m", "launch", "train", "marl-signaling", "run.name=term", f"run.output_dir={root}/runs",
           f"data.cache_dir={root}/cache", *agents_args(root, "train.max_steps=100000", "train.eval_every=1000")]
    proc = subprocess.Popen(cmd, cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mpath = root / "runs" / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (mpath.exists() and mpath.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received: saved checkpoint" in err.strip().splitlines()[-1]
    from trainer import checkpoint as ckpt

    folder = ckpt.latest_checkpoint(root / "runs" / "term" / "checkpoints")
    meta = ckpt.verify(folder)
    assert meta["components"] == ["agent_speaker", "agent_listener"] and meta["step"] >= 2
    assert (root / "runs" / "term" / "agents.png").exists()  # the tracker was finished (plot written)
    out = _marl(root, "term", f"train.max_steps={meta['step'] + 1}", "train.resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((root / "runs" / "term" / "summary.json").read_text())["steps"] == meta["step"] + 1
