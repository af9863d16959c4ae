"""agents.lora against independent references: a batch whose rows use 8 different adapters against
each row run through a model whose weights the test merges itself (W + alpha/r B A, float64), for
every per-row method (auto, dense, bmm, group), in float32 and float64; the engine's per-row generation against each request
generated alone under peft's own active adapter (greedy and seeded sampling, requests joining and
leaving); a fresh adapter (B = 0) against the base, bit for bit; gradients against the merged model's
weight gradient; save/load, the export's merged state dict against peft's in-place merge; one-line
errors; a rollout of two agents with adapters over one base: one engine call per env step, the tokens
of agent-by-agent generation and the policy's log-probabilities under each adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from pettingzoo import ParallelEnv

from agents.lora import (
    ROW_METHODS,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    add_adapters,
    load_adapter_state_dict,
    merged_state_dict,
    row_adapters,
    use_adapter,
)
from agents.policy import AgentPolicy
from agents.rollout import rollout
from model import GPT, GPTConfig
from model.generate import DecodeEngine, SamplingParams
from trainer.data import train_bpe_tokenizer
from trainer.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V = 300
ALL = {"gpt2": ["q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"],
       "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def build(seed=0, style="gpt2") -> GPT:
    torch.manual_seed(seed)
    kw = {"n_kv_head": 2} if style == "llama" else {}
    return GPT(GPTConfig(style=style, vocab_size=V, n_layer=2, n_head=4, d_model=32, max_seq_len=96,
                         init_std=0.3, **kw)).eval()


def randomize(model, seed=1, std=0.3) -> None:
    """Nonzero A and B for every adapter (peft starts B at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def eight_adapters(style):
    """8 adapters, ranks 1..8, different alphas and targets (some miss some layers)."""
    return {f"agent{i}": dict(rank=i + 1, alpha=2.0 + i, targets=ALL[style] if i % 2 == 0 else ALL[style][i % 4:])
            for i in range(8)}


def reference_weights(adapted, plain_keys, name, spec, dtype=torch.float64) -> dict:
    """The test's own merge, from the raw parameters: W + (alpha / r) B A in float64, plain GPT keys."""
    sd = {}
    for k, v in adapted.state_dict().items():
        if ".lora_" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v.to(dtype)
    for path, m in adapted.named_modules():
        if hasattr(m, "lora_A") and name in m.lora_A:
            A, B = m.lora_A[name].weight.to(dtype), m.lora_B[name].weight.to(dtype)
            sd[path + ".weight"] = sd[path + ".weight"] + (spec["alpha"] / spec["rank"]) * (B @ A)
    assert set(sd) == set(plain_keys)
    return sd


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_rows_with_eight_adapters_equal_the_merged_models(style):
    base = build(0, style)
    plain_keys = list(base.state_dict())
    specs = eight_adapters(style)
    m = add_adapters(copy.deepcopy(base), specs)
    randomize(m)
    names = adapter_names(m)
    rows = names + [None] + names[::-1]  # 17 rows: every adapter twice, one base row
    ids = torch.randint(0, V, (len(rows), 12), generator=torch.Generator().manual_seed(2))
    ref = []
    for b, n in enumerate(rows):
        r = copy.deepcopy(base).double()
        if n is not None:
            r.load_state_dict(reference_weights(m, plain_keys, n, specs[n]))
        with torch.no_grad():  # head(hidden_states): forward() would return the logits as float32
            ref.append(r.head(r.hidden_states(ids[b:b + 1]))[0])
    ref = torch.stack(ref)
    assert (ref[0] - ref[len(names)]).abs().max() > 1e-2  # the adapters change the logits
    m64 = copy.deepcopy(m).double()
    for method in ROW_METHODS:
        with torch.no_grad(), row_adapters(m, rows, method=method):
            out32 = m(ids)
        with torch.no_grad(), row_adapters(m64, rows, method=method):
            out64 = m64.head(m64.hidden_states(ids))
        assert (out32.double() - ref).abs().max() <= 1e-4, method
        assert (out64 - ref).abs().max() <= 1e-10, method


def test_engine_rows_with_adapters_equal_each_request_alone():
    m = add_adapters(build(0), {f"a{i}": dict(rank=4, alpha=8.0, targets=ALL["gpt2"]) for i in range(4)})
    randomize(m, std=0.2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (10,), generator=g)]
    adapters = ["a0", "a1", None, "a3", "a2", "a0", "a1", "a3", None, "a2"]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=100 + i if temperature else None,
                                 max_new_tokens=4 + 3 * (i % 4)) for i in range(len(prompts))]
        # 4 slots for 10 requests: requests join and leave while others decode
        batched = DecodeEngine(m, max_slots=4).generate(prompts, params, adapters=adapters)
        for p, sp, a, c in zip(prompts, params, adapters, batched):
            with use_adapter(m, a):  # peft's own forward with that adapter active
                alone = DecodeEngine(m, max_slots=1).generate([p], [sp])[0]
            assert c.tokens == alone.tokens, (a, temperature)
            assert max(abs(x - y) for x, y in zip(c.logprobs, alone.logprobs)) <= 1e-5
    base = DecodeEngine(m, max_slots=4).generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    tuned = DecodeEngine(m, max_slots=4).generate(prompts, SamplingParams(temperature=0, max_new_tokens=8),
                                                  adapters=["a1"] * len(prompts))
    assert any(b.tokens != t.tokens for b, t in zip(base, tuned))


