"""The decoding engine's prefix cache (model/prefix_cache.py, DecodeEngine(prefix_cache=...)) against
independent references: the plain model's full forward over the whole prompt (no cache) for the logits
of a cache hit and for greedy continuations after it, the same engine with the cache off for sampled
rows and adapters, and the block tree's least-recently-used order worked out by hand."""

from __future__ import annotations

import pytest
import torch

from model import GPT, DecodeEngine, GPTConfig, SamplingParams
from model.generate import SlotKVCache
from model.prefix_cache import PrefixCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V = 101
BS = 4  # block size of these tests: small, so short prompts span several blocks
TOL = 1e-5


def build(style, seed=0) -> GPT:
    torch.manual_seed(seed)
    kw = {"n_kv_head": 2} if style == "llama" else {}  # llama: RoPE and grouped kv heads
    return GPT(GPTConfig(style=style, vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=48,
                         init_std=0.2, **kw)).eval()


def recording(engine) -> list[torch.Tensor]:
    """The float32 full-vocabulary logits [rows, V] of every engine step (rows in the order of the
    step's slots), recorded as they are sampled from."""
    seen: list[torch.Tensor] = []
    emit = engine._emit

    def recorded(slots, logits):
        seen.append(logits.clone())
        return emit(slots, logits)

    engine._emit = recorded
    return seen


def reference_logits(model, prompt) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0, -1].float()


