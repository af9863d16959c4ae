"""agents.debate (recipe debate-arith): the problem sets, the selection of fine-tuning data from the
majority against hand computations, the SFT loss against plain PyTorch in float64 (at T = 1 and at the
sampling temperature, whose expected gradient on the agent's own samples is 0), the recipe chain at
reduced size through the CLI (metrics, summary, plot), SIGKILL mid-iteration + resume bit for bit (with
shared weights, and with separate critics and split data), export per agent, bad configs in one line
(exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from agents.debate import problems
from agents.debate.selection import debate_rows, single_rows
from agents.debate.sft import response_loss, sft_batches
from agents.rollout import Action
from tests.test_marl_train import run_train
from tests.trainutil import REPO, env

# ---- problems ----------------------------------------------------------------------------------------


def test_heldout_is_fixed_per_seed_distinct_and_training_sets_avoid_it():
    a, b = problems.heldout(7, 500), problems.heldout(7, 500)
    assert a == b and len(set(a)) == 500 and problems.heldout(8, 500) != a
    assert all(len(p) == 6 and all(0 <= x <= 29 for x in p) for p in a)
    # a tiny range (2^6 = 64 problems) so that draws do hit the held-out set and must be drawn again
    small = problems.heldout(3, 40, lo=0, hi=1)
    train = problems.training(3, 0, 200, set(small), lo=0, hi=1)
    assert len(train) == 200 and not set(train) & set(small) and len(set(train)) == 24
    assert problems.training(3, 0, 200, set(small), 0, 1) == train and problems.training(3, 1, 200, set(small), 0, 1) != train


# ---- selection -----------------------------------------------------------------------------------------


def _rollout(texts: dict[str, list[list[str]]]) -> dict:
    """agent -> AgentRollout-like object from texts[agent][episode][round] (prompt/tokens mark where they came from)."""
    out = {}
    for a, episodes in texts.items():
        acts = [Action(a, k, r, [k, r, len(a)], [ord(c) for c in t[:3]], [], [], t, "stop")
                for k, rounds in enumerate(episodes) for r, t in enumerate(rounds)]
        out[a] = SimpleNamespace(actions=acts)
    return out


def test_debate_rows_keep_each_agents_responses_that_agree_with_the_final_majority():
    texts = {  # three problems, two rounds
        "agent_0": [["=5", "=5"], ["=1", "=2"], ["=7", "=8"]],
        "agent_1": [["=4", "=5"], ["=2", "=2"], ["=7", "=9"]],
        "agent_2": [["=5", "=6"], ["=3", "=3"], ["=7", "=7"]],
    }
    rows, kinds = debate_rows(_rollout(texts), 3, min_votes=2)
    # problem 0: final answers 5, 5, 6 -> label 5; problem 1: 2, 2, 3 -> 2; problem 2: 8, 9, 7 -> no label
    assert kinds["agent_0"] == {"labelled": 2, "generator": 1, "confirmed": 1, "corrected": 1}
    assert rows["agent_0"] == [([0, 0, 7], [61, 53]), ([0, 1, 7], [61, 53]), ([1, 1, 7], [61, 50])]
    assert kinds["agent_1"] == {"labelled": 2, "corrected": 1, "generator": 1, "confirmed": 1}
    assert [r[0][:2] for r in rows["agent_1"]] == [[0, 1], [1, 0], [1, 1]]
    assert kinds["agent_2"] == {"labelled": 2, "generator": 1}
    assert [r[0][:2] for r in rows["agent_2"]] == [[0, 0]]
    rows3, _ = debate_rows(_rollout(texts), 3, min_votes=3)
    assert all(r == [] for r in rows3.values())
    # separate critics: the same rows, rounds 2..R in the seat's critic, round 1 in the agent
    critics = {f"agent_{i}": f"critic_{i}" for i in range(3)}
    split, split_kinds = debate_rows(_rollout(texts), 3, min_votes=2, critics=critics)
    assert split_kinds == kinds and set(split) == {*texts, *critics.values()}
    for a, c in critics.items():
        assert split[a] == [r for r in rows[a] if r[0][1] == 0]
        assert split[c] == [r for r in rows[a] if r[0][1] == 1]
    # agent_data=split: problem k's rows only in seat k mod 3 (agent_2's problem 2 has no label)
    dealt, dealt_kinds = debate_rows(_rollout(texts), 3, min_votes=2, split=True)
    assert dealt == {"agent_0": [r for r in rows["agent_0"] if r[0][0] == 0],
                     "agent_1": [r for r in rows["agent_1"] if r[0][0] == 1], "agent_2": []}
    assert dealt_kinds == {"agent_0": {"labelled": 2, "generator": 1, "confirmed": 1},
                           "agent_1": {"labelled": 2, "generator": 1, "confirmed": 1}, "agent_2": {"labelled": 2}}
    both, _ = debate_rows(_rollout(texts), 3, min_votes=2, critics=critics, split=True)
    assert both["agent_1"] == [r for r in dealt["agent_1"] if r[0][1] == 0]
    assert both["critic_1"] == [r for r in dealt["agent_1"] if r[0][1] == 1]


def test_single_rows_keep_the_samples_that_agree_with_their_own_majority():
    texts = {f"agent_{j}": [[t]] for j, t in enumerate(["=3", "=4", "=3", "x", "=3", "=4"])}
    rows, kinds = single_rows(_rollout(texts), 1, min_votes=2)
    assert kinds == {"labelled": 1, "generator": 3} and [r[0][2] for r in rows] == [7, 7, 7]
    tie = {f"agent_{j}": [[t]] for j, t in enumerate(["=3", "=4", "=3", "=4"])}
    assert single_rows(_rollout(tie), 1, min_votes=2)[0] == []


# ---- SFT -----------------------------------------------------------------------------------------------


def _tiny_gpts(n=1):
    """n tiny byte-vocabulary GPTs (other weights each), seeded 0, in eval mode: the SFT-loss tests' models."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=32, vocab_size=50, max_seq_len=32, kernels="torch")
    return [GPT(cfg).eval() for _ in range(n)]


