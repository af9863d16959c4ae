"""PPO's value heads (agents.value) and the advantages of a PPO agent (agents.learners) against
independent references: V(s) against a float64 forward of the prompt alone, gradients that reach only
what the agent trains, and A = whiten(G - V) against returns and values recomputed by hand from a
real multi-step rollout."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from agents.envs import make_env
from agents.learners import Agent, _agent_batch
from agents.lora import adapter_parameters, add_adapters, use_adapter
from agents.policy import AgentPolicy, build_inputs, token_logprobs
from agents.rollout import rollout
from agents.value import add_value_heads, strip_value_heads, value_head
from model import GPT, GPTConfig
from trainer.data import train_bpe_tokenizer
from trainer.dims import ParallelDims
from trainer.schema import AgentSection, Recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXTS = ["first (send)\nTask: a + b\nYou know: a = 12\nMessage:\nfirst: 12\n",
         "second (answer)\nTask: a + b\nYou know: b = 30\nfirst: 12\nsecond: 30\nAnswer:\nsecond: 42\n"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, 300)


def build(style: str, vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    kw = {"n_kv_head": 2} if style == "llama" else {}
    return GPT(GPTConfig(style=style, vocab_size=vocab, n_layer=2, n_head=4, d_model=32, max_seq_len=96,
                         init_std=0.1, kernels="torch", **kw)).eval()


def randomise(head, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def prompt_only_value(model, head, prompt: list[int]) -> float:
    """float64: the final-normed hidden state after the prompt's last token, through the head."""
    m, h = copy.deepcopy(model).double(), copy.deepcopy(head).double()
    with torch.no_grad():
        x = m.hidden_states(torch.tensor([prompt]))[0, -1]
        return float(h(m.final_norm(x)))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_value_is_the_head_on_the_hidden_state_after_the_prompt(tok, style):
    model = build(style, tok.get_vocab_size())
    state = torch.random.get_rng_state()
    add_value_heads(model, ["first", "second"])
    assert torch.equal(torch.random.get_rng_state(), state)  # zero init: no random draw
    head = value_head(model, "second")
    prompts = [[5, 9, 11, 40, 7], [3, 8], [12, 4, 4, 4, 4, 4, 4, 30]]
    generated = [[21, 22], [23, 24, 25, 26], [27]]
    ids, targets = build_inputs(prompts, generated)
    assert torch.equal(token_logprobs(model, ids, targets, value_head=head).values, torch.zeros(3))
    randomise(head, 1)
    with_v = token_logprobs(model, ids, targets, value_head=head)
    plain = token_logprobs(model, ids, targets)
    assert torch.equal(with_v.logprobs, plain.logprobs) and torch.equal(with_v.entropy, plain.entropy)
    want = torch.tensor([prompt_only_value(model, head, p) for p in prompts], dtype=torch.float64)
    assert torch.allclose(with_v.values.double(), want, atol=1e-5), (with_v.values, want)
    # a plain GPT loads the state without the heads
    fresh = build(style, tok.get_vocab_size(), seed=3)
    fresh.load_state_dict(strip_value_heads(model.state_dict()))
    with pytest.raises(ValueError, match="already has a value head"):
        add_value_heads(model, ["first"])
    with pytest.raises(ValueError, match="algorithm must be ppo"):
        value_head(model, "third")


def test_value_loss_reaches_the_trunk_and_the_head_of_a_full_weight_agent(tok):
    model = build("llama", tok.get_vocab_size()).train()
    add_value_heads(model, ["first"])
    head = value_head(model, "first")
    randomise(head, 4)  # at zero the trunk would get no gradient through the head
    ids, targets = build_inputs([[5, 9, 11], [3, 8, 2, 2]], [[21, 22], [23]])
    v = token_logprobs(model, ids, targets, value_head=head).values
    ((v - torch.tensor([1.0, 0.5])) ** 2).sum().backward()
    assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0  # the critic shares the trunk
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum() == 0


def test_a_lora_agents_value_loss_moves_only_its_adapter_and_its_head(tok):
    model = build("llama", tok.get_vocab_size()).train()
    add_adapters(model, {n: {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"]} for n in ("first", "second")})
    add_value_heads(model, ["first", "second"])
    for n in ("first", "second"):  # B = 0 at the start would give the adapters' A no gradient
        randomise(value_head(model, n), 2)
        with torch.no_grad():
            for p in adapter_parameters(model, n):
                p.add_(0.1)
    ids, targets = build_inputs([[5, 9, 11], [3, 8, 2, 2]], [[21, 22], [23]])
    with use_adapter(model, "first"):
        v = token_logprobs(model, ids, targets, value_head=value_head(model, "first")).values
    (v ** 2).sum().backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(("lora_" in n and ".first" in n) or n.startswith("value_heads.first.") for n in moved), moved
    assert "value_heads.first.weight" in moved
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n
               and not n.startswith("value_heads."))


def test_ppo_advantages_are_whitened_returns_minus_values_of_a_real_rollout(tok):
    """split_arith: each agent acts twice per episode (messages, then the second's answer), so
    returns are discounted over steps; rewards are replaced by random ones to make G informative."""
    model = build("llama", tok.get_vocab_size())
    add_value_heads(model, ["first", "second"])
    for i, n in enumerate(("first", "second")):
        randomise(value_head(model, n), 10 + i)
    policies = {n: AgentPolicy(n, tok, max_new_tokens=3) for n in ("first", "second")}
    out = rollout(lambda: make_env("split_arith", turns=3, max_operand=9), policies, model, episodes=6,
                  generator=torch.Generator().manual_seed(5))
    rng = random.Random(0)
    for ar in out.agents.values():
        ar.rewards = [[rng.choice([0.0, 0.5, 1.0]) for _ in r] for r in ar.rewards]
    recipe = Recipe(agents={"first": {}, "second": {}}, env={"name": "split_arith"})
    dims = ParallelDims.plan(1, 0)
    for name, gamma in (("first", 0.9), ("second", 0.5)):
        settings = AgentSection(algorithm="ppo", gamma=gamma, returns="reward_to_go")
        agent = Agent(name, settings, policies[name], model)
        ab = _agent_batch(agent, out.agents[name], model, recipe, dims, 6)
        ar = out.agents[name]
        acts = sorted(ar.actions, key=lambda a: (a.episode, a.step))
        G = [sum(gamma ** (k - a.step) * r for k, r in enumerate(ar.rewards[a.episode]) if k >= a.step) for a in acts]
        V = [prompt_only_value(model, value_head(model, name), a.prompt) for a in acts]
        d = torch.tensor(G, dtype=torch.float64) - torch.tensor(V, dtype=torch.float64)
        want = (d - d.mean()) / (d.var(unbiased=False).sqrt() + 1e-8)
        assert len(acts) == 12  # two actions of this agent in each of the 6 episodes
        assert torch.allclose(ab.returns.double(), torch.tensor(G, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(ab.old_values.double(), torch.tensor(V, dtype=torch.float64), atol=1e-5)
        rows = torch.stack([ab.tokens.advantages[i][ab.tokens.mask[i]][0] for i in range(len(acts))]).double()
        assert torch.allclose(rows, want, atol=1e-4), (rows, want)
        # the log-probabilities before the update are the policy's, on the same layout
        ref = token_logprobs(model, ab.tokens.input_ids, ab.tokens.targets)
        assert torch.equal(ab.old_logprobs, ref.logprobs)
