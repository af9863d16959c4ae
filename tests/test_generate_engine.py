"""model.generate.DecodeEngine against independent references: cache-free full-forward decoding,
each request decoded alone (rows joining and leaving mid-batch), a float64 recomputation of the
reported log-probabilities and entropies, the sampler's frequencies against the softmax, the old
static decoder (bench/static_generate.py) for GPT.generate, and a smoke run of the benchmark."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, DecodeEngine, GPTConfig, SamplingParams
from model.generate import sample_tokens

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from static_generate import static_generate  # noqa: E402

V = 101
STYLES = ["gpt2", "llama"]


def build(style, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    kw = {"n_kv_head": 2, **kw} if style == "llama" else kw  # grouped: 2 query heads per kv head
    # A larger init std spreads the logits, so greedy choices are far from ties.
    return GPT(GPTConfig(style=style, **{"vocab_size": V, "n_layer": 2, "n_head": 4, "d_model": 64,
                                         "max_seq_len": 48, "init_std": 0.2, **kw})).eval()


def naive_greedy(model, prompt, n):
    """Reference: one prompt, no cache, a full forward pass per new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def alone(model, prompt, params):
    """The request decoded by itself in a one-slot engine."""
    return DecodeEngine(model, 1).generate([prompt], [params])[0]


PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11], [60, 3, 3, 99], list(range(20, 33)), [8, 8], [1, 2, 3, 4, 5]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=STYLES)
def model(request):
    return build(request.param)


def test_greedy_equals_cache_free_decoding(model):
    """Continuous batching (6 requests through 3 slots, different prompt lengths and budgets):
    each greedy continuation equals the cache-free full-forward one."""
    engine = DecodeEngine(model, max_slots=3)
    budgets = [12, 5, 9, 3, 14, 7]
    out = engine.generate(PROMPTS, [SamplingParams(temperature=0, max_new_tokens=n) for n in budgets])
    for p, n, c in zip(PROMPTS, budgets, out):
        assert c.tokens == naive_greedy(model, p, n)
        assert c.finish_reason == "length" and c.prompt == p
    assert engine.free_slots() == [0, 1, 2]
    if model.config.style == "llama":  # the grouped kv heads go to SDPA as they are (CPU flash kernel)
        assert engine.cache.sdpa_enable_gqa
        assert engine.cache.k[0].shape == (3, 2, 48, 16)


def _params(greedy: bool, eos: int | None):
    """Different temperatures, filters, budgets and stop rules; a seed per request."""
    spec = [(1.0, None, None, 12), (0.8, 20, 0.9, 5), (1.3, None, 0.7, 9), (0.6, 5, None, 4),
            (1.0, None, None, 14), (0.9, 40, 0.95, 7)]
    return [SamplingParams(temperature=0 if greedy else t, top_k=k, top_p=p, seed=100 + i, max_new_tokens=n,
                           eos_ids=(eos,) if eos is not None and i % 2 == 0 else (),
                           stop_ids=(eos,) if eos is not None and i % 2 == 1 else ())
            for i, (t, k, p, n) in enumerate(spec)]


