"""Per-agent LoRA adapters under tensor-parallel serving (`python -m serve RUN --tp 2` of a LoRA run).

Unit level, two gloo processes: a LoRA model loaded as a rank loads its shard (serve.loader.build_module with
adapters and serve.tp.make_shard: built on the meta device, split, adapters added over the split layers,
only this rank's slices copied in) holds Megatron's split of every adapter (A whole and B by rows over a
column-parallel layer, A by columns and B whole over a row-parallel one), and its DecodeEngine, fed a batch
mixing two agents' rows and the base (every per-row method), gives at every step the logits of the
unpartitioned engine with the same adapters (within 1e-5) and of an independent reference, each agent's
adapter merged into a plain GPT by peft (`merged_state_dict`) and run by full forwards; a decode step makes
the collectives of the sharded base without adapters, no more. The same logits for the use_adapter path
(peft's active adapter). Refusals: a non-TP layer given to add_adapters(tensor_parallel=True),
a TP layer given to plain add_adapters. End to end, a reduced marl-split-arith run trained here (two LoRA
agents over one base): the --tp 2 server's greedy and seeded texts of both agents (concurrent, in shared
steps, with the official openai client) equal the unpartitioned server's, and its greedy texts equal each
agent's merged model's own greedy decode; a --tp that does not divide the base is still one line, exit 2."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

from tests.test_tensor_parallel import build, close, spawn

pytestmark = pytest.mark.dist

STYLES = ["gpt2", "llama"]
COLUMN = {"gpt2": ["q_proj", "k_proj", "v_proj", "fc"], "llama": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]}
ROW = {"gpt2": ["o_proj", "proj"], "llama": ["o_proj", "down_proj"]}


def _lora_model(style: str):
    """A tiny GPT with two adapters of different ranks and targets (every layer kind of the style between
    them), their weights random and far from zero (peft starts B at 0: the adapters would change nothing)."""
    from agents.lora import add_adapters

    ref = build(style, max_seq_len=32)
    specs = {"first": dict(rank=4, alpha=8.0, targets=COLUMN[style] + ROW[style]),
             "second": dict(rank=2, alpha=6.0, targets=["v_proj", "o_proj", ROW[style][1]])}
    add_adapters(ref, specs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ref.eval().requires_grad_(False), specs


def _merged(ref, name):
    """The independent reference: adapter `name` merged by peft into a plain GPT (no adapters, no TP)."""
    from agents.lora import merged_state_dict
    from model import GPT

    plain = GPT(ref.config, init=False)
    plain.load_state_dict(merged_state_dict(ref, name))
    return plain.eval()


def _sharded_lora_worker(rank, world, style):
    from agents.lora import RowLoraLinear, RowParallelLoraLinear, use_adapter
    from model.generate import DecodeEngine, SamplingParams
    from serve.loader import build_module
    from serve.tp import make_shard

    ref, specs = _lora_model(style)
    model = build_module(dataclasses.asdict(ref.config), ref.state_dict(), specs, shard=make_shard())
    # Megatron's split, read back from the rank's parameters against the full adapters' slices.
    full, mine = dict(ref.named_parameters()), dict(model.named_parameters())
    assert set(full) == set(mine)
    for layer_name in COLUMN[style] + ROW[style]:
        path = next(n for n, _ in model.named_modules() if n.startswith("blocks.1.") and n.endswith("." + layer_name))
        layer = model.get_submodule(path)
        row_parallel = layer_name in ROW[style]
        assert type(layer) is (RowParallelLoraLinear if row_parallel else RowLoraLinear)
        A, B = f"{path}.lora_A.first.weight", f"{path}.lora_B.first.weight"
        r, d_in = full[A].shape
        d_out = full[B].shape[0]
        if row_parallel:  # A by input columns like W, B whole
            assert torch.equal(mine[A], full[A][:, rank * d_in // world:(rank + 1) * d_in // world])
            assert torch.equal(mine[B], full[B])
        else:  # A whole, B by output rows like W
            assert torch.equal(mine[A], full[A])
            assert torch.equal(mine[B], full[B][rank * d_out // world:(rank + 1) * d_out // world])
    # The adapters' bookkeeping follows the parameters made by to_empty (not the meta ones it was built with):
    # a change of an adapter's weights is seen (a new generation: the cached per-row stacks are rebuilt).
    hub = model._lora_hub
    lora = [id(p) for n, p in model.named_parameters() if ".lora_" in n]
    assert len(hub.params) == len(lora) and {id(p) for p in hub.params} == set(lora)
    before = hub.generation()
    hub.params[0].add_(0.0)
    assert hub.generation() == before + 1
    # Each agent's merged model differs from the base: the comparisons below can tell the adapters apart.
    merged = {n: _merged(ref, n) for n in specs}
    probe = torch.tensor([[5, 17, 33, 2, 9]])
    base_logits = ref(probe)
    assert all((merged[n](probe) - base_logits).abs().max() > 0.05 for n in specs)

    # peft's active-adapter path (use_adapter) under TP: full forwards, gathered logits.
    for name in specs:
        with use_adapter(model, name):
            got = model.lm_head.gather_logits(model(probe))
        close(got, merged[name](probe), f"use_adapter({name!r}) logits")

    prompts = [[5, 17, 33, 2], [11, 3], [60, 3, 3, 99, 7, 1], [8, 8, 40]]
    adapters = ["first", "second", None, "first"]
    params = [SamplingParams(temperature=0, max_new_tokens=20),
              SamplingParams(temperature=0.9, seed=4, max_new_tokens=20),
              SamplingParams(temperature=0, max_new_tokens=20),
              SamplingParams(temperature=1.1, top_p=0.9, seed=5, max_new_tokens=20)]

    def run(m, method):
        """A batch of both agents and the base: prefill, decode, a release, a join. Per step: the gathered
        logits, the slots of its rows and their adapters; and the events."""
        m._lora_hub.method = method
        steps, events = [], []
        gather = getattr(m.lm_head, "gather_logits", None) or (lambda x: x)

        def keep(x):
            out = gather(x)
            steps[-1][0] = out.detach().clone()
            return out

        engine = DecodeEngine(m, max_slots=4, gather_logits=keep)
        names = {}

        def call(op, slots, *args):
            steps.append([None, list(slots)])
            out = getattr(engine, op)(*args)
            events.extend((o.slot, o.token, o.logprob) for o in out)
            return out

        for s, a in zip([0, 1, 2], adapters[:3]):
            names[s] = a
        call("prefill", [0, 1, 2], prompts[:3], [0, 1, 2], params[:3], adapters[:3])
        for _ in range(4):
            call("decode", [0, 1, 2], [0, 1, 2])
        engine.release(1)
        names[3] = adapters[3]
        call("prefill", [3], [prompts[3]], [3], [params[3]], [adapters[3]])
        for _ in range(3):
            call("decode", [0, 2, 3], [0, 2, 3])
        return steps, events, names

    want_steps, want_events, names = run(ref, "auto")
    for method in ("auto", "dense", "bmm", "group"):
        got_steps, got_events, _ = run(model, method)
        assert len(got_steps) == len(want_steps) == 9
        for k, ((g, slots), (w, _)) in enumerate(zip(got_steps, want_steps)):
            assert g.shape == w.shape == (len(slots), ref.config.vocab_size)
            close(g, w, f"{method}: logits of step {k}")
        assert [e[:2] for e in got_events] == [e[:2] for e in want_events], method
        close(torch.tensor([e[2] for e in got_events]), torch.tensor([e[2] for e in want_events]), "logprobs")

    # The independent reference: each row's context through its agent's merged model (the base for None), a full
    # forward without cache or engine, against the TP engine's logits of that row at every step.
    seqs = {s: list(p) for s, p in zip([0, 1, 2, 3], prompts)}
    by_step = iter(got_events)
    for k, (g, slots) in enumerate(got_steps):
        for i, s in enumerate(slots):
            plain = merged[names[s]] if names[s] is not None else ref
            with torch.no_grad():
                want = plain(torch.tensor([seqs[s]]))[0, -1]
            close(g[i], want, f"step {k}, slot {s} ({names[s]}) against the merged model")
        for _ in slots:
            slot, token, _ = next(by_step)
            seqs[slot].append(token)


    # No extra communication: a decode step of both agents' rows and the base makes the collectives of the
    # sharded base without adapters (the row-parallel deltas ride in the layers' own all-reduces).
    base_model = build_module(dataclasses.asdict(ref.config), merged["first"].state_dict(),
                              shard=make_shard())

    def collectives(m, names):
        calls = []
        engine = DecodeEngine(m, max_slots=3)
        engine.prefill(prompts[:3], [0, 1, 2], [params[0]] * 3, names)
        originals = {f: getattr(dist, f) for f in ("all_reduce", "all_gather", "broadcast")}

        def counting(f):
            def call(*a, **kw):
                calls.append(f)
                return originals[f](*a, **kw)
            return call

        try:
            for f in originals:
                setattr(dist, f, counting(f))
            engine.decode([0, 1, 2])
        finally:
            for f, fn in originals.items():
                setattr(dist, f, fn)
        return sorted(calls)

    with_lora = collectives(model, ["first", "second", None])
    assert with_lora == collectives(base_model, None)
    assert with_lora.count("all_reduce") == 1 + 2 * ref.config.n_layer  # the embedding, then 2 per block


@pytest.mark.parametrize("style", STYLES)
def test_sharded_lora_engine_logits_equal_the_unpartitioned_and_merged_models(style):
    spawn(_sharded_lora_worker, 2, style)


def _refusal_worker(rank, world):
    from agents.lora import add_adapters
    from model import GPT
    from model.tensor_parallel import apply_tensor_parallel
    from trainer.errors import UsageError

    plain = build("gpt2", max_seq_len=32)
    with pytest.raises(UsageError, match=r"adapter 'a': blocks\.0\.attn\.q_proj is a Linear, not a tensor-parallel"):
        add_adapters(plain, {"a": dict(rank=2, targets=["q_proj"])}, tensor_parallel=True)
    with torch.device("meta"):
        split = GPT(plain.config, init=False)
    apply_tensor_parallel(split)
    with pytest.raises(UsageError, match="is a ColumnParallelLinear; LoRA adapters need plain nn.Linear"):
        add_adapters(split, {"a": dict(rank=2, targets=["q_proj"])})  # without the flag: refused, as before
    assert not any(".lora_" in n for n, _ in plain.named_parameters())
    assert not any(".lora_" in n for n, _ in split.named_parameters())


def test_tensor_parallel_adapters_refuse_layers_they_cannot_shard():
    spawn(_refusal_worker, 2)


# ------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A reduced marl-split-arith run (two LoRA agents over one base, adapters far from zero), as
    tests/test_serve_lora.py trains it."""
    from tests.test_serve_lora import train_lora_run

    return train_lora_run(tmp_path_factory.mktemp("serve-tp-lora"))


