"""agents.policy against independent references: the prompt against the tokenizer's own encoding of
the template, log-probabilities / entropies / their gradients against a float64 loop that runs one
forward per prefix and takes torch.softmax of the last logits, and the engine's sampled log-probs."""

from __future__ import annotations

import copy

import pytest
import torch

from agents.policy import (
    DEFAULT_TEMPLATE,
    AgentPolicy,
    build_inputs,
    sequence_logprobs,
    token_logprobs,
    unwrap_model,
)
from model import GPT, DecodeEngine, GPTConfig
from trainer.data import train_bpe_tokenizer

TEXTS = ["speaker (describe the object)\nObject: kite\nspeaker: a red kite\n",
         "listener (name one)\nMessage: red\nCandidates: apple, boat, kite, egg\nlistener: kite\n",
         "Task: a + b\nYou know: a = 12\nfirst: 12\nsecond: 30\nAnswer: 42\n"] * 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, 300)


def build(style, vocab, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    kw = {"n_kv_head": 2, **kw} if style == "llama" else kw
    return GPT(GPTConfig(style=style, **{"vocab_size": vocab, "n_layer": 2, "n_head": 4, "d_model": 32,
                                         "max_seq_len": 64, "init_std": 0.1, **kw})).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tok):
    return build(request.param, tok.get_vocab_size())


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ---- prompts and sampling settings ------------------------------------------------------------------


def test_prompt_is_the_template_encoded_and_cut_on_the_left(tok):
    pol = AgentPolicy("speaker", tok, role="describe the object")
    obs = "Object: kite"
    text = "speaker (describe the object)\nObject: kite\nspeaker:"
    assert DEFAULT_TEMPLATE.format(agent="speaker", role="describe the object", observation=obs) == text
    assert pol.prompt_text(obs) == text
    full = tok.encode(text).ids
    assert pol.prompt_ids(obs) == full and len(full) > 8
    assert pol.prompt_ids(obs, max_tokens=8) == full[-8:]
    short = AgentPolicy("speaker", tok, role="describe the object", max_prompt_tokens=5)
    assert short.prompt_ids(obs) == full[-5:]
    assert short.prompt_ids(obs, max_tokens=3) == full[-3:]
    assert short.prompt_ids(obs, max_tokens=50) == full[-5:]
    custom = AgentPolicy("b", tok, template="<{agent}|{role}> {observation} =>", role="r")
    assert custom.prompt_ids("x") == tok.encode("<b|r> x =>").ids
    assert AgentPolicy("a", tok).role == "a"


def test_stop_tokens_and_action_text(tok):
    pol = AgentPolicy("listener", tok)
    nl = tok.encode("\n").ids
    assert len(nl) == 1 and nl[0] in pol.stop_ids
    assert pol.eos_id == tok.token_to_id("<|endoftext|>") == 0 and 0 not in pol.stop_ids
    # Every stop id decodes to text with a line break; a sample of the others does not.
    assert all("\n" in tok.decode([i]) for i in pol.stop_ids)
    assert not any("\n" in tok.decode([i]) for i in range(tok.get_vocab_size()) if i not in pol.stop_ids)
    ids = tok.encode("kite is it\nmore text").ids
    assert pol.action_text(ids) == "kite is it"
    assert pol.action_text(tok.encode("kite").ids + [0]) == "kite"
    assert pol.action_text([]) == ""
    p = pol.sampling_params(seed=3)
    assert p.seed == 3 and p.eos_ids == (0,) and p.stop_ids == pol.stop_ids and p.max_new_tokens == 32
    raw = AgentPolicy("listener", tok, stop_at_newline=False, eos_id=5)
    assert raw.stop_ids == () and raw.action_text(ids) == "kite is it\nmore text"
    assert raw.sampling_params().eos_ids == (5,)