def _schedule(engine: DecodeEngine, prompts, params) -> dict[int, list[int]]:
    """Rows join and leave between steps: two requests start, a third joins two steps later, the
    first one leaves early (released unfinished, its slot reused), steps over subsets of the slots
    (cache rows read out of order), the rest join as slots free up."""
    tokens: dict[int, list[int]] = {}
    owner: dict[int, int] = {}

    def take(outs):
        for o in outs:
            tokens.setdefault(owner[o.slot], []).append(o.token)
            if o.finished:
                engine.release(o.slot)
                del owner[o.slot]

    def join(i, slot):
        owner[slot] = i
        take(engine.prefill([prompts[i]], [slot], [params[i]]))

    owner.update({2: 0, 0: 1})
    take(engine.prefill([prompts[0], prompts[1]], [2, 0], [params[0], params[1]]))
    take(engine.decode())
    join(2, engine.free_slots()[0])
    take(engine.decode([s for s in (2, 1, 0) if s in engine.running_slots()]))  # out of row order
    if 2 in owner:  # request 0 leaves before it finished: its tokens so far are a prefix of its run
        tokens[owner.pop(2)].append("left")
        engine.release(2)
    waiting = [3, 4, 5]
    while waiting or owner:
        for s in engine.free_slots():
            if waiting:
                join(waiting.pop(0), s)
        running = engine.running_slots()
        if running:
            take(engine.decode(running[::2]))  # every other row only, then the rest
            rest = [s for s in running if s in engine.running_slots()]
            if rest:
                take(engine.decode(rest))
    return tokens


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_join_leave_equals_each_request_alone(model, greedy):
    eos = alone(model, PROMPTS[4], SamplingParams(temperature=0, max_new_tokens=14)).tokens[3]
    params = _params(greedy, eos if greedy else None)
    if not greedy:  # a sampled eos: a token request 2 emits on its own at step 3
        eos = alone(model, PROMPTS[2], params[2]).tokens[2]
        params = _params(False, eos)
    refs = [alone(model, p, q) for p, q in zip(PROMPTS, params)]
    assert any(r.finish_reason in ("eos", "stop") for r in refs) and any(r.finish_reason == "length" for r in refs)
    got = _schedule(DecodeEngine(model, max_slots=3), PROMPTS, params)
    for i, ref in enumerate(refs):
        if got[i][-1] == "left":
            assert got[i][:-1] == ref.tokens[:len(got[i]) - 1] and len(got[i]) > 1
        else:
            assert got[i] == ref.tokens, f"request {i}"
        if greedy:
            assert ref.tokens == naive_greedy(model, PROMPTS[i], len(ref.tokens))
    # generate(): the same requests through 2 slots
    out = DecodeEngine(model, max_slots=2).generate(PROMPTS, params)
    for c, ref in zip(out, refs):
        assert (c.tokens, c.finish_reason) == (ref.tokens, ref.finish_reason)
        torch.testing.assert_close(c.logprobs, ref.logprobs, rtol=0, atol=2e-5)
        torch.testing.assert_close(c.entropies, ref.entropies, rtol=0, atol=2e-5)


def _reference_logprobs(model, prompt, tokens, p: SamplingParams):
    """float64 log-probabilities of the sampled distribution at each generated position, from one
    cache-free forward pass over the final sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:].double()
    if p.temperature == 0:
        return logits.log_softmax(-1)
    x = logits / p.temperature
    out = []
    for row in x:
        keep = torch.ones_like(row, dtype=torch.bool)
        if p.top_k:
            keep &= row >= row.sort(descending=True).values[p.top_k - 1]
        if p.top_p is not None and p.top_p < 1:
            probs = row.masked_fill(~keep, -math.inf).softmax(-1)
            order = probs.argsort(descending=True)
            mass_before = probs[order].cumsum(0) - probs[order]
            nucleus = torch.zeros_like(keep)
            nucleus[order[mass_before < p.top_p]] = True
            keep &= nucleus
        out.append(row.masked_fill(~keep, -math.inf).log_softmax(-1))
    return torch.stack(out)


def test_logprobs_and_entropies_match_float64_recomputation(model):
    params = [SamplingParams(temperature=0, max_new_tokens=6),
              SamplingParams(temperature=1.0, seed=1, max_new_tokens=9),
              SamplingParams(temperature=0.7, top_k=10, seed=2, max_new_tokens=8),
              SamplingParams(temperature=1.2, top_p=0.8, seed=3, max_new_tokens=10),
              SamplingParams(temperature=0.9, top_k=30, top_p=0.9, seed=4, max_new_tokens=7)]
    prompts = PROMPTS[:5]
    out = DecodeEngine(model, max_slots=3).generate(prompts, params)
    for prompt, p, c in zip(prompts, params, out):
        ref = _reference_logprobs(model, prompt, c.tokens, p)
        tok = torch.tensor(c.tokens)
        expect_lp = ref.gather(1, tok[:, None])[:, 0]
        prob = ref.exp()
        expect_h = -(prob * ref.masked_fill(prob == 0, 0)).sum(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expect_lp, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(c.entropies, dtype=torch.float64), expect_h, rtol=0, atol=1e-5)
        assert torch.isfinite(expect_lp).all()  # every sampled token lies inside the filtered support
        if p.temperature == 0:
            assert c.tokens == ref.argmax(-1).tolist()


def test_sampling_depends_on_the_seed(model):
    engine = DecodeEngine(model, max_slots=4)
    runs = engine.generate([PROMPTS[0]] * 4, [SamplingParams(temperature=1.0, seed=s, max_new_tokens=16)
                                             for s in (7, 7, 8, 9)])
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].tokens != runs[2].tokens and runs[2].tokens != runs[3].tokens
    # A row's own generator: the same request gives the same tokens whatever shares its batch.
    mixed = engine.generate([PROMPTS[3], PROMPTS[0]], [SamplingParams(temperature=0.5, seed=1, max_new_tokens=3),
                                                       SamplingParams(temperature=1.0, seed=8, max_new_tokens=16)])
    assert mixed[1].tokens == runs[2].tokens


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.8),
                                                     (1.0, 5, 0.9)])
@pytest.mark.parametrize("draw", ["inversion", "multinomial"])
def test_sampler_frequencies_match_the_distribution(temperature, top_k, top_p, draw):
    """Both ways of drawing: rows with a seed (inversion, one uniform each from their generator,
    here one generator for all so that the draws are independent) and rows sharing a generator
    (one multinomial call)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0])
    n = 40_000
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0 if draw == "inversion" else None)
    g = torch.Generator().manual_seed(0)
    tokens, logprobs, entropies = sample_tokens(logits.expand(n, -1), [p] * n, [g] * n)
    counts = torch.bincount(tokens, minlength=8).double()
    expect = _reference_logprobs_from_logits(logits, p).exp()
    assert (counts[expect == 0] == 0).all()  # nothing outside the filtered support
    assert _tv(counts, expect) < 0.01  # ~0.003 expected at this n
    torch.testing.assert_close(logprobs.double(), expect.log()[tokens], rtol=0, atol=1e-6)
    lp = expect.log().masked_fill(expect == 0, 0)
    torch.testing.assert_close(entropies[0].double(), -(expect * lp).sum(), rtol=0, atol=1e-6)