def test_a_fresh_adapter_equals_the_base_exactly():
    plain = build(0)
    m = add_adapters(copy.deepcopy(plain), {"a": dict(rank=4, alpha=8.0, targets=ALL["gpt2"]),
                                            "b": dict(rank=2, alpha=1.0)})
    assert all(bool((p == 0).all()) for n, p in m.named_parameters() if ".lora_B." in n)
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = plain(ids)
        for method in ROW_METHODS:
            with row_adapters(m, ["a", "b", None], method=method):
                assert torch.equal(m(ids), want)
        with use_adapter(m, "a"):
            assert torch.equal(m(ids), want)
        assert torch.equal(m(ids), want)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=6) for s in (1, 2, 3)]
    got = DecodeEngine(m, 3).generate(prompts, params, adapters=["a", "b", "a"])
    ref = DecodeEngine(plain, 3).generate(prompts, params)
    assert [c.tokens for c in got] == [c.tokens for c in ref]
    assert [c.logprobs for c in got] == [c.logprobs for c in ref]


def test_gradients_reach_only_the_chosen_adapter_and_match_the_merged_weight():
    base = build(0).double()  # float64: the gradients compare to 1e-10, not to float32 rounding
    m = add_adapters(copy.deepcopy(base), {"a": dict(rank=3, alpha=6.0), "b": dict(rank=2, alpha=4.0)})
    randomize(m)
    m.train()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))
    with use_adapter(m, "b"):
        m(ids[:, :-1], ids[:, 1:]).backward()
    assert all(not p.requires_grad and p.grad is None for n, p in m.named_parameters() if ".lora_" not in n)
    assert all(p.grad is None for p in adapter_parameters(m, "a"))
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(m, "b"))
    # d loss / d B = s * dL/dW A^T, dL/dW from a plain model holding the merged weight
    ref = copy.deepcopy(base)
    ref.load_state_dict(merged_state_dict(m, "b"))
    ref.train()
    ref(ids[:, :-1], ids[:, 1:]).backward()
    q = m.blocks[1].attn.q_proj
    A, gB = q.lora_A["b"].weight, q.lora_B["b"].weight.grad
    torch.testing.assert_close(gB, 2.0 * ref.blocks[1].attn.q_proj.weight.grad @ A.detach().t(), rtol=0, atol=1e-10)

    # per-row adapters under autograd: the row of "a" gives a's gradient of that row alone
    for p in m.parameters():
        p.grad = None
    with row_adapters(m, ["a", "b"]):
        logits = m(ids)
    logits[0].square().sum().backward()
    row = [p.grad.clone() for p in adapter_parameters(m, "a")]
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in adapter_parameters(m, "b"))
    for p in m.parameters():
        p.grad = None
    with use_adapter(m, "a"):
        m(ids[:1])[0].square().sum().backward()
    for got, p in zip(row, adapter_parameters(m, "a")):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-10)