def test_response_loss_is_the_cross_entropy_of_the_response_tokens_only():
    (model,) = _tiny_gpts()
    rows = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10, 11]), ([12], [13])]
    got = response_loss(model, rows)
    ref = model.double()
    nll, count = 0.0, 0
    for prompt, resp in rows:
        ids = torch.tensor([prompt + resp])
        logp = torch.log_softmax(ref(ids).logits[0] if hasattr(ref(ids), "logits") else ref(ids)[0], dim=-1)
        for i, t in enumerate(resp):
            nll -= logp[len(prompt) + i - 1, t].item()
            count += 1
    assert got.item() == pytest.approx(nll / count, rel=1e-5)


def test_response_loss_with_kl_base_adds_the_exact_kl_to_the_reference_per_response_token():
    model, reference = _tiny_gpts(2)  # other weights
    rows = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10, 11]), ([12], [13])]
    got = response_loss(model, rows, reference, kl=0.3)
    assert response_loss(model, rows, reference, kl=0.0).item() == pytest.approx(response_loss(model, rows).item())
    assert response_loss(model, rows, model, kl=0.3).item() == pytest.approx(response_loss(model, rows).item(), rel=1e-5)
    m64, r64 = model.double(), reference.double()
    total, count = 0.0, 0
    for prompt, resp in rows:  # float64, whole-sequence forwards, one row at a time
        ids = torch.tensor([prompt + resp])
        logp, logq = torch.log_softmax(m64(ids)[0], -1), torch.log_softmax(r64(ids)[0], -1)
        for i, t in enumerate(resp):
            pos = len(prompt) + i - 1
            kld = (logp[pos].exp() * (logp[pos] - logq[pos])).sum().item()
            total += -logp[pos, t].item() + 0.3 * kld
            count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        response_loss(model, rows, None, kl=0.3)