def _reference_logprobs_from_logits(logits, p):
    probs = (logits.double() / p.temperature).softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_k:
        keep &= probs >= probs.sort(descending=True).values[p.top_k - 1]
    if p.top_p:
        q = probs * keep / (probs * keep).sum()
        order = q.argsort(descending=True)
        nucleus = torch.zeros_like(keep)
        nucleus[order[(q[order].cumsum(0) - q[order]) < p.top_p]] = True
        keep &= nucleus
    kept = probs * keep
    return (kept / kept.sum()).log()


def test_engine_first_token_frequencies_match_softmax():
    """End to end with per-request seeds: the first tokens of 512 requests for one prompt on an
    8-token vocabulary follow softmax(logits) (chi-square, 7 degrees of freedom)."""
    m = build("llama", vocab_size=8, init_std=0.05)
    prompt = [1, 5, 2]
    probs = m(torch.tensor([prompt]))[0, -1].double().softmax(-1).detach()
    out = DecodeEngine(m, max_slots=64).generate([prompt] * 512, [SamplingParams(seed=s, max_new_tokens=1)
                                                                   for s in range(512)])
    counts = torch.bincount(torch.tensor([c.tokens[0] for c in out]), minlength=8).double()
    chi2 = float(((counts - 512 * probs) ** 2 / (512 * probs)).sum())
    assert chi2 < 24.3, (chi2, counts.tolist(), probs.tolist())  # 99.9% quantile of chi2(7)
    assert len({c.tokens[0] for c in out}) >= 6


def test_slot_reuse_after_release(model):
    engine = DecodeEngine(model, max_slots=3)
    greedy = SamplingParams(temperature=0, max_new_tokens=30)
    first = engine.prefill(PROMPTS[:3], [0, 1, 2], greedy)
    seqs = {s: [o.token] for s, o in zip((0, 1, 2), first)}
    for _ in range(3):
        for o in engine.decode():
            seqs[o.slot].append(o.token)
    engine.release(1)  # a middle row: the last cache row moves into its place
    assert engine.free_slots() == [1]
    with pytest.raises(ValueError, match="holds no request"):
        engine.decode([1])
    (o,) = engine.prefill([PROMPTS[3]], [1], greedy)
    seqs[1] = [o.token]
    assert engine.length(1) == len(PROMPTS[3]) + 1
    for _ in range(4):
        for o in engine.decode([2, 1, 0]):
            seqs[o.slot].append(o.token)
    for s, p in ((0, PROMPTS[0]), (2, PROMPTS[2]), (1, PROMPTS[3])):
        assert seqs[s] == naive_greedy(model, p, len(seqs[s])), s
    for s in (0, 1, 2):
        engine.release(s)
    assert engine.free_slots() == [0, 1, 2] and engine.cache.lengths == [0, 0, 0]