def test_adapter_state_dict_round_trip(tmp_path):
    spec = dict(rank=3, alpha=6.0, targets=["q_proj", "fc"])
    m = add_adapters(build(0), {"speaker": spec, "listener": dict(rank=2, alpha=4.0)})
    randomize(m)
    sd = adapter_state_dict(m, "speaker")
    assert sd and all("speaker" not in k and ".lora_" in k for k in sd)
    torch.save(sd, tmp_path / "speaker.pt")
    other = add_adapters(build(0), {"x": spec})
    load_adapter_state_dict(other, "x", torch.load(tmp_path / "speaker.pt"))
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), use_adapter(m, "speaker"):
        want = m(ids)
    with torch.no_grad(), use_adapter(other, "x"):
        assert torch.equal(other(ids), want)
    with pytest.raises(UsageError) as e:
        load_adapter_state_dict(m, "listener", sd)
    assert "\n" not in str(e.value) and "listener" in str(e.value)
    wrong = add_adapters(build(0), {"x": dict(spec, rank=4)})
    with pytest.raises(UsageError, match="shape"):
        load_adapter_state_dict(wrong, "x", sd)


def test_merged_state_dict_has_gpt_keys_and_equals_peft_merge():
    base = build(0, "llama")
    m = add_adapters(copy.deepcopy(base), {"a": dict(rank=4, alpha=3.0, targets=ALL["llama"]),
                                           "b": dict(rank=2, alpha=5.0)})
    randomize(m)
    sd = merged_state_dict(m, "a")
    assert list(sd) == list(base.state_dict())
    peft_merged = copy.deepcopy(m)
    for mod in peft_merged.modules():
        if hasattr(mod, "lora_A") and "a" in mod.lora_A:
            mod.merge(adapter_names=["a"])  # peft merges in place into base_layer.weight
    want = {k.replace(".base_layer.", "."): v for k, v in peft_merged.state_dict().items() if ".lora_" not in k}
    for k in sd:
        torch.testing.assert_close(sd[k], want[k], rtol=0, atol=1e-6)
    export = copy.deepcopy(base)
    export.load_state_dict(sd)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), use_adapter(m, "a"):
        torch.testing.assert_close(export(ids), m(ids), rtol=1e-5, atol=1e-5)


def test_bad_input_fails_in_one_line_before_anything_changes():
    m = build(0)
    before = list(m.state_dict())
    with pytest.raises(UsageError) as e:
        add_adapters(m, {"speaker": dict(rank=4, alpha=8.0, targets=["q_proj", "qkv"])})
    msg = str(e.value)
    assert "\n" not in msg and "speaker" in msg and "qkv" in msg
    assert "q_proj, k_proj, v_proj, o_proj, fc, proj" in msg
    assert list(m.state_dict()) == before and adapter_names(m) == []
    with pytest.raises(UsageError, match="gate_proj, up_proj, down_proj"):
        add_adapters(build(0, "llama"), {"x": dict(targets=["fc"])})
    with pytest.raises(UsageError, match="rank"):
        add_adapters(m, {"x": dict(rank=0)})
    with pytest.raises(UsageError, match="lm_head"):
        add_adapters(m, {"x": dict(targets=["lm_head"])})
    add_adapters(m, {"a": dict(rank=2)})
    with pytest.raises(UsageError, match="already exists"):
        add_adapters(m, {"a": dict(rank=2)})
    for call in (lambda: use_adapter(m, "nope").__enter__(), lambda: row_adapters(m, ["a", "nope"]).__enter__(),
                 lambda: adapter_state_dict(m, "nope")):
        with pytest.raises(UsageError) as e:
            call()
        assert "\n" not in str(e.value) and "nope" in str(e.value)
    engine = DecodeEngine(m, 2)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        engine.prefill([[1, 2]], adapters=["nope"])
    assert engine.free_slots() == [0, 1]
    with pytest.raises(ValueError, match="no row_adapter_context"):
        DecodeEngine(build(0), 2).generate([[1, 2]], adapters=["a"])
    with pytest.raises(ValueError, match="adapter"):
        AgentPolicy("a", train_bpe_tokenizer(["a b c"] * 4, 260), adapter="")


# --------------------------------------------------------------------------------------------------
# Rollouts.