@pytest.mark.parametrize("kl", [0.0, 0.3])
def test_response_loss_at_a_temperature_fits_softmax_of_logits_over_t(kl):
    """debate.sft_tempered: the NLL (and the anchor's KL) of softmax(logits / T), against float64."""
    model, reference = _tiny_gpts(2)
    rows = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10, 11]), ([12], [13])]
    got = response_loss(model, rows, reference, kl=kl, temperature=0.7)
    assert got.item() != pytest.approx(response_loss(model, rows, reference, kl=kl).item(), rel=1e-3)
    m64, r64 = model.double(), reference.double()
    total, count = 0.0, 0
    for prompt, resp in rows:
        ids = torch.tensor([prompt + resp])
        logp, logq = torch.log_softmax(m64(ids)[0] / 0.7, -1), torch.log_softmax(r64(ids)[0] / 0.7, -1)
        for i, t in enumerate(resp):
            pos = len(prompt) + i - 1
            total += -logp[pos, t].item() + kl * (logp[pos].exp() * (logp[pos] - logq[pos])).sum().item()
            count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_tempered_sft_on_its_own_samples_is_a_no_op_in_expectation_and_plain_sft_is_not():
    """Why debate.sft_tempered exists: the expected gradient of the SFT loss over responses drawn at T = 0.7
    (exact: every one-token response weighted by its probability) is 0 when the loss is taken at T = 0.7, and
    not when it is taken at T = 1 (that step pulls p_1 towards the sharper p_0.7)."""
    model = _tiny_gpts()[0].double()
    prompt, T = [1, 2, 3], 0.7
    with torch.no_grad():
        p_t = torch.softmax(model(torch.tensor([prompt]))[0, -1] / T, -1)
    params = [p for p in model.parameters() if p.requires_grad]

    def expected_grad(temperature):
        total = [torch.zeros_like(p) for p in params]
        for y in range(50):
            g = torch.autograd.grad(response_loss(model, [(prompt, [y])], temperature=temperature), params,
                                    allow_unused=True)
            total = [t + p_t[y] * (x if x is not None else 0) for t, x in zip(total, g)]
        return torch.cat([t.flatten() for t in total]).norm().item()

    one = torch.autograd.grad(response_loss(model, [(prompt, [7])], temperature=T), params, allow_unused=True)
    scale = torch.cat([x.flatten() for x in one if x is not None]).norm().item()
    assert expected_grad(T) < 1e-6 * scale  # token_logprobs takes its log-softmax in float32
    assert expected_grad(1.0) > 1e-3 * scale  # 6e-3 here: over 10^4 times the tempered one


def test_sft_batches_are_epochs_of_permutations_from_the_agents_generator():
    rows = list(range(10))
    b = sft_batches(rows, 2, 4, torch.Generator().manual_seed(1))
    assert [len(x) for x in b] == [4, 4, 2, 4, 4, 2]
    assert sorted(b[0] + b[1] + b[2]) == rows and sorted(b[3] + b[4] + b[5]) == rows
    assert b == sft_batches(rows, 2, 4, torch.Generator().manual_seed(1))
    assert b != sft_batches(rows, 2, 4, torch.Generator().manual_seed(2))


# ---- the recipe end to end ---------------------------------------------------------------------------