def _requests(client) -> list[str]:
    """Both agents' greedy and seeded-sampling requests (n=2 too), sent together: their texts."""
    from tests.test_serve_lora import AGENTS, PROMPTS

    kws = []
    for i, prompt in enumerate(PROMPTS):
        for agent in AGENTS:
            kws.append(dict(model=agent, prompt=prompt, max_tokens=12, temperature=0))
            kws.append(dict(model=agent, prompt=prompt, max_tokens=12, temperature=0.9, seed=10 + i, n=2))

    def one(kw):
        return [c.text for c in client.completions.create(**kw).choices]

    with ThreadPoolExecutor(len(kws)) as pool:
        return [t for texts in pool.map(one, kws) for t in texts]


def _merged_references(run) -> dict:
    """Per agent: the shared base with that agent's adapter merged by peft (agents.lora.merged_state_dict) into
    a plain GPT, and the agent's tokenizer."""
    from tokenizers import Tokenizer

    from agents.lora import add_adapters
    from model import GPT, GPTConfig
    from tests.test_serve_lora import AGENTS
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(run / "checkpoints")
    meta = ckpt.verify(folder)
    lora = meta["lora"]["lora_0"]
    shared = GPT(GPTConfig(**{**lora["config"], "kernels": "torch"}), init=False)
    add_adapters(shared, lora["adapters"])
    shared.load_state_dict(consolidated_state_dict(folder, meta, "lora_0"))
    return {a: (_merged(shared, a), Tokenizer.from_file(str(run / "tokenizers" / f"{a}.json"))) for a in AGENTS}