class Duet(ParallelEnv):
    """Two agents, both acting at every step for 3 steps; each sees the other's last message."""

    metadata = {"name": "duet"}

    def __init__(self):
        self.possible_agents = ["left", "right"]
        self.agents = []

    def reset(self, seed=None, options=None):
        self.t, self.agents, self.last = 0, list(self.possible_agents), {a: "" for a in self.possible_agents}
        return self._obs(), {a: {"turn": True} for a in self.agents}

    def _obs(self):
        return {a: f"step {self.t}; {b} said {self.last[b][:20]}" for a, b in (("left", "right"), ("right", "left"))}

    def step(self, actions):
        self.last = {a: actions.get(a, "") for a in self.possible_agents}
        self.t += 1
        done = self.t >= 3
        rewards = {a: float(len(self.last[a]) % 3) for a in self.agents}
        obs, infos = self._obs(), {a: {"turn": not done} for a in self.agents}
        terms, truncs = {a: done for a in self.agents}, {a: False for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos


def test_rollout_batches_agents_with_adapters_of_one_base_in_one_call():
    tok = train_bpe_tokenizer(["left said step 1; right said hello there\n"] * 20, 300)
    m = add_adapters(build(0), {"left": dict(rank=4, alpha=8.0), "right": dict(rank=4, alpha=8.0)})
    randomize(m, std=0.3)
    pols = {a: AgentPolicy(a, tok, max_new_tokens=5, stop_at_newline=False, adapter=a) for a in ("left", "right")}
    K = 3
    out = rollout(Duet, pols, m, episodes=K, generator=torch.Generator().manual_seed(8))
    assert out.calls == [("left+right", 2 * K)] * 3  # one engine call per env step, both agents in it
    apart = rollout(Duet, pols, m, episodes=K, generator=torch.Generator().manual_seed(8), batch_agents=False)
    assert len(apart.calls) == 6
    for a in pols:
        assert [x.tokens for x in out.agents[a].actions] == [x.tokens for x in apart.agents[a].actions]
        acts = out.agents[a].actions
        lp = pols[a].logprobs(m, [x.prompt for x in acts], [x.tokens for x in acts])
        for n, x in enumerate(acts):
            torch.testing.assert_close(lp.logprobs[n, :len(x.tokens)], torch.tensor(x.logprobs), rtol=0, atol=1e-5)
    plain = {a: AgentPolicy(a, tok, max_new_tokens=5, stop_at_newline=False) for a in pols}
    base = rollout(Duet, plain, m, episodes=K, generator=torch.Generator().manual_seed(8))
    assert any([x.tokens for x in base.agents[a].actions] != [x.tokens for x in out.agents[a].actions] for a in pols)


def test_bench_table_is_consistent(tmp_path):
    """bench/bench_lora.py --quick: every ratio is the plain GPT's median over the case's, the
    per-row logits are within 1e-4 of the merged models and every row's greedy tokens equal its
    merged model's."""
    import re
    import subprocess
    import sys

    from tests.trainutil import REPO, env

    out = tmp_path / "lora.md"
    run = subprocess.run([sys.executable, "bench/bench_lora.py", "--quick", "--threads", "1", "--adapters", "2", "8",
                          "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert "Command: `python bench/bench_lora.py --quick --threads 1 --adapters 2 8" in text
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| [\d.]+ \| ([\d,]+) \| ([\d.]+)x \| [\d.]+ \| ([\d,]+) \| ([\d.]+)x \|$",
                      text, re.M)
    assert len(rows) == 2 * 6
    for n in ("2", "8"):
        mine = {case.strip(): tuple(float(v.replace(",", "")) for v in vals) for m, case, *vals in rows if m == n}
        assert set(mine) == {"plain GPT (no adapter)", "adapters added, every row base",
                             *(f"per-row adapters, {m}" for m in ROW_METHODS)}
        base_w, _, base_c, _ = mine["plain GPT (no adapter)"]  # tokens/s
        for tw, rw, tc, rc in mine.values():
            assert abs(rw - tw / base_w) <= 0.002 and abs(rc - tc / base_c) <= 0.002
        diffs = re.search(rf"N={n}: max \|logit difference\|.*?: auto \*\*([\d.e+-]+)\*\*, dense ([\d.e+-]+), "
                          rf"bmm ([\d.e+-]+), group ([\d.e+-]+);", text)
        assert diffs and all(float(d) <= 1e-4 for d in diffs.groups())
        assert f"N={n}: greedy tokens equal to each row's merged model generating alone: 32/32 rows" in text
