"""Serving a multi-agent run whose agents are LoRA adapters over one shared base (a reduced
marl-split-arith trained here): each agent is one model name, answers with its own adapter (equal to that
adapter merged into the base and decoded alone by a plain argmax loop), and rows of both agents share
decode steps of one engine."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_marl_train import BASE, run_train
from tests.test_serve import Server, greedy_reference, metric

PROMPTS = ["first (messenger)\na = 3\nfirst:", "second (answerer)\nb = 1, message: 3\nsecond:", "hello", "a + b ="]
AGENTS = ("first", "second")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_lora_run(tmp_path_factory.mktemp("serve-lora"))


def train_lora_run(root):
    """A reduced marl-split-arith run under `root`: two LoRA agents over one base, adapters far from zero."""
    out = run_train(root, "base", *[a for a in BASE if not a.startswith("train.max_steps")], "train.max_steps=40",
                    recipe="marl-split-arith-base")
    assert out.returncode == 0, out.stderr[-3000:]
    base = root / "runs" / "base"
    # two RL steps at a large learning rate: adapters far from zero, so the agents answer differently
    out = run_train(root, "roles", *(f"agents.{a}.init_from={base}" for a in AGENTS), "rl.episodes_per_step=8",
                    "rl.max_new_tokens=3", "env.eval_episodes=8", "train.max_steps=2", "train.eval_every=2",
                    "train.progress=false", "tracking.wandb=disabled", "agents.first.lr=0.05", "agents.second.lr=0.05",
                    recipe="marl-split-arith")
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / "roles"


def test_an_agent_acting_with_anothers_policy_is_served_by_it_under_its_own_name(run):
    """marl-split-arith-shared: `second` has `policy_of: first`; both names, one adapter."""
    from serve.loader import load_run

    base = run.parent / "base"
    out = run_train(run.parent.parent, "shared", f"agents.first.init_from={base}", "rl.episodes_per_step=8",
                    "rl.max_new_tokens=3", "env.eval_episodes=8", "train.max_steps=1", "train.eval_every=1",
                    "train.progress=false", "tracking.wandb=disabled", recipe="marl-split-arith-shared")
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = load_run(run.parent / "shared")
    assert list(loaded.models) == ["first", "second"] and list(loaded.modules) == ["lora_0"]
    assert [(m.name, m.module_key, m.adapter) for m in loaded.models.values()] == [
        ("first", "lora_0", "first"), ("second", "lora_0", "first")]


@pytest.fixture(scope="module")
def references(run):
    """Per agent: the base with that agent's adapter merged (agents.lora.merged_state_dict), a plain GPT."""
    from tokenizers import Tokenizer

    from agents.lora import add_adapters, merged_state_dict
    from model import GPT, GPTConfig
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(run / "checkpoints")
    meta = ckpt.verify(folder)
    lora = meta["lora"]["lora_0"]
    config = GPTConfig(**{**lora["config"], "kernels": "torch"})
    shared = GPT(config, init=False)
    add_adapters(shared, lora["adapters"])
    shared.load_state_dict(consolidated_state_dict(folder, meta, "lora_0"))
    refs = {}
    for agent in AGENTS:
        plain = GPT(config, init=False)
        plain.load_state_dict(merged_state_dict(shared, agent))
        refs[agent] = (plain.eval(), Tokenizer.from_file(str(run / "tokenizers" / f"{agent}.json")))
    return refs


def _want(references, agent, prompt, max_new=12):
    model, tok = references[agent]
    return tok.decode(greedy_reference(model, tok.encode(prompt, add_special_tokens=False).ids, max_new,
                                       tok.token_to_id("<|endoftext|>")))


def test_each_agent_is_a_model_name_answering_with_its_own_adapter(run, references):
    s = Server(run)
    try:
        assert [m.id for m in s.client.models.list().data] == list(AGENTS)
        texts = {}
        for agent in AGENTS:
            for p in PROMPTS:
                r = s.client.completions.create(model=agent, prompt=p, max_tokens=12, temperature=0)
                texts[agent, p] = r.choices[0].text
                assert texts[agent, p] == _want(references, agent, p), (agent, p)
        assert any(texts["first", p] != texts["second", p] for p in PROMPTS)  # the adapters differ

        # both agents' requests at once: each the text it gets alone, decoded in shared steps
        jobs = [(AGENTS[i % 2], PROMPTS[i % len(PROMPTS)], i) for i in range(8)]

        def ask(job):
            agent, p, i = job
            kw = dict(temperature=0) if i % 4 < 2 else dict(temperature=1.0, seed=i)
            return s.client.completions.create(model=agent, prompt=p, max_tokens=10 + i, **kw).choices[0].text

        alone = [ask(j) for j in jobs]
        barrier = threading.Barrier(len(jobs))

        def together(job):
            barrier.wait()
            return ask(job)

        before = metric(s.metrics(), "serve_decode_batch_rows_count") - metric(
            s.metrics(), 'serve_decode_batch_rows_bucket{le="1"}')
        with ThreadPoolExecutor(len(jobs)) as pool:
            assert list(pool.map(together, jobs)) == alone
        text = s.metrics()
        shared = metric(text, "serve_decode_batch_rows_count") - metric(text, 'serve_decode_batch_rows_bucket{le="1"}')
        assert shared > before
        assert s.health()["slots"] == {"lora_0": 16}  # one engine for both agents
    finally:
        s.close()


def test_rows_of_both_adapters_share_decode_steps_of_one_engine(run, references):
    """In process: the scheduler puts rows of both adapters in one batch (seen in the row contexts the engine
    enters), and each row's tokens are its adapter's alone."""
    from serve.loader import load_run
    from serve.metrics import Metrics
    from serve.protocol import parse_request
    from serve.scheduler import Row, Scheduler

    loaded = load_run(run)
    scheduler = Scheduler(loaded.modules, 8, Metrics())
    engine = scheduler.engines["lora_0"]
    contexts: list[list] = []
    row_context = engine.row_context

    def recording(names):
        contexts.append(list(names))
        return row_context(names)

    engine.row_context = recording
    results: dict[int, list[int]] = {}
    done = threading.Event()
    rows, finished = [], []
    for i in range(6):
        agent, prompt = AGENTS[i % 2], PROMPTS[i % len(PROMPTS)]
        req = parse_request({"model": agent, "prompt": prompt, "max_tokens": 12, "temperature": 0}, loaded.models, False)

        def sink(out, i=i):  # called on the scheduler's thread only
            results.setdefault(i, []).append(out.token)
            if out.finished:
                finished.append(i)
                if len(finished) == 6:
                    done.set()

        rows.append(Row("lora_0", req.prompts[0], req.params[0], req.model.adapter, sink))
    scheduler.submit(rows)
    scheduler.start()
    assert done.wait(60)
    scheduler.stop()
    assert engine.free_slots() == list(range(8))
    mixed = [c for c in contexts if set(c) == set(AGENTS)]
    assert mixed and max(len(c) for c in mixed) == 6
    for i in range(6):
        agent, prompt = AGENTS[i % 2], PROMPTS[i % len(PROMPTS)]
        _, tok = references[agent]
        assert tok.decode(results[i]) == _want(references, agent, prompt), i
