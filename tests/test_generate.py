"""GPT.generate: KV-cache batched decoding against cache-free greedy decoding, eos, sampling filters."""

import pytest
import torch

from model import GPT, GPTConfig
from model.generate import sample_next

V = 101
STYLES = ["gpt2", "llama"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(style, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    kw = {"n_kv_head": 2, **kw} if style == "llama" else kw
    # A larger init std spreads the logits, so greedy choices are far from ties.
    return GPT(GPTConfig(style=style, vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=40,
                         init_std=0.2, **kw)).eval()


def naive_greedy(model, prompt, n):
    """Reference: one prompt, no cache, full forward pass per new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11], [60, 3, 3, 99]]


@pytest.mark.parametrize("style", STYLES)
def test_batched_kv_greedy_equals_naive(style):
    m = build(style)
    out = m.generate(PROMPTS, max_new_tokens=12, temperature=0)
    assert out == [naive_greedy(m, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("style", STYLES)
def test_tensor_input_with_attention_mask(style):
    m = build(style)
    T = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), T, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), T, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    out = m.generate(ids, max_new_tokens=6, temperature=0, attention_mask=mask)
    assert out.shape == (3, T + 6)
    assert torch.equal(out[:, :T], ids)
    for i, p in enumerate(PROMPTS):
        assert out[i, T - len(p):].tolist() == naive_greedy(m, p, 6)
    # 1-D prompt
    one = m.generate(torch.tensor(PROMPTS[0]), max_new_tokens=3, temperature=0)
    assert one[0].tolist() == naive_greedy(m, PROMPTS[0], 3)


def test_eos_stops_sequence_and_batch():
    m = build("llama")
    free = m.generate(PROMPTS, max_new_tokens=10, temperature=0)
    eos = free[0][len(PROMPTS[0])]  # prompt 0 emits it first
    out = m.generate(PROMPTS, max_new_tokens=10, temperature=0, eos_id=eos)
    assert out[0] == PROMPTS[0] + [eos]
    for p, f, o in zip(PROMPTS[1:], free[1:], out[1:]):
        gen = f[len(p):]
        expect = gen[:gen.index(eos) + 1] if eos in gen else gen
        assert o == p + expect
    # Tensor output: finished rows are padded with eos.
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][:1] * 7])
    t = m.generate(ids, max_new_tokens=5, temperature=0, eos_id=eos)
    assert (t[0, 7:] == eos).all()
    # Whole batch stops early once every sequence finished.
    single = m.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, temperature=0, eos_id=eos)
    assert single.shape == (1, len(PROMPTS[0]) + 1)


@pytest.mark.parametrize("style", STYLES)
def test_top_k_1_and_tiny_top_p_equal_greedy(style):
    m = build(style)
    greedy = m.generate(PROMPTS, max_new_tokens=8, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert m.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, generator=g) == greedy
    assert m.generate(PROMPTS, max_new_tokens=8, temperature=0.7, top_p=1e-6, generator=g) == greedy


def test_sampling_is_reproducible_with_generator():
    m = build("gpt2")
    a = m.generate(PROMPTS, 8, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = m.generate(PROMPTS, 8, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, so the second token is needed; the third is not
    draws = {int(sample_next(logits, 1.0, top_p=0.9, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_max_seq_len_violation_raises():
    m = build("gpt2")
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate([[1] * 30], max_new_tokens=11)
    assert len(m.generate([[1] * 30], max_new_tokens=10, temperature=0)[0]) == 40


def test_generate_restores_training_mode_and_rejects_right_padding():
    m = build("gpt2").train()
    m.generate([[1, 2]], 2)
    assert m.training
    with pytest.raises(ValueError, match="left padding"):
        m.generate(torch.tensor([[1, 2, 0]]), 2, attention_mask=torch.tensor([[1, 1, 0]]))


def assert_cache_free_greedy_under_bf16(model, prompt, tokens):
    """Each of `tokens` (decoded after `prompt`) is the first choice of a full cache-free forward
    pass over the prompt and the tokens before it, under bf16 autocast like the decoding: the top
    logit up to one bf16 rounding step of it (2^-8 relative; ties in bf16 are common at this width,
    and argmax breaks them by index while the cached pass may round the other way)."""
    seq = list(prompt)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i, t in enumerate(tokens):
            logits = model(torch.tensor([seq]))[0, -1].float()
            gap, top = (logits.max() - logits[t]).item(), logits.abs().max().item()
            assert gap <= 2**-8 * top, f"token {i} ({t}) is {gap:.4f} below the top logit (largest |logit| {top:.3f})"
            seq.append(t)


@pytest.mark.parametrize("style", STYLES)
def test_generate_under_autocast_bf16_picks_the_cache_free_greedy_tokens(style):
    m = build(style)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.generate(PROMPTS, max_new_tokens=8, temperature=0)
    for p, o in zip(PROMPTS, out, strict=True):
        assert o[:len(p)] == p and len(o) == len(p) + 8
        assert_cache_free_greedy_under_bf16(m, p, o[len(p):])