def test_generation_stops_at_newline_with_the_policy_settings(tok, model):
    """A newline token ends a sampled action (kept as its last token); no earlier token is a stop."""
    pol = AgentPolicy("speaker", tok, max_new_tokens=40)
    nl = tok.encode("\n").ids[0]
    bias = torch.zeros(tok.get_vocab_size())
    bias[nl] = 3.0  # the line break becomes likely enough to end most actions early
    hook = model.lm_head.register_forward_hook(lambda m, args, out: out + bias.to(out.dtype))
    try:
        engine = DecodeEngine(model, 8)
        prompts = [pol.prompt_ids(f"Object: {o}") for o in ("kite", "egg", "boat", "apple")] * 2
        outs = engine.generate(prompts, [pol.sampling_params(seed=i) for i in range(8)])
        stopped = 0
        for c in outs:
            stops = [t in pol.stop_ids or t == pol.eos_id for t in c.tokens]
            assert not any(stops[:-1])
            assert stops[-1] == (c.finish_reason in ("stop", "eos"))
            stopped += c.finish_reason == "stop"
            assert "\n" not in pol.action_text(c.tokens)
        assert stopped > 0
    finally:
        hook.remove()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": ""}, "name must be a non-empty string"),
    ({"template": "{agent}: {obs}"}, "template field {obs} is not allowed"),
    ({"template": "{agent} says"}, "must contain {observation}"),
    ({"template": "{observation"}, "not a valid format string"),
    ({"temperature": -0.5}, "temperature must be a number >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"max_prompt_tokens": 0}, "max_prompt_tokens must be an integer >= 1"),
    ({"tokenizer": object()}, "tokenizer must have encode(text) and decode(ids)"),
])
def test_bad_settings_fail_in_one_line(tok, kwargs, fragment):
    args = {"name": "speaker", "tokenizer": tok, **kwargs}
    with pytest.raises(ValueError) as e:
        AgentPolicy(args.pop("name"), args.pop("tokenizer"), **args)
    assert fragment in one_line(e)


def test_empty_prompt_and_mismatched_batch_fail_in_one_line(tok, model):
    pol = AgentPolicy("a", tok, template="{observation}")
    with pytest.raises(ValueError) as e:
        pol.prompt_ids("")
    assert "encodes to no token" in one_line(e)
    with pytest.raises(ValueError) as e:
        AgentPolicy("a", tok).prompt_ids("x", max_tokens=0)
    assert "no room for a prompt" in one_line(e)
    with pytest.raises(ValueError) as e:
        sequence_logprobs(model, [[1, 2]], [[3], [4]])
    assert "1 prompts but 2 generated" in one_line(e)
    with pytest.raises(ValueError) as e:
        sequence_logprobs(model, [[]], [[4]])
    assert "empty prompt" in one_line(e)
    with pytest.raises(ValueError) as e:
        sequence_logprobs(model, [[1]], [[4]], temperature=0)
    assert "temperature must be > 0" in one_line(e)


# ---- log-probabilities and entropies -----------------------------------------------------------------


def reference(model64, prompts, generated, temperature=1.0):
    """float64, one row and one prefix at a time, no padding: plain torch.softmax of the last logits."""
    lps, ents = [], []
    for p, g in zip(prompts, generated):
        row_lp, row_ent = [], []
        for i, tok_id in enumerate(g):
            logits = model64(torch.tensor([list(p) + list(g[:i])]))[0, -1].double() / temperature
            probs = torch.softmax(logits, dim=-1)
            row_lp.append(torch.log(probs[tok_id]))
            row_ent.append(-(probs * torch.log(probs)).sum())
        lps.append(row_lp)
        ents.append(row_ent)
    return lps, ents


def random_batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = [(7, 5), (1, 9), (13, 1), (3, 3), (20, 12)]
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for p, _ in lens]
    generated = [torch.randint(0, vocab, (n,), generator=g).tolist() for _, n in lens]
    return prompts, generated


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropies_equal_a_float64_loop(model, tok, temperature):
    prompts, generated = random_batch(tok.get_vocab_size())
    with torch.no_grad():
        out = sequence_logprobs(model, prompts, generated, temperature=temperature)
    L = max(len(g) for g in generated)
    assert out.logprobs.shape == out.entropy.shape == out.mask.shape == (len(prompts), L)
    assert out.logprobs.dtype == torch.float32 and out.mask.dtype == torch.bool
    with torch.no_grad():
        ref_lp, ref_ent = reference(copy.deepcopy(model).double(), prompts, generated, temperature)
    for n, g in enumerate(generated):
        assert out.mask[n].tolist() == [i < len(g) for i in range(L)]
        assert out.logprobs[n, len(g):].eq(0).all() and out.entropy[n, len(g):].eq(0).all()
        for i in range(len(g)):
            assert abs(out.logprobs[n, i].item() - float(ref_lp[n][i])) < 2e-5
            assert abs(out.entropy[n, i].item() - float(ref_ent[n][i])) < 2e-5
    # The entropy is that of the full distribution: close to log V for this near-uniform model, not
    # a sampled estimate -log p(token).
    assert abs(out.entropy[out.mask].mean().item() - torch.log(torch.tensor(300.0)).item()) < 0.5