def test_tp2_lora_server_texts_equal_the_unpartitioned_servers(lora_run):
    from tests.test_serve import Server, metric
    from tests.test_serve_lora import AGENTS, PROMPTS, _want

    refs = _merged_references(lora_run)
    tp = Server(lora_run, "--tp", "2", "--max-slots", "8", "--prefill-chunk", "4")
    try:
        assert [m.id for m in tp.client.models.list().data] == list(AGENTS)
        loaded = next(r for r in tp.log_records() if r.get("event") == "loaded")
        assert loaded["tp"]["size"] == 2
        before = metric(tp.metrics(), "serve_decode_batch_rows_count") - metric(
            tp.metrics(), 'serve_decode_batch_rows_bucket{le="1"}')
        got = _requests(tp.client)
        text = tp.metrics()
        assert metric(text, "serve_decode_batch_rows_count") - metric(text, 'serve_decode_batch_rows_bucket{le="1"}') \
            > before  # rows shared decode steps (of both agents: one engine serves both)
        assert tp.health()["slots"] == {"lora_0": 8}
        # Greedy texts: each agent's merged model's own greedy decode (full forwards, no engine).
        k = 0
        for prompt in PROMPTS:
            for agent in AGENTS:
                assert got[k] == _want(refs, agent, prompt), (agent, prompt)
                k += 3
        assert any(got[6 * i] != got[6 * i + 3] for i in range(len(PROMPTS)))  # the agents answer differently
        # Sampling without a seed keeps the ranks in step (a rank that diverged would stop the server).
        tp.client.completions.create(model=AGENTS[1], prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=3)
        assert tp.health()["status"] == "ok"
        tp.wait_idle()
    finally:
        tp.close()
    assert tp.proc.returncode == 0
    full = Server(lora_run, "--max-slots", "8")
    try:
        assert _requests(full.client) == got
    finally:
        full.close()
    assert len(set(got)) > 2 * len(PROMPTS)  # sampled texts differ from the greedy ones


def test_a_tp_that_does_not_divide_the_lora_runs_base_is_one_line_and_exit_2(lora_run):
    """The LoRA refusal is gone; what still cannot split is refused as for any run (the base's heads and
    vocabulary: the test's 2 heads, 512 rows), before any other process starts."""
    import subprocess
    import sys

    from tests.trainutil import REPO, env

    for tp, message in [("3", "error: --tp 3: tensor parallelism: the vocabulary"),
                        ("4", "error: --tp 4: tensor parallelism: n_head=2 is not divisible by tp=4")]:
        res = subprocess.run([sys.executable, "-m", "serve", str(lora_run), "--tp", tp], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.startswith(message), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "LoRA" not in res.stderr