def test_bad_input_raises_clear_errors():
    m = build("gpt2")
    engine = DecodeEngine(m, max_slots=2, max_len=16)
    with pytest.raises(ValueError, match="prompt 1 has 16 tokens; max_len=16"):
        engine.prefill([[1], [2] * 16])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.prefill([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.prefill([[1, V]])
    with pytest.raises(ValueError, match="unknown slot 2"):
        engine.prefill([[1]], [2])
    with pytest.raises(ValueError, match="unknown slot -1"):
        engine.decode([-1])
    with pytest.raises(ValueError, match="slot 0 holds no request"):
        engine.decode([0])
    with pytest.raises(ValueError, match="slot 1 holds no request"):
        engine.release(1)
    assert engine.free_slots() == [0, 1]  # nothing was admitted by the failed calls
    engine.prefill([[1, 2]], [1], SamplingParams(temperature=0, max_new_tokens=1))
    with pytest.raises(ValueError, match="slot 1 is in use"):
        engine.prefill([[3]], [1])
    with pytest.raises(ValueError, match=r"slot 1 has finished \(length\); release it"):
        engine.decode([1])
    engine.prefill([[3]], [0])
    with pytest.raises(ValueError, match="no free slot: 1 prompts, 0 of 2 slots free"):
        engine.prefill([[4]])
    with pytest.raises(ValueError, match="no free slot"):
        engine.generate([[4]])
    with pytest.raises(ValueError, match="given twice"):
        engine.decode([0, 0])
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        DecodeEngine(m, 2).prefill([[1], [2]], params=[SamplingParams()])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_len must be in"):
        DecodeEngine(m, 1, max_len=49)


def test_length_limit_of_the_cache():
    """A sequence ends with reason "length" when it fills max_len, whatever max_new_tokens says."""
    m = build("llama")
    engine = DecodeEngine(m, max_slots=2, max_len=10)
    out = engine.generate([[1] * 7, [2] * 9], SamplingParams(temperature=0, max_new_tokens=20))
    assert [len(c.prompt) + len(c.tokens) for c in out] == [10, 10]
    assert [c.finish_reason for c in out] == ["length", "length"]
    assert out[0].tokens == naive_greedy(m, [1] * 7, 3)


@pytest.mark.parametrize("style", STYLES)
def test_bf16_autocast_keeps_a_bf16_cache_and_picks_the_cache_free_greedy_tokens(style):
    """Six requests through two slots (so rows are refilled mid-run) under bf16 autocast: the cache
    is bf16 (half the memory) and every token is what a cache-free bf16 pass ranks first."""
    from tests.test_generate import assert_cache_free_greedy_under_bf16

    m = build(style)
    engine = DecodeEngine(m, max_slots=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    assert engine.cache.k[0].dtype == torch.bfloat16
    for p, c in zip(PROMPTS, out, strict=True):
        assert len(c.tokens) == 8
        assert_cache_free_greedy_under_bf16(m, p, list(c.tokens))


@pytest.mark.parametrize("style", STYLES)
def test_gpt_generate_gives_the_old_static_decoders_tokens(style):
    """GPT.generate runs on the engine yet returns what the static decoder it replaced returns,
    sampled draws from one shared generator (finished rows keep their place in the draw) included."""
    m = build(style)
    eos = m.generate(PROMPTS[:3], 10, temperature=0)[1][len(PROMPTS[1]) + 2]
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)):
        for eos_id in (None, eos):
            new = m.generate(PROMPTS[:3], 12, eos_id=eos_id, generator=torch.Generator().manual_seed(5), **kw)
            old = static_generate(m, PROMPTS[:3], 12, eos_id=eos_id, generator=torch.Generator().manual_seed(5), **kw)
            assert new == old, (kw, eos_id)
    ids, mask = torch.tensor([[0, 0, 0, 7, 9], [4, 1, 5, 2, 3]]), torch.tensor([[0, 0, 0, 1, 1], [1] * 5])
    for kw in (dict(temperature=0, eos_id=eos), dict(temperature=1.0, eos_id=eos)):
        new = m.generate(ids, 8, attention_mask=mask, generator=torch.Generator().manual_seed(1), **kw)
        old = static_generate(m, ids, 8, attention_mask=mask, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(new, old), kw


def test_bench_generate_quick(tmp_path):
    """`make bench-generate` in its tiny --quick mode: the table and the ratio lines are written."""
    out = tmp_path / "generate.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "bench_generate.py"), "--quick", "--threads", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    for workload in ("ragged", "equal"):
        assert len(re.findall(rf"^ratio {workload}: engine / static = \d+\.\d+x in tokens/s", text, re.M)) == 2, text
    assert "bench/bench_generate.py --quick" in text and re.search(r"same tokens for \d+/16 requests", text)
    assert "| ragged | static |" in text and "| equal | engine |" in text
