"""Sampling draws from the distribution it claims, with the generator it is given.

Tests that fail if a sampler ignored its generator (took torch's global one, or a fixed stream),
or collapsed to the most likely token: another seed gives other tokens, the global RNG neither
matters nor moves, and the frequencies of many draws match the (filtered) softmax probabilities,
computed here independently in float64, under a chi-square test.
"""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from model.generate import DecodeEngine, SamplingParams, sample_next

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 99.9% quantiles of the chi-square distribution with d degrees of freedom: a correct sampler
# fails one of these tests once in a thousand runs (the seeds are fixed, so never by chance here).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88,
            10: 29.59, 11: 31.26}
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11], [60, 3, 3, 99]]


def build(style="gpt2", vocab_size=101, init_std=0.2) -> GPT:
    torch.manual_seed(0)
    kw = {"n_kv_head": 2} if style == "llama" else {}
    return GPT(GPTConfig(style=style, vocab_size=vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=40,
                         init_std=init_std, **kw)).eval()


def expected_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """softmax(logits / T) in float64, restricted to the k largest, then to the smallest head of the
    sorted, renormalised distribution whose mass reaches top_p; renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:top_k or len(p)]] = True
    if top_p is not None:
        q = torch.where(keep, p, 0.0)
        q = q / q.sum()
        head = q[order].cumsum(0) - q[order] < top_p  # tokens before it hold less than top_p
        nucleus = torch.zeros_like(keep)
        nucleus[order[head]] = True
        keep &= nucleus
    p = torch.where(keep, p, 0.0)
    return p / p.sum()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens of nonzero probability, and its degrees of freedom;
    a draw outside the support fails at once."""
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token of probability 0"
    n = counts.sum()
    e = n * probs[support]
    return float(((counts[support] - e) ** 2 / e).sum()), int(support.sum()) - 1


# ------------------------------------------------------------------------------------- sample_next

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.8),
                                                     (1.0, 6, 0.9)])
def test_sample_next_frequencies_follow_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0, 0.7, 1.2]])
    n = 20_000
    g = torch.Generator().manual_seed(0)
    tokens = sample_next(logits.expand(n, -1), temperature, top_k, top_p, generator=g)
    counts = torch.bincount(tokens, minlength=logits.shape[-1]).double()
    probs = expected_probs(logits[0], temperature, top_k, top_p)
    chi2, dof = chi_square(counts, probs)
    assert chi2 < CHI2_999[dof], (chi2, dof, counts.tolist(), probs.tolist())
    # Not argmax: the most likely token takes its probability's share, not everything.
    assert counts[0] / n == pytest.approx(float(probs[0]), abs=0.02) and float(probs[0]) < 0.6


def test_sample_next_draws_from_the_generator_given():
    logits = torch.zeros(1, 50).expand(64, -1)  # uniform: every draw is the generator's
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the global generator does not matter ...
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    c = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)  # ... and does not move
    assert torch.equal(a, b)
    assert (a != c).sum() > 32  # another seed: other tokens (~63 of 64 differ)


# ------------------------------------------------------------------------------------ GPT.generate

@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_generate_seed_decides_the_tokens_and_sampling_is_not_greedy(style):
    m = build(style)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50)
    torch.manual_seed(0)
    a = m.generate(PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    state = torch.get_rng_state()
    b = m.generate(PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG streams are never touched
    torch.manual_seed(99)
    c = m.generate(PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    d = m.generate(PROMPTS, generator=torch.Generator().manual_seed(4), **kw)
    assert a == b == c
    new = [x[len(p):] for x, p in zip(a, PROMPTS)]
    other = [x[len(p):] for x, p in zip(d, PROMPTS)]
    assert sum(u != v for x, y in zip(new, other) for u, v in zip(x, y)) > 16  # of 48 tokens
    greedy = m.generate(PROMPTS, max_new_tokens=16, temperature=0)
    assert sum(u != v for x, y in zip(a, greedy) for u, v in zip(x, y)) > 16


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, 6, None), (1.2, None, 0.85)])
def test_generate_first_token_frequencies_follow_the_model(temperature, top_k, top_p):
    """4,000 copies of one prompt in one call (one multinomial draw over the batch): the first
    generated tokens against the model's own next-token distribution, filtered as asked."""
    m = build("llama", vocab_size=12, init_std=0.05)
    prompt = [1, 5, 2]
    with torch.no_grad():
        logits = m(torch.tensor([prompt]))[0, -1]
    probs = expected_probs(logits, temperature, top_k, top_p)
    n = 4000
    out = m.generate([prompt] * n, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                     generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([o[-1] for o in out]), minlength=12).double()
    chi2, dof = chi_square(counts, probs)
    assert chi2 < CHI2_999[dof], (chi2, dof, counts.tolist(), probs.tolist())
    assert dof >= 4  # a real spread: several tokens are drawn
    assert counts.max() / n < float(probs.max()) + 0.03  # argmax would take all of them


# ------------------------------------------------------------------------------------ DecodeEngine

def test_engine_rows_with_a_generator_object_use_it():
    """SamplingParams(generator=...) rows draw from that generator (shared by the rows given it):
    the same seed gives the same tokens whatever the global RNG, another seed others."""
    m = build("gpt2")
    engine = DecodeEngine(m, max_slots=3)

    def run(seed: int, global_seed: int):
        torch.manual_seed(global_seed)
        g = torch.Generator().manual_seed(seed)
        params = [SamplingParams(temperature=1.0, generator=g, max_new_tokens=12) for _ in PROMPTS]
        return [c.tokens for c in engine.generate(PROMPTS, params)]

    a, b, c = run(5, 0), run(5, 1), run(6, 0)
    assert a == b
    assert sum(u != v for x, y in zip(a, c) for u, v in zip(x, y)) > 12  # of 36 tokens


def test_engine_seeded_rows_leave_the_global_rng_alone():
    m = build("llama")
    engine = DecodeEngine(m, max_slots=3)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_new_tokens=10) for s in (1, 2, 3)]
    state = torch.get_rng_state()
    first = [c.tokens for c in engine.generate(PROMPTS, params)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)
    assert [c.tokens for c in engine.generate(PROMPTS, params)] == first