# Operands in [0, 2] (answers in [-4, 8]) and long enough for the base to write the answer's format, so
# that agents agree often and fine-tune at this size.
SMALL = "env.args.max_operand=2"
BASE = [SMALL, "model.n_layer=2", "model.n_head=2", "model.n_kv_head=2", "model.d_model=64", "model.kernels=torch",
        "data.max_documents=600", "parallel.micro_batch=8", "train.max_steps=150", "train.eval_every=150",
        "train.checkpoint_every=150", "train.eval_batches=2", "train.progress=false", "tracking.wandb=disabled",
        "train.sample_tokens=4", "optim.warmup_steps=5", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("debate")
    out = run_train(root, "base", *BASE, recipe="debate-arith-base")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _args(root, *extra):
    """The recipe at reduced size, with one set of weights per agent, the KL anchor and SFT at T = 1 (the
    setting before separate critics; the recipe's own, critics, no anchor and SFT at the sampling
    temperature, is the critics test's: `extra` wins)."""
    base = root / "runs" / "base"
    return [*(f"agents.agent_{i}.init_from={base}" for i in range(3)), SMALL, "debate.iterations=2",
            "debate.train_problems=12", "debate.heldout_problems=10", "debate.sft_batch=4", "rl.max_new_tokens=24",
            "debate.critics=shared", "debate.kl_base=0.5", "debate.sft_tempered=false", "train.progress=false",
            "tracking.wandb=disabled", *extra]


def _timeless(root, name):
    rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "iteration_s"} for r in rows]


@pytest.fixture(scope="module")
def plain(root):
    out = run_train(root, "plain", *_args(root), recipe="debate-arith")
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / "plain"


def test_the_recipe_logs_every_iteration_per_agent_and_writes_summary_and_plot(plain, root):
    rows = _timeless(root, "plain")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        for k in ("single", "vote", "debate", "diversity", "baseline/single", "baseline/vote",
                  *(f"agent/agent_{i}/single" for i in range(3))):
            assert 0.0 <= r[k] <= 1.0
        assert r["single"] == pytest.approx(sum(r[f"agent/agent_{i}/single"] for i in range(3)) / 3)
    for r in rows[1:]:
        assert r["train/debate_tokens"] > 0 and r["train/single_tokens"] > 0
        assert all(f"agent/agent_{i}/sft_steps" in r for i in range(3)) and "baseline/sft_steps" in r
    # the base writes the format well enough that every agent fine-tunes on something
    assert all(sum(r[f"agent/agent_{i}/sft_steps"] for r in rows[1:]) > 0 for i in range(3))
    s = json.loads((plain / "summary.json").read_text())
    assert [r["iteration"] for r in s["per_iteration"]] == [0, 1, 2] and s["baseline_samples"] == 6
    assert set(s["goals"]) >= {"debate_minus_single_before", "diversity_ratio", "debate_minus_baseline_after"}
    assert s["generated_tokens"]["debate"] == sum(r["train/debate_tokens"] for r in rows[1:])
    assert (plain / "debate.png").stat().st_size > 0
    assert sorted(p.stem for p in (plain / "tokenizers").iterdir()) == ["agent_0", "agent_1", "agent_2", "single"]


def test_agents_diverge_from_one_base_by_their_own_data(plain):
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(plain / "checkpoints")
    meta = ckpt.verify(folder)
    states = [consolidated_state_dict(folder, meta, f"agent_agent_{i}") for i in range(3)]
    key = "tok_emb.weight"
    assert not torch.equal(states[0][key], states[1][key]) and not torch.equal(states[1][key], states[2][key])