def test_gradients_equal_the_float64_loop(model, tok):
    prompts, generated = random_batch(tok.get_vocab_size(), seed=2)
    w = torch.Generator().manual_seed(0)
    L = max(len(g) for g in generated)
    a = torch.randn(len(prompts), L, generator=w, dtype=torch.float64)
    b = torch.randn(len(prompts), L, generator=w, dtype=torch.float64)

    model.zero_grad()
    out = sequence_logprobs(model, prompts, generated)
    loss = (a.float() * out.logprobs + b.float() * out.entropy)[out.mask].sum()
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    model64 = copy.deepcopy(model).double()
    ref_lp, ref_ent = reference(model64, prompts, generated)
    ref_loss = sum(a[n, i] * ref_lp[n][i] + b[n, i] * ref_ent[n][i]
                   for n in range(len(prompts)) for i in range(len(generated[n])))
    ref_loss.backward()
    for k, p in model64.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, k
        assert (got[k].double() - p.grad).abs().max().item() < 1e-4 * scale + 1e-6, k


def test_sequence_layout_agrees_with_generated_layout(model, tok):
    prompts, generated = random_batch(tok.get_vocab_size(), seed=3)
    ids, targets = build_inputs(prompts, generated)
    for n, (p, g) in enumerate(zip(prompts, generated)):
        assert ids[n, :len(p) + len(g)].tolist() == p + g
        assert targets[n].tolist() == [-100] * (len(p) - 1) + g + [-100] * (ids.shape[1] - len(p) - len(g) + 1)
    full = token_logprobs(model, ids, targets)
    gen = sequence_logprobs(model, prompts, generated)
    assert torch.equal(full.mask, targets != -100)
    assert torch.equal(full.logprobs[full.mask], gen.logprobs[gen.mask])
    assert torch.equal(full.entropy[full.mask], gen.entropy[gen.mask])
    assert full.logprobs[~full.mask].eq(0).all()


def test_engine_logprobs_equal_the_recomputed_ones(model, tok):
    """Temperature 1, no filter: what DecodeEngine reports for the tokens it sampled equals the
    recomputation under autograd (float32 rounding apart), for rows of a continuously batched run."""
    pol = AgentPolicy("speaker", tok, temperature=1.0, max_new_tokens=12, stop_at_newline=False)
    prompts = [pol.prompt_ids(f"Object: {o}") for o in ("kite", "egg", "boat", "apple", "drum")]
    outs = DecodeEngine(model, 3).generate(prompts, [pol.sampling_params(seed=10 + i) for i in range(5)])
    gen = [c.tokens for c in outs]
    assert len({tuple(g) for g in gen}) == 5
    out = pol.logprobs(model, prompts, gen)
    assert out.logprobs.requires_grad
    for n, c in enumerate(outs):
        k = len(c.tokens)
        assert torch.allclose(out.logprobs[n, :k], torch.tensor(c.logprobs), atol=1e-5, rtol=0)
        assert torch.allclose(out.entropy[n, :k], torch.tensor(c.entropies), atol=1e-5, rtol=0)
    # A greedy policy reports temperature-1 values, as the engine does for greedy rows.
    greedy = AgentPolicy("speaker", tok, temperature=0, max_new_tokens=6, stop_at_newline=False)
    outs = DecodeEngine(model, 5).generate(prompts, [greedy.sampling_params()] * 5)
    out = greedy.logprobs(model, prompts, [c.tokens for c in outs])
    for n, c in enumerate(outs):
        assert torch.allclose(out.logprobs[n, :len(c.tokens)], torch.tensor(c.logprobs), atol=1e-5, rtol=0)


def test_wrapped_model_and_empty_batch(model, tok):
    class Engine(torch.nn.Module):  # what a DeepSpeed engine looks like from here
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert unwrap_model(Engine(model)) is model
    prompts, generated = random_batch(tok.get_vocab_size(), seed=4)
    a = sequence_logprobs(Engine(model), prompts, generated)
    b = sequence_logprobs(model, prompts, generated)
    assert torch.equal(a.logprobs, b.logprobs)
    empty = sequence_logprobs(model, [], [])
    assert empty.logprobs.shape == (0, 1) and not empty.mask.any()