def naive_greedy(model, prompt, n) -> list[int]:
    """One prompt, no cache, a full forward per new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def run_to_end(engine, outs) -> dict[int, list[int]]:
    """Decode the slots of `outs` (a prefill's outputs) to their end; tokens per slot; slots released."""
    tokens = {o.slot: [o.token] for o in outs}
    live = [o.slot for o in outs if not o.finished]
    for o in outs:
        if o.finished:
            engine.release(o.slot)
    while live:
        for o in engine.decode(live):
            tokens[o.slot].append(o.token)
            if o.finished:
                engine.release(o.slot)
                live.remove(o.slot)
    return tokens


A = [5, 17, 33, 2, 90, 41, 7, 64, 12, 3, 88, 19, 45]  # 13 tokens: 3 whole blocks and one token


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_a_hit_gives_the_logits_and_tokens_of_a_cold_prefill(style):
    model = build(style)
    engine = DecodeEngine(model, max_slots=3, prefix_cache=True, prefix_block=BS)
    seen = recording(engine)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    # (prompt, tokens whose keys come from the cache): the first run is cold; a prompt sharing 10
    # tokens reuses 2 whole blocks (the partial third is computed); A again reuses 12 of its 13 (the
    # last one must run to give logits); A plus more reuses A's 3 blocks and, as A's generated tokens
    # were kept when it was released, the 4th block (A's last token + 3 generated) when they agree.
    gen_a = naive_greedy(model, A, 6)
    cases = [(A, 0), (A[:10] + [1, 2, 3], 8), (A, 12), (A + gen_a[:4], 16), (A[:3] + [9, 9], 0)]
    for prompt, reused in cases:
        before = engine.prefix_stats()["hit_tokens"]
        seen.clear()
        tokens = run_to_end(engine, engine.prefill([prompt], params=greedy))
        assert engine.prefix_stats()["hit_tokens"] - before == reused, prompt
        torch.testing.assert_close(seen[0][0], reference_logits(model, prompt), rtol=0, atol=TOL)
        # Later decode steps read the copied keys too: the continuation is the uncached model's.
        assert list(tokens.values())[0] == naive_greedy(model, prompt, 6)
    assert engine.free_slots() == [0, 1, 2] and engine.cache.lengths == [0, 0, 0]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_mixed_batch_of_hits_and_misses_keeps_each_prompts_order_and_slot(style):
    model = build(style, seed=1)
    engine = DecodeEngine(model, max_slots=4, prefix_cache=True, prefix_block=BS)
    run_to_end(engine, engine.prefill([A], params=SamplingParams(temperature=0, max_new_tokens=2)))
    prompts = [[70, 71, 72, 73, 74], A[:9] + [6], [1, 2], A[:13]]  # miss, hit 8, miss, hit 12
    seen = recording(engine)
    outs = engine.prefill(prompts, slots=[3, 0, 2, 1], params=SamplingParams(temperature=0, max_new_tokens=5))
    assert [o.slot for o in outs] == [3, 0, 2, 1]
    for k, p in enumerate(prompts):
        torch.testing.assert_close(seen[0][k], reference_logits(model, p), rtol=0, atol=TOL)
    tokens = run_to_end(engine, outs)
    for slot, p in zip([3, 0, 2, 1], prompts):
        assert tokens[slot] == naive_greedy(model, p, 5)
    assert engine.prefix_stats()["hits"] == 2


def lora_model():
    from agents.lora import add_adapters

    model = build("llama", seed=2)
    add_adapters(model, {"a": dict(rank=4, alpha=8.0), "b": dict(rank=2, alpha=4.0)})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_different_adapters_never_share_cached_keys():
    model = lora_model()
    engine = DecodeEngine(model, max_slots=2, prefix_cache=True, prefix_block=BS)
    cold = DecodeEngine(model, max_slots=2)  # the reference: the same rows without a prefix cache
    seen, seen_cold = recording(engine), recording(cold)
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    for adapter, hits in (("a", 0), ("b", 0), (None, 0), ("a", 1), ("b", 2), (None, 3)):
        seen.clear()
        seen_cold.clear()
        got = run_to_end(engine, engine.prefill([A], params=greedy, adapters=[adapter]))
        want = run_to_end(cold, cold.prefill([A], params=greedy, adapters=[adapter]))
        assert engine.prefix_stats()["hits"] == hits, adapter
        torch.testing.assert_close(seen[0], seen_cold[0], rtol=0, atol=TOL)
        assert list(got.values()) == list(want.values())
    # The three names computed different keys for the same tokens: sharing them would have shown.
    assert not torch.allclose(*(reference_logits_with(model, A, n) for n in ("a", "b")), atol=1e-3)


def reference_logits_with(model, prompt, adapter):
    with torch.no_grad(), model.row_adapter_context([adapter]):
        return model(torch.tensor([prompt]))[0, -1]


def test_block_tree_evicts_least_recently_used_leaves_within_its_budget():
    kv = SlotKVCache(n_layer=2, n_slots=2, n_kv_head=1, max_len=16, head_dim=3)
    g = torch.Generator().manual_seed(0)
    kv.k = [torch.randn(2, 1, 16, 3, generator=g) for _ in range(2)]
    kv.v = [torch.randn(2, 1, 16, 3, generator=g) for _ in range(2)]
    pc = PrefixCache(n_layer=2, capacity_tokens=4 * BS + 3, block_size=BS)  # 4 blocks
    seq_a, seq_b = list(range(0, 8)), list(range(50, 58))
    pc.store(kv, 0, seq_a, None)  # A1 <- A2
    pc.store(kv, 1, seq_b, None)  # B1 <- B2: full
    assert len(pc) == 4 and pc.stats.stored_blocks == 4
    assert len(pc.match(seq_a + [1], None)) == 2  # touches A2 then A1: B2 is now the oldest leaf
    pc.store(kv, 0, [9, 9, 9, 9], None)  # C1 evicts B2 (never B1, a parent, nor A's)
    assert pc.stats.evicted_blocks == 1
    assert len(pc.match(seq_b, None)) == 1 and len(pc.match(seq_a, None)) == 2
    # Order now (oldest first): C1, B1, A2, A1. D1 takes C1's block, D2 then B1's (B2 gone, a leaf now).
    pc.store(kv, 1, [8, 8, 8, 8, 8, 8, 8, 8], None)
    assert pc.stats.evicted_blocks == 3 and len(pc) == 4
    assert [len(pc.match(s, None)) for s in ([9, 9, 9, 9], seq_b, [8] * 8, seq_a)] == [0, 0, 2, 2]
    # A sequence longer than the whole budget keeps what fits and never evicts its own path.
    small = PrefixCache(n_layer=2, capacity_tokens=2 * BS, block_size=BS)
    small.store(kv, 0, list(range(12)), None)
    assert len(small) == 2 and small.stats.evicted_blocks == 0 and len(small.match(list(range(12)), None)) == 2
    # What was kept is what was stored: A's blocks, copied back into a row, are row 0's keys and values.
    blocks = pc.match(seq_a, None)
    target = SlotKVCache(n_layer=2, n_slots=1, n_kv_head=1, max_len=16, head_dim=3)
    target.k = [torch.zeros(1, 1, 16, 3) for _ in range(2)]
    target.v = [torch.zeros(1, 1, 16, 3) for _ in range(2)]
    pc.load(target, 0, blocks)
    for i in range(2):
        assert torch.equal(target.k[i][0, :, :8], kv.k[i][0, :, :8])
        assert torch.equal(target.v[i][0, :, :8], kv.v[i][0, :, :8])


def test_engine_under_a_small_budget_stays_within_it_and_exact():
    model = build("llama", seed=4)
    engine = DecodeEngine(model, max_slots=2, prefix_cache=6 * BS, prefix_block=BS)  # 6 blocks
    g = torch.Generator().manual_seed(5)
    stems = [torch.randint(0, V, (9,), generator=g).tolist() for _ in range(3)]
    hits = []
    for k in range(12):  # each request keeps 3 blocks (12 tokens); stem 0 comes every other time
        prompt = stems[0 if k % 2 == 0 else 1 + (k // 2) % 2] + [k]
        before = engine.prefix_stats()["hit_tokens"]
        tokens = run_to_end(engine, engine.prefill([prompt], params=SamplingParams(temperature=0, max_new_tokens=3)))
        hits.append(engine.prefix_stats()["hit_tokens"] - before)
        assert list(tokens.values())[0] == naive_greedy(model, prompt, 3)
        assert len(engine.prefix) <= 6
    # Stem 0 stays (used every other request): 8 tokens reused each time after the first; stems 1
    # and 2 alternate between its uses, so each has been evicted by the other before it comes back.
    assert hits == [0, 0] + [8, 0] * 5
    assert engine.prefix_stats()["evicted_blocks"] > 0


def test_released_mid_request_and_failed_prefills_leak_no_slot():
    model = build("gpt2", seed=6)
    engine = DecodeEngine(model, max_slots=3, prefix_cache=True, prefix_block=BS)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    outs = engine.prefill([A, A[:6], [4, 4, 4]], params=params)
    produced = {o.slot: [o.token] for o in outs}
    for _ in range(5):
        for o in engine.decode():
            produced[o.slot].append(o.token)
    for slot in (1, 0, 2):  # clients that went away mid-stream, in any order
        engine.release(slot)
    assert engine.free_slots() == [0, 1, 2] and engine.running_slots() == [] and engine.cache.lengths == [0] * 3
    # The released request's generated tokens were kept too: its whole conversation so far is a hit.
    follow = A + produced[0][:5] + [30]
    seen = recording(engine)
    before = engine.prefix_stats()["hit_tokens"]
    engine.release(engine.prefill([follow], params=params)[0].slot)
    assert engine.prefix_stats()["hit_tokens"] - before == 16
    torch.testing.assert_close(seen[0][0], reference_logits(model, follow), rtol=0, atol=TOL)

    # A forward that fails after the cached prefix was copied in takes no slot and leaves no length.
    real = model.hidden_states

    calls = []

    def failing(*args, **kwargs):  # the cold row's forward works, the hit row's fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    model.hidden_states = failing
    try:
        with pytest.raises(RuntimeError, match="boom"):
            engine.prefill([A, [7, 7]], params=params)
    finally:
        model.hidden_states = real
    assert len(calls) == 2 and engine.free_slots() == [0, 1, 2] and engine.cache.lengths == [0] * 3
    assert run_to_end(engine, engine.prefill([A], params=SamplingParams(temperature=0, max_new_tokens=4))) == {
        0: naive_greedy(model, A, 4)}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_rollout_style_batches_give_the_same_tokens_with_the_cache_on_and_off(style):
    """K episodes of one prompt, then their multi-turn follow-ups, with continuous batching over fewer
    slots than requests (so later ones hit blocks of earlier ones): greedy and seeded-sampled tokens
    are identical, log-probabilities within float32 tolerance."""
    model = build(style, seed=7)
    g = torch.Generator().manual_seed(8)
    prompts = [A] * 4 + [A + torch.randint(0, V, (k + 2,), generator=g).tolist() for k in range(6)]
    params = ([SamplingParams(temperature=0, max_new_tokens=8)] * 5
              + [SamplingParams(temperature=1.0, top_p=0.95, seed=s, max_new_tokens=8) for s in range(5)])
    on = DecodeEngine(model, max_slots=3, prefix_cache=True, prefix_block=BS).generate(prompts, params)
    off = DecodeEngine(model, max_slots=3).generate(prompts, params)
    for a, b in zip(on, off):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=TOL)


def test_changed_weights_clear_the_cache():
    model = build("gpt2", seed=9)
    engine = DecodeEngine(model, max_slots=1, prefix_cache=True, prefix_block=BS)
    greedy = SamplingParams(temperature=0, max_new_tokens=2)
    run_to_end(engine, engine.prefill([A], params=greedy))
    with torch.no_grad():  # an optimizer step, in place
        model.blocks[0].attn.k_proj.weight.mul_(1.5)
    seen = recording(engine)
    run_to_end(engine, engine.prefill([A], params=greedy))
    stats = engine.prefix_stats()
    assert stats["hits"] == 0 and stats["clears"] == 1
    torch.testing.assert_close(seen[0][0], reference_logits(model, A), rtol=0, atol=TOL)


def test_bad_prefix_options_fail_in_one_line():
    model = build("gpt2")
    with pytest.raises(ValueError, match="prefix_cache is True, False or a number of tokens"):
        DecodeEngine(model, 1, prefix_cache=-5)
    with pytest.raises(ValueError, match="at least one block of 16 tokens"):
        DecodeEngine(model, 1, prefix_cache=8)
    with pytest.raises(ValueError, match="block size must be >= 1"):
        DecodeEngine(model, 1, prefix_cache=True, prefix_block=0)
    assert DecodeEngine(model, 1).prefix is None and DecodeEngine(model, 1).prefix_stats() is None


# ---- chunked prefill: admit + prefill_step, a bounded number of prompt tokens per step ------------------


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("cache", [False, True])
def test_chunked_prefill_gives_the_tokens_of_whole_prefills(style, cache):
    model = build(style, seed=10)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (30, 3, 17, 1, 25, 9)] + [A, A + [2]]
    params = ([SamplingParams(temperature=0, max_new_tokens=6)] * 4
              + [SamplingParams(temperature=0.9, top_k=20, seed=s, max_new_tokens=6) for s in range(4)])
    whole = DecodeEngine(model, max_slots=3).generate(prompts, params)
    for chunk in (1, 5, 16):
        engine = DecodeEngine(model, max_slots=3, prefix_cache=cache, prefix_block=BS)
        got = engine.generate(prompts, params, prefill_chunk=chunk)
        for a, b in zip(got, whole):
            assert a.tokens == b.tokens and a.finish_reason == b.finish_reason, chunk
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=TOL)
        assert engine.free_slots() == [0, 1, 2] and engine.prefilling_slots() == []