def test_sigkill_mid_iteration_then_resume_reproduces_the_run_bit_for_bit(plain, root):
    rows = _timeless(root, "plain")
    steps_first = sum(rows[1][f"agent/agent_{i}/sft_steps"] for i in range(3)) + rows[1]["baseline/sft_steps"]
    # killed inside iteration 2's fine-tuning (after its first SFT step), then resumed from iteration 1
    killed = run_train(root, "killed", *_args(root), recipe="debate-arith",
                       RECIPES_FAULT_KILL_AFTER_STEP=str(steps_first + 1))
    assert killed.returncode != 0
    assert [r["iteration"] for r in _timeless(root, "killed")] == [0, 1]
    resumed = run_train(root, "killed", *_args(root, "train.resume=auto"), recipe="debate-arith")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000001" in resumed.stdout
    assert _timeless(root, "killed") == rows
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    a, b = (ckpt.latest_checkpoint(root / "runs" / n / "checkpoints") for n in ("plain", "killed"))
    for comp in ("agent_agent_0", "agent_agent_2", "agent_single"):
        sa, sb = consolidated_state_dict(a, ckpt.verify(a), comp), consolidated_state_dict(b, ckpt.verify(b), comp)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_separate_critics_answer_later_rounds_train_on_them_and_resume_bit_for_bit(root):
    """debate.critics=separate: critic_i answers in agent_i's seat from round 2 on and fine-tunes on those
    rows (its rows = the seat's corrected + confirmed), agent_i on round 1's (= generator); the critics'
    weights move apart from the agents'; SIGKILL mid-iteration and resume reproduce the run bit for bit.
    With debate.agent_data=split too: each seat's rows come from its third of the 12 problems; and
    debate.sft_tempered (its loss is checked above), so the tempered steps resume bit for bit too."""
    args = _args(root, "debate.critics=separate", "debate.kl_base=0", "debate.agent_data=split", "debate.baseline=false",
                 "debate.sft_tempered=true")
    out = run_train(root, "critics", *args, recipe="debate-arith")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "separate critics: critic_0, critic_1, critic_2" in out.stdout
    rows = _timeless(root, "critics")
    for r in rows[1:]:
        for i in range(3):
            assert r[f"agent/agent_{i}/rows"] == r[f"agent/agent_{i}/generator"]
            assert r[f"agent/critic_{i}/rows"] == r[f"agent/agent_{i}/corrected"] + r[f"agent/agent_{i}/confirmed"]
            assert r[f"agent/agent_{i}/rows"] <= 4 and r[f"agent/critic_{i}/rows"] <= 4
        assert sum(r[f"agent/agent_{i}/rows"] for i in range(3)) <= round(r["train/labelled"] * 12)
    assert sum(r[f"agent/critic_{i}/sft_steps"] for r in rows[1:] for i in range(3)) > 0
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(root / "runs" / "critics" / "checkpoints")
    meta = ckpt.verify(folder)
    assert meta["agents"] == ["agent_0", "agent_1", "agent_2", "critic_0", "critic_1", "critic_2"]
    agent, critic = (consolidated_state_dict(folder, meta, f"agent_{n}_0") for n in ("agent", "critic"))
    assert not torch.equal(agent["tok_emb.weight"], critic["tok_emb.weight"])
    steps_first = sum(rows[1][f"agent/{n}_{i}/sft_steps"] for n in ("agent", "critic") for i in range(3))
    killed = run_train(root, "critics-killed", *args, recipe="debate-arith",
                       RECIPES_FAULT_KILL_AFTER_STEP=str(steps_first + 1))
    assert killed.returncode != 0
    resumed = run_train(root, "critics-killed", *args, "train.resume=auto", recipe="debate-arith")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _timeless(root, "critics-killed") == rows
    other = ckpt.latest_checkpoint(root / "runs" / "critics-killed" / "checkpoints")
    for comp in ("agent_agent_1", "agent_critic_1"):
        sa, sb = consolidated_state_dict(folder, meta, comp), consolidated_state_dict(other, ckpt.verify(other), comp)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_writes_one_hugging_face_folder_per_agent(plain, root, tmp_path):
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(plain), str(tmp_path / "hf")], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(plain / "checkpoints")
    for agent in ("agent_0", "agent_1", "agent_2", "single"):
        assert (tmp_path / "hf" / agent / "tokenizer.json").is_file()
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / agent).state_dict()
        want = consolidated_state_dict(folder, ckpt.verify(folder), f"agent_{agent}")
        assert torch.equal(got["model.embed_tokens.weight"], want["tok_emb.weight"])


