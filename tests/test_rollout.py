"""agents.rollout against independent references: K episodes batched against K rollouts of one
episode each (same seeds), greedy and sampled; the sampled first tokens' frequencies against a float64
softmax; rewards, returns, lengths and prompts against a replay of the recorded actions in fresh envs;
the generation calls (one per model per step, across agents); the token tensors against the policy's
recomputation and the objectives' step tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pettingzoo import ParallelEnv

from agents.envs import make_env
from agents.policy import AgentPolicy, token_logprobs
from agents.rl.objectives import discounted_returns, objective_loss
from agents.rollout import agents_per_model, rollout
from model import GPT, GPTConfig
from trainer.data import train_bpe_tokenizer

TEXTS = ["speaker (speaker)\nObject: kite\nspeaker: a red kite\n",
         "listener (listener)\nMessage: red\nCandidates: apple, boat, kite, egg\nlistener: kite\n",
         "first (first)\nTask: a + b\nYou know: a = 12\nfirst: 12\nsecond: 30\nAnswer: 42\n",
         "a round 3, number 17\nb: 5\nc: 6\n"] * 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, 300)


def build(seed, style="gpt2") -> GPT:
    torch.manual_seed(seed)
    kw = {"n_kv_head": 2} if style == "llama" else {}
    return GPT(GPTConfig(style=style, vocab_size=300, n_layer=2, n_head=4, d_model=32, max_seq_len=96,
                         init_std=0.3, **kw)).eval()


@pytest.fixture(scope="module")
def gpt_a():
    return build(0)


@pytest.fixture(scope="module")
def gpt_b():
    return build(1, "llama")


class CountEnv(ParallelEnv):
    """A test env: each episode lasts min_len..max_len steps (drawn at reset); the acting agents are all of
    them (simultaneous) or one per step in turn, told by infos["turn"] only (no turn_agents, the
    generic path of rollout). An acting agent gets len(action) % 5 + its index / 2, a waiting one
    -0.25; an empty action is invalid. fail_at: step() raises at that step."""

    metadata = {"name": "count"}

    def __init__(self, agents=("a", "b"), simultaneous=False, max_len=5, fail_at=None, min_len=1):
        self.possible_agents = list(agents)
        self.simultaneous, self.min_len, self.max_len, self.fail_at = simultaneous, min_len, max_len, fail_at
        self.agents = []

    def _turn(self):
        return list(self.agents) if self.simultaneous else [self.agents[self.t % len(self.agents)]]

    def _infos(self, invalid):
        turn = self._turn() if self.t < self.length else []
        infos = {a: {"turn": a in turn, "invalid": invalid.get(a, False), "invalid_actions": self.invalid[a]}
                 for a in self.agents}
        if self.t >= self.length:
            for a in self.agents:
                infos[a]["success"] = self.total > 3
        return infos

    def _obs(self):
        turn = self._turn() if self.t < self.length else []
        return {a: f"{a} round {self.t}, number {self.number}" if a in turn else "Wait." for a in self.agents}

    def reset(self, seed=None, options=None):
        rng = np.random.default_rng(seed)
        self.length = int(rng.integers(self.min_len, self.max_len + 1))
        self.number = int(rng.integers(0, 100))
        self.t, self.total = 0, 0.0
        self.agents = list(self.possible_agents)
        self.invalid = {a: 0 for a in self.agents}
        return self._obs(), self._infos({})

    def step(self, actions):
        if self.fail_at == self.t:
            raise ValueError("the simulator\nfell over")
        acting = self._turn()
        rewards, invalid = {}, {}
        for i, a in enumerate(self.agents):
            if a in acting:
                text = actions.get(a, "")
                rewards[a] = float(len(text) % 5) + i / 2
                invalid[a] = text == ""
                self.invalid[a] += invalid[a]
            else:
                rewards[a] = -0.25
        self.total += sum(rewards.values())
        self.t += 1
        done = self.t >= self.length
        obs, infos = self._obs(), self._infos(invalid)
        terms = {a: done for a in self.agents}
        truncs = {a: False for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos


def policies_for(tok, agents, **kw):
    return {a: AgentPolicy(a, tok, **{"max_new_tokens": 5, **kw}) for a in agents}


CASES = {
    # env constructor, agents, which model each agent uses ("A" / "B")
    "signaling-shared": (lambda: make_env("signaling", n_objects=4), ["speaker", "listener"], "AA"),
    "split_arith-two-models": (lambda: make_env("split_arith", max_operand=9, turns=2), ["first", "second"], "AB"),
    "count-turns": (lambda: CountEnv(("a", "b", "c")), ["a", "b", "c"], "ABA"),
    "count-simultaneous": (lambda: CountEnv(("a", "b", "c"), simultaneous=True), ["a", "b", "c"], "AAB"),
}


def setup(case, tok, gpt_a, gpt_b, **kw):
    env_fn, agents, which = CASES[case]
    models = {a: gpt_a if w == "A" else gpt_b for a, w in zip(agents, which)}
    return env_fn, policies_for(tok, agents, **kw), models


def same_episode(batched, k, alone, logprob_tol):
    """Episode k of a batched rollout equals episode 0 of a one-episode rollout."""
    assert batched.seeds[k] == alone.seeds[0] and batched.env_seeds[k] == alone.env_seeds[0]
    assert batched.lengths[k] == alone.lengths[0]
    assert batched.final_infos[k] == alone.final_infos[0]
    for name, ra in batched.agents.items():
        rb = alone.agents[name]
        mine = [x for x in ra.actions if x.episode == k]
        assert len(mine) == len(rb.actions)
        for x, y in zip(mine, rb.actions):
            assert (x.step, x.prompt, x.tokens, x.text, x.finish_reason, x.invalid) == \
                (y.step, y.prompt, y.tokens, y.text, y.finish_reason, y.invalid)
            assert np.allclose(x.logprobs, y.logprobs, atol=logprob_tol, rtol=0)
            assert np.allclose(x.entropies, y.entropies, atol=logprob_tol, rtol=0)
        assert ra.rewards[k] == rb.rewards[0] and ra.dones[k] == rb.dones[0]
        assert ra.returns[k] == rb.returns[0]
        assert ra.success[k] == rb.success[0] and ra.invalid_actions[k] == rb.invalid_actions[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_batched_episodes_equal_episodes_run_one_at_a_time(case, temperature, tok, gpt_a, gpt_b):
    """Tokens bit for bit (sampled and greedy); the engine's log-probabilities within 1e-5 (a batched
    forward rounds differently from a one-row one; see agents/rollout.py)."""
    env_fn, pols, models = setup(case, tok, gpt_a, gpt_b, temperature=temperature)
    K = 6
    batched = rollout(env_fn, pols, models, episodes=K, generator=torch.Generator().manual_seed(11))
    assert batched.episodes == K and len(set(batched.seeds)) == K
    for k in range(K):
        alone = rollout(env_fn, pols, models, seeds=[batched.seeds[k]])
        same_episode(batched, k, alone, 1e-5)
    if temperature == 1.0:  # the episodes are not copies of one another
        texts = {tuple(x.text for x in batched.agents[a].actions if x.episode == k)
                 for k in range(K) for a in batched.agents}
        assert len(texts) > K


def test_same_seed_same_rollout_other_seed_differs(tok, gpt_a, gpt_b):
    env_fn, pols, models = setup("count-simultaneous", tok, gpt_a, gpt_b)
    one = rollout(env_fn, pols, models, episodes=5, generator=torch.Generator().manual_seed(3))
    two = rollout(env_fn, pols, models, episodes=5, generator=torch.Generator().manual_seed(3))
    other = rollout(env_fn, pols, models, episodes=5, generator=torch.Generator().manual_seed(4))
    for k in range(5):
        same_episode(one, k, rollout(env_fn, pols, models, seeds=[two.seeds[k]]), 1e-5)
    assert one.seeds == two.seeds and one.agents["a"].actions == two.agents["a"].actions
    assert one.seeds != other.seeds
    assert [x.tokens for x in one.agents["a"].actions] != [x.tokens for x in other.agents["a"].actions]
    # The global RNG neither decides nor moves when a generator is given.
    state = torch.get_rng_state()
    torch.manual_seed(999)
    again = rollout(env_fn, pols, models, episodes=5, generator=torch.Generator().manual_seed(3))
    assert again.agents["b"].actions == one.agents["b"].actions
    torch.set_rng_state(state)


def test_sampled_first_tokens_follow_the_softmax(tok, gpt_a):
    """600 episodes of the signaling game with the target fixed: the speaker's one-token messages
    have the frequencies of softmax(top-5 of logits / 0.8) of its prompt, computed in float64 from a
    plain forward (chi-square, 4 degrees of freedom, under the 99.9% quantile 18.47)."""
    pols = {"speaker": AgentPolicy("speaker", tok, temperature=0.8, top_k=5, max_new_tokens=1),
            "listener": AgentPolicy("listener", tok, max_new_tokens=1)}
    K = 600
    out = rollout(lambda: make_env("signaling", n_objects=4), pols, gpt_a, episodes=K,
                  generator=torch.Generator().manual_seed(0), reset_options={"target": "boat"})
    first = [x.tokens[0] for x in out.agents["speaker"].actions]
    assert len(first) == K and out.calls == [("speaker+listener", K)] * 2
    prompt = pols["speaker"].prompt_ids("Object: boat")
    assert all(x.prompt == prompt for x in out.agents["speaker"].actions)
    with torch.no_grad():
        logits = copy.deepcopy(gpt_a).double()(torch.tensor([prompt]))[0, -1] / 0.8
    top = torch.topk(logits, 5)
    probs = torch.softmax(top.values, dim=-1)
    counts = torch.tensor([first.count(int(i)) for i in top.indices], dtype=torch.float64)
    assert counts.sum() == K  # nothing outside the top 5
    expected = K * probs
    assert expected.min() > 5
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts.tolist(), expected.tolist())


def replay(env_fn, out, pols, max_len=96):
    """Rerun every episode in a fresh env from its reset seed with the recorded action texts: the
    rewards, lengths, prompts and final infos the env gives."""
    K = out.episodes
    rewards = {a: [[] for _ in range(K)] for a in out.agents}
    lengths, prompts, finals = [], {a: [] for a in out.agents}, []
    invalid = {a: [] for a in out.agents}
    texts = {(x.episode, x.step, a): x.text for a, r in out.agents.items() for x in r.actions}
    for k in range(K):
        env = env_fn()
        obs, infos = env.reset(seed=out.env_seeds[k])
        t = 0
        while env.agents:
            acting = [a for a in env.agents if infos[a].get("turn", True)]
            for a in acting:
                prompts[a].append(pols[a].prompt_ids(obs[a], max_tokens=max_len - pols[a].max_new_tokens))
            obs, rew, terms, truncs, infos = env.step({a: texts[(k, t, a)] for a in acting})
            for a in out.agents:
                rewards[a][k].append(rew[a])
            for a in acting:
                invalid[a].append(infos[a]["invalid"])
            t += 1
        lengths.append(t)
        finals.append(infos)
    return rewards, lengths, prompts, finals, invalid


@pytest.mark.parametrize("case", ["count-turns", "count-simultaneous", "split_arith-two-models", "signaling-shared"])
def test_returns_are_the_env_rewards_summed(case, tok, gpt_a, gpt_b):
    env_fn, pols, models = setup(case, tok, gpt_a, gpt_b)
    out = rollout(env_fn, pols, models, episodes=8, generator=torch.Generator().manual_seed(5))
    rewards, lengths, prompts, finals, invalid = replay(env_fn, out, pols)
    assert out.lengths == lengths
    for a, r in out.agents.items():
        assert r.rewards == rewards[a]
        assert r.returns == [sum(x) for x in rewards[a]]  # undiscounted: gamma is the objectives' job
        assert [x.prompt for x in r.actions] == prompts[a]
        assert r.success == [f[a]["success"] for f in finals]
        assert r.invalid_actions == [f[a]["invalid_actions"] for f in finals]
        assert [x.invalid for x in r.actions] == invalid[a]
        assert [d[-1] for d in r.dones] == [True] * 8 and not any(any(d[:-1]) for d in r.dones)
    if case.startswith("count"):
        assert any(v != 0 for r in out.agents.values() for v in r.returns)
    else:  # random text: most answers name no candidate / hold no integer
        assert any(x.invalid for r in out.agents.values() for x in r.actions)


def test_episodes_of_different_lengths_finish_independently(tok, gpt_a, gpt_b):
    env_fn, pols, models = setup("count-simultaneous", tok, gpt_a, gpt_b)
    out = rollout(env_fn, pols, models, episodes=10, generator=torch.Generator().manual_seed(2))
    assert len(set(out.lengths)) >= 3  # lengths drawn in 1..5
    # One call per model per step, over the episodes still running: a and b (one model) together.
    expected = []
    for t in range(max(out.lengths)):
        n = sum(L > t for L in out.lengths)
        expected += [("a+b", 2 * n), ("c", n)]
    assert out.calls == expected
    for r in out.agents.values():
        assert [x.step for x in r.actions if x.episode == 0] == list(range(out.lengths[0]))
        assert [len(x) for x in r.rewards] == out.lengths
    # The agent-by-agent baseline makes one call per agent and produces the same tokens.
    alone = rollout(env_fn, pols, models, episodes=10, generator=torch.Generator().manual_seed(2), batch_agents=False)
    assert [c[0] for c in alone.calls[:3]] == ["a", "b", "c"] and len(alone.calls) == 3 * max(out.lengths)
    for a in out.agents:
        assert [x.tokens for x in alone.agents[a].actions] == [x.tokens for x in out.agents[a].actions]


def test_turn_based_calls_batch_across_agents_of_one_model(tok, gpt_a, gpt_b):
    """In a turn-based env the acting agent differs between episodes' steps only through their
    lengths; with one model for all agents every step is one call; with two, one per model."""
    env_fn, pols, _ = setup("count-turns", tok, gpt_a, gpt_b)
    out = rollout(env_fn, pols, gpt_a, episodes=6, generator=torch.Generator().manual_seed(1))
    assert [c[0] for c in out.calls] == ["a+b+c"] * max(out.lengths)
    assert [c[1] for c in out.calls] == [sum(L > t for L in out.lengths) for t in range(max(out.lengths))]


def test_models_per_step_act_at_their_steps(tok, gpt_a, gpt_b):
    """models as a list, one spec per step, the last for later steps (a debate's separate critics): every
    action's tokens are scored by the model of its step (a plain forward of that model, not of the other),
    batched episodes still equal episodes run alone, one call per model per step, and a one-element list
    is the same rollout as the spec itself."""
    env_fn, pols, models = setup("count-simultaneous", tok, gpt_a, gpt_b, temperature=1.0)
    per_step = [models, {a: gpt_b for a in models}]
    out = rollout(env_fn, pols, per_step, episodes=6, generator=torch.Generator().manual_seed(5))
    assert max(out.lengths) >= 3
    for a, r in out.agents.items():
        batch = r.token_batch()
        for step, model, other in [(0, models[a], gpt_b if models[a] is gpt_a else gpt_a), (1, gpt_b, gpt_a)]:
            rows = (batch.step == step) if step == 0 else (batch.step >= 1)
            if not rows.any() or model is other:
                continue
            mine = token_logprobs(model, batch.input_ids[rows], batch.targets[rows])
            theirs = token_logprobs(other, batch.input_ids[rows], batch.targets[rows])
            assert torch.allclose(mine.logprobs, batch.old_logprobs[rows], atol=1e-5, rtol=0)
            assert not torch.allclose(theirs.logprobs, batch.old_logprobs[rows], atol=1e-3, rtol=0)
    for k in range(6):
        same_episode(out, k, rollout(env_fn, pols, per_step, seeds=[out.seeds[k]]), 1e-5)
    steps = [sum(L > t for L in out.lengths) for t in range(max(out.lengths))]
    assert out.calls == [("a+b", 2 * steps[0]), ("c", steps[0])] + [("a+b+c", 3 * n) for n in steps[1:]]
    same = rollout(env_fn, pols, [models], seeds=out.seeds)
    plain = rollout(env_fn, pols, models, seeds=out.seeds)
    for k in range(6):
        same_episode(same, k, rollout(env_fn, pols, models, seeds=[out.seeds[k]]), 1e-5)
    assert same.calls == plain.calls
    # the engines' slots per episode: the most agents a model serves at one step (gpt_a 2 of 3 at step 0)
    assert agents_per_model(per_step, list(models)) == {id(gpt_a): 2, id(gpt_b): 3}
    assert agents_per_model(gpt_a, ["x", "y"]) == {id(gpt_a): 2}


def test_token_batch_matches_the_objectives_and_the_policy(tok, gpt_a, gpt_b):
    env_fn, pols, models = setup("count-turns", tok, gpt_a, gpt_b)
    out = rollout(env_fn, pols, models, episodes=6, generator=torch.Generator().manual_seed(8))
    for a, r in out.agents.items():
        steps = r.step_tensors()
        batch = r.token_batch()
        K, S = steps.rewards.shape
        assert (K, S) == (6, max(out.lengths))
        assert steps.step_mask.sum(1).tolist() == out.lengths
        assert torch.equal(steps.rewards.sum(1), torch.tensor(r.returns, dtype=torch.float64))
        # The rows of the batch are the acted steps in (episode, step) order, as returns[acted] lists them.
        ks, ts = steps.acted.nonzero(as_tuple=True)
        assert batch.episode.tolist() == ks.tolist() and batch.step.tolist() == ts.tolist()
        returns = discounted_returns(steps.rewards, 0.9, steps.step_mask)[steps.acted]
        adv = batch.set_advantages(returns - returns.mean())
        assert torch.equal(adv != 0, batch.mask & (returns - returns.mean() != 0)[:, None])
        for n, x in enumerate(r.actions):
            row = batch.input_ids[n, :len(x.prompt) + len(x.tokens)].tolist()
            assert row == x.prompt + x.tokens
            assert batch.targets[n][batch.mask[n]].tolist() == x.tokens
        # The policy's recomputation on this layout gives back what the engine sampled with.
        recomputed = token_logprobs(models[a], batch.input_ids, batch.targets)
        assert torch.equal(recomputed.mask, batch.mask)
        assert torch.allclose(recomputed.logprobs, batch.old_logprobs, atol=1e-5, rtol=0)
        loss = objective_loss("reinforce", recomputed.logprobs, recomputed.entropy, batch.mask,
                              batch.advantages, alpha=0.01)["loss"]
        loss.backward()
        assert models[a].lm_head.weight.grad is not None
        models[a].zero_grad()


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_input_fails_in_one_line(tok, gpt_a):
    env_fn = CASES["signaling-shared"][0]
    pols = policies_for(tok, ["speaker", "listener"])
    cases = [
        (dict(policies={**pols, "ghost": pols["speaker"]}), "policy for unknown agent 'ghost'"),
        (dict(policies={"speaker": pols["speaker"]}), "no policy for agent 'listener'"),
        (dict(models={"speaker": gpt_a}), "no model for agent 'listener'"),
        (dict(models={"speaker": gpt_a, "listener": gpt_a, "x": gpt_a}), "model for unknown agent 'x'"),
        (dict(models=object()), "must be a model.GPT"),
        (dict(models=[]), "models is an empty list"),
        (dict(models=[gpt_a, {"speaker": gpt_a}]), "no model for agent 'listener'"),
        (dict(seeds=[1, 2]), "2 seeds for 3 episodes"),
        (dict(episodes=0), "episodes must be an integer >= 1"),
        (dict(reset_options=[{}, {}]), "reset_options has 2 entries for 3 episodes"),
        (dict(max_steps=0), "max_steps must be an integer >= 1"),
        (dict(max_steps=1), "still running after max_steps=1"),
    ]
    for kw, fragment in cases:
        args = {"policies": pols, "models": gpt_a, "episodes": 3, **kw}
        with pytest.raises((ValueError, RuntimeError)) as e:
            rollout(env_fn, args.pop("policies"), args.pop("models"), **args)
        assert fragment in one_line(e), (kw, str(e.value))
    e0 = make_env("signaling")
    with pytest.raises(ValueError) as e:
        rollout([e0, e0], pols, gpt_a)
    assert "same env object is given twice" in one_line(e)
    with pytest.raises(ValueError) as e:
        rollout(env_fn, pols, gpt_a)
    assert "give episodes (or seeds)" in one_line(e)


def test_an_env_that_raises_is_named_with_episode_step_and_agent(tok, gpt_a):
    pols = policies_for(tok, ["a", "b"])
    with pytest.raises(RuntimeError) as e:
        rollout([CountEnv(min_len=3), CountEnv(min_len=3, fail_at=1)], pols, gpt_a, seeds=[0, 1])
    msg = one_line(e)
    assert "env 'count' raised at episode 1 (seed 1), step 1, acting agent(s) b" in msg
    assert "ValueError: the simulator fell over" in msg