def test_running_rows_decode_while_a_long_prompt_comes_in_by_chunks():
    model = build("llama", seed=12)
    engine = DecodeEngine(model, max_slots=2)
    seen = recording(engine)
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    short = [3, 1, 4]
    running = engine.prefill([short], slots=[0], params=greedy)[0]
    long = torch.randint(0, V, (22,), generator=torch.Generator().manual_seed(13)).tolist()
    assert engine.admit([long], slots=[1], params=greedy) == [1]
    assert engine.running_slots() == [0] and engine.prefilling_slots() == [1] and engine.free_slots() == []
    with pytest.raises(ValueError, match="still prefilling"):
        engine.decode([1])
    decoded = [running.token]
    firsts = []
    for _ in range(6):  # 22 prompt tokens, 4 a step: the first token comes with the 6th step
        firsts += engine.prefill_step(4)
        decoded += [o.token for o in engine.decode([0])]
    assert [o.slot for o in firsts] == [1] and engine.prefilling_slots() == []
    torch.testing.assert_close(seen[-2][0], reference_logits(model, long), rtol=0, atol=TOL)  # before the last decode
    assert decoded == naive_greedy(model, short, 7)
    rest = [firsts[0].token] + [o.token for o in (engine.decode([1])[0] for _ in range(3))]
    assert rest == naive_greedy(model, long, 4)
    # A prompt released mid-prefill frees its slot; bad budgets fail in one line.
    engine.release(1)
    engine.admit([long], slots=[1], params=greedy)
    engine.prefill_step(5)
    engine.release(1)
    assert engine.free_slots() == [1] and engine.prefilling_slots() == [] and engine.prefill_step(4) == []
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        engine.prefill_step(0)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        engine.generate([short], greedy, prefill_chunk=0)


def test_chunked_prefill_keeps_each_rows_adapter():
    model = lora_model()
    prompts = [A, A[:7], [9, 8, 7, 6, 5, 4, 3, 2, 1], A + [1]]
    adapters = ["a", "b", None, "a"]
    params = SamplingParams(temperature=0, max_new_tokens=5)
    whole = DecodeEngine(model, max_slots=2).generate(prompts, params, adapters=adapters)
    chunked = DecodeEngine(model, max_slots=2, prefix_cache=True, prefix_block=BS).generate(
        prompts, params, adapters=adapters, prefill_chunk=3)
    assert [c.tokens for c in chunked] == [c.tokens for c in whole]
    assert [c.tokens for c in whole][:2] != [c.tokens for c in DecodeEngine(model, 2).generate(prompts[:2], params)]