@pytest.mark.parametrize("override,message", [
    ("env.args.agents=1", "error: env: debate_arith: agents must be an integer >= 2 (a debate needs at least two "
                          "agents), got 1"),
    ("debate.samples=1", "debate.samples=1: the baseline votes over its samples, so it needs >= 2"),
    ("env.args.rounds=0", "debate_arith: rounds must be an integer >= 1, got 0"),
    ("parallel.zero_stage=3 debate.kl_base=0.5", "debate.kl_base=0.5 needs parallel.zero_stage <= 2"),
    ("env.args.steps=bytes", "debate_arith: steps must be one of pairwise, digits, columns, got 'bytes'"),
    ("debate.sft_tempered=true agents.agent_1.temperature=0", "debate.sft_tempered fits each agent's sampling "
     "distribution, which a greedy agent has not got: agents.agent_1.temperature must be > 0 (got 0)"),
])
def test_bad_configs_are_one_line_with_exit_2(tmp_path, override, message):
    out = subprocess.run([sys.executable, "-m", "launch", "train", "debate-arith", *override.split(),
                          f"run.output_dir={tmp_path}/runs"], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_separate_critics_need_their_names_free(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch", "train", "debate-arith", "debate.critics=separate",
                          "agents.critic_0.init_from=recipe:debate-arith-base", f"run.output_dir={tmp_path}/runs"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "agents: 'critic_0' is the name of a debate.critics=separate critic" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_debate_keys_need_the_debate_env(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch", "train", "gpt-tiny", "debate.iterations=2",
                          f"run.output_dir={tmp_path}/runs"], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "debate.* keys need env.name=debate_arith" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_issue_range_recipes_chain_at_reduced_size(tmp_path):
    """debate-arith-30-base and debate-arith-30 (operands in [0, 30), `columns` reasoning) as written but
    tiny: the base learns from transcripts in the columns format, and its agents debate at that range."""
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=2", "model.d_model=32", "model.kernels=torch",
            "data.max_documents=40", "parallel.micro_batch=2", "train.max_steps=4", "train.eval_every=4",
            "train.checkpoint_every=4", "train.eval_batches=1", "train.progress=false", "tracking.wandb=disabled",
            "train.sample_tokens=4"]
    out = run_train(tmp_path, "base30", *tiny, recipe="debate-arith-30-base")
    assert out.returncode == 0, out.stderr[-3000:]
    base = yaml.safe_load((tmp_path / "runs" / "base30" / "config.yaml").read_text())
    assert base["env"]["args"] == {"agents": 3, "rounds": 2, "max_operand": 29, "steps": "columns"}
    corpus = [json.loads(x)["text"] for x in (tmp_path / base["data"]["path"]).read_text().splitlines()]
    answers = [line.split(": ", 1)[1] for doc in corpus for line in doc.splitlines() if line.startswith("agent_0: ")]
    assert len(answers) >= 80 and all(re.search(r" \d+-\d+=[+-]\(\d{3}-\d{3}\)( b?\d-\d=\d){3} =-?\d+$", a)
                                      for a in answers), answers[:3]
    assert max(int(x) for doc in corpus for x in re.findall(r"\d+", re.search(r"Q: (\S+)", doc)[1])) > 9
    out = run_train(tmp_path, "debate30", *(f"agents.agent_{i}.init_from={tmp_path / 'runs' / 'base30'}" for i in range(3)),
                    "debate.iterations=1", "debate.train_problems=3", "debate.heldout_problems=3", "debate.sft_batch=2",
                    "train.progress=false", "tracking.wandb=disabled", recipe="debate-arith-30")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "debate30"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["env"]["args"]["steps"] == "columns" and cfg["rl"]["max_new_tokens"] == 112
    assert cfg["debate"]["critics"] == "separate" and cfg["debate"]["kl_base"] == 0.0 and cfg["debate"]["sft_tempered"]
    assert "separate critics: critic_0, critic_1, critic_2" in out.stdout
    assert [r["iteration"] for r in json.loads((run / "summary.json").read_text())["per_iteration"]] == [0, 1]
