"""Tensor-parallel serving (`python -m serve RUN --tp 2`: serve/tp.py, serve/tp_ranks.py).

Unit level, two gloo processes: a model loaded as the server loads a rank's shard (serve.loader.build_module
with serve.tp.make_shard: built on the meta device, only this rank's slices copied in), decoded by DecodeEngine through a
prefill, decode steps, a release and a join, gives the full model's float32 logits (within 1e-5), tokens and
log-probabilities; each rank holds the shard_state_dict slices' bytes; the lockstep protocol (rank 0's
LockstepEngine, rank 1's follow) keeps rank 1's engine in step, refuses bad input on both ranks alike, and
ends on exit. End to end, a tiny gpt2 and a tiny llama run trained here: the TP=2 server's greedy and
seeded-sampling texts (completions, chat, streaming) equal the unpartitioned server's and a plain-torch
decode of the unsharded model; bad --tp values are one line and exit 2; SIGTERM lets a stream finish and
every rank exits; a killed rank turns requests into 503 and the server exits 1 instead of hanging."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist

from tests.test_serve import Server, encode, greedy_reference, sampled_reference
from tests.test_tensor_parallel import _gather_dicts, build, close, spawn
from tests.trainutil import REPO, env, run_train, train_once

pytestmark = pytest.mark.dist

STYLES = ["gpt2", "llama"]
CONTEXT = 128


# ------------------------------------------------------------------------------- unit (2 processes)


def _capturing_engine(model, store: list):
    """A DecodeEngine whose gathered full-vocabulary logits of every step are appended to `store`."""
    from model.generate import DecodeEngine

    gather = getattr(model.lm_head, "gather_logits", None) or (lambda x: x)

    def keep(x):
        full = gather(x)
        store.append(full.detach().clone())
        return full

    return DecodeEngine(model, max_slots=3, gather_logits=keep)


def _sharded_logits_worker(rank, world, style):
    from model.generate import SamplingParams
    from model.tensor_parallel import shard_state_dict
    from serve.loader import build_module
    from serve.tp import make_shard, parameter_bytes

    ref = build(style, max_seq_len=32).eval()
    # As the server loads it: built on the meta device, converted, only this rank's slices copied in.
    model = build_module(dataclasses.asdict(ref.config), ref.state_dict(), shard=make_shard())
    # Per-rank parameter memory: the bytes of this rank's slices as shard_state_dict cuts them.
    shard = shard_state_dict(ref.state_dict(), ref.config, world, rank)
    want = sum({id(t): t.numel() * t.element_size() for t in shard.values()}.values())
    assert parameter_bytes(model) == want < parameter_bytes(ref)

    prompts = [[5, 17, 33, 2], [11, 3], [60, 3, 3, 99, 7, 1]]
    params = [SamplingParams(temperature=0, max_new_tokens=20),
              SamplingParams(temperature=0.9, seed=4, max_new_tokens=20),
              SamplingParams(temperature=1.1, top_p=0.9, seed=5, max_new_tokens=20)]

    def run(m):
        logits: list[torch.Tensor] = []
        engine = _capturing_engine(m, logits)
        events = [(o.slot, o.token, o.logprob) for o in engine.prefill(prompts[:2], [0, 1], params[:2])]
        for _ in range(4):
            events += [(o.slot, o.token, o.logprob) for o in engine.decode([0, 1])]
        engine.release(0)
        events += [(o.slot, o.token, o.logprob) for o in engine.prefill([prompts[2]], [2], [params[2]])]
        for _ in range(3):
            events += [(o.slot, o.token, o.logprob) for o in engine.decode([1, 2])]
        return events, logits

    (got, got_logits), (want_ev, want_logits) = run(model), run(ref)
    assert len(got_logits) == len(want_logits) == 9
    for step, (g, w) in enumerate(zip(got_logits, want_logits)):
        assert g.shape == w.shape == (w.shape[0], ref.config.vocab_size)
        close(g, w, f"logits of step {step}")
    assert [e[:2] for e in got] == [e[:2] for e in want_ev]
    close(torch.tensor([e[2] for e in got]), torch.tensor([e[2] for e in want_ev]), "logprobs")


@pytest.mark.parametrize("style", STYLES)
def test_sharded_engine_logits_equal_the_full_models(style):
    spawn(_sharded_logits_worker, 2, style)


def _lockstep_worker(rank, world, style):
    from model.generate import DecodeEngine, SamplingParams
    from serve.loader import build_module
    from serve.tp import Channel, LockstepEngine, follow, make_engine, make_shard

    ref = build(style, max_seq_len=32).eval()
    model = build_module(dataclasses.asdict(ref.config), ref.state_dict(), shard=make_shard())
    channel = Channel(dist.new_group(backend="gloo"))
    engine = make_engine(model, max_slots=2)  # the server's engine, its prefix cache on
    torch.manual_seed(1000 + rank)  # the ranks' default generators differ, as nothing keeps them alike
    if rank == 1:
        follow(channel, {"m": engine})
        # Rank 0's calls ran here too: the same requests, ending in the same state.
        assert engine.free_slots() == [1] and engine.running_slots() == [0]
        _gather_dicts([engine.length(0)], world)
        return
    lock = LockstepEngine(channel, "m", engine)
    plain = DecodeEngine(ref, max_slots=2)
    greedy, seeded = SamplingParams(temperature=0, max_new_tokens=30), SamplingParams(temperature=1.0, seed=9,
                                                                                      max_new_tokens=30)
    outs = lock.prefill([[3, 4, 5], [7]], [0, 1], [greedy, seeded])
    assert [(o.slot, o.token) for o in outs] == [(o.slot, o.token) for o in plain.prefill([[3, 4, 5], [7]], [0, 1],
                                                                                          [greedy, seeded])]
    for _ in range(3):
        assert [o.token for o in lock.decode([0, 1])] == [o.token for o in plain.decode([0, 1])]
    lock.release(1)
    plain.release(1)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # refused on both ranks, still in step
        lock.prefill([[10 ** 6]], [1], [greedy])
    # No seed: rank 0 gives the row one, so rank 1 draws the same tokens (its check would fail otherwise).
    lock.prefill([[8, 9]], [1], [SamplingParams(temperature=1.0, max_new_tokens=30)])
    lock.decode([0, 1])
    lock.release(1)
    # A 20-token prompt twice: the second prefill takes its first 16-token block from the prefix cache.
    long, short = list(range(40, 60)), SamplingParams(temperature=0, max_new_tokens=3)
    for _ in range(2):
        got = [o.token for o in lock.prefill([long], [1], [short])] + [o.token for o in lock.decode([1])]
        want = [o.token for o in plain.prefill([long], [1], [short])] + [o.token for o in plain.decode([1])]
        assert got == want
        lock.release(1)
        plain.release(1)
    assert lock.prefix_stats()["hit_tokens"] >= 16
    # Chunked prefill through the lockstep engine, as the scheduler runs it: a 22-token prompt (unseeded
    # sampling) admitted while slot 0 decodes, 5 of its tokens a step after slot 0's decode; then a greedy one
    # in chunks of 7, whose tokens are the unsharded model's whole prefill's.
    chunked = list(range(70, 92))
    sampled = SamplingParams(temperature=1.0, max_new_tokens=3)  # no seed: rank 0 gives it one
    assert lock.admit([chunked], [1], [sampled]) == [1] and lock.prefilling_slots() == [1]
    got, steps = [], 0
    while lock.prefilling_slots():
        lock.decode([0])
        got += [o.token for o in lock.prefill_step(5)]
        steps += 1
    assert steps == 5  # ceil(22 / 5)
    got += [o.token for o in lock.decode([1])]
    assert len(got) == 2  # drawn with rank 0's seed on both ranks: rank 1's check of every call stays equal
    lock.release(1)
    greedy3 = SamplingParams(temperature=0, max_new_tokens=3)
    lock.admit([chunked[::-1]], [1], [greedy3])
    while lock.prefilling_slots():
        got = [o.token for o in lock.prefill_step(7)]
    got += [o.token for o in lock.decode([1])]
    assert got == [o.token for o in plain.prefill([chunked[::-1]], [1], [greedy3])] + [
        o.token for o in plain.decode([1])]
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):  # refused on both ranks, still in step
        lock.prefill_step(0)
    lock.release(1)
    lock.decode([0])
    channel.close()
    assert channel.dead == "the server has stopped"
    assert _gather_dicts([engine.length(0)], world) == [[engine.length(0)]] * world


@pytest.mark.parametrize("style", STYLES)
def test_lockstep_engine_keeps_the_other_rank_in_step(style):
    spawn(_lockstep_worker, 2, style)


def _channel_worker(rank, world):
    from serve.tp import FRAME, Channel

    channel = Channel(dist.new_group(backend="gloo"))
    # Around the frame's size: messages of one broadcast, of exactly its size, and of a frame and more.
    messages = [{"op": "x", "blob": bytes(range(256)) * (k // 256) + b"z" * (k % 256)}
                for k in (0, 100, FRAME - 80, FRAME - 60, FRAME - 40, FRAME, 3 * FRAME + 7)]
    for m in messages:
        if rank == 0:
            with channel.lock:
                channel.send_locked(m)
        else:
            assert channel.receive() == {**m, "check": None}


def test_channel_messages_of_any_size():
    spawn(_channel_worker, 2)


# ------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_tp")
    common = ("train.max_steps=40", f"model.max_seq_len={CONTEXT}")
    train_once(root, "gpt2", *common)
    if not (root / "runs" / "llama" / "summary.json").exists():
        out = run_train(root, "llama", *common, recipe="llama-tiny")
        assert out.returncode == 0, out.stderr[-3000:]
    return {s: root / "runs" / s for s in STYLES}


def _reference(run: Path):
    from tokenizers import Tokenizer

    from trainer.consolidate import load_run_model

    return load_run_model(run)[0], Tokenizer.from_file(str(run / "tokenizer.json"))


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


PROMPTS = ["def main(argv):\n", "import os\n\nclass ", "    return self.", "x = ["]


def _requests(client, name: str) -> list[str]:
    """Greedy and seeded-sampling requests (n=2 too), sent together: their texts."""
    kws = []
    for i, prompt in enumerate(PROMPTS):
        kws.append(dict(prompt=prompt, max_tokens=24, temperature=0))
        kws.append(dict(prompt=prompt, max_tokens=24, temperature=0.9, seed=10 + i, n=2))

    def one(kw):
        return [c.text for c in client.completions.create(model=name, **kw).choices]

    with ThreadPoolExecutor(len(kws)) as pool:
        return [t for texts in pool.map(one, kws) for t in texts]


@pytest.mark.parametrize("style", STYLES)
def test_tp2_server_texts_equal_the_unpartitioned_servers(runs, style):
    run = runs[style]
    model, tok = _reference(run)
    eos = tok.token_to_id("<|endoftext|>")
    tp = Server(run, "--tp", "2", "--max-slots", "8", "--prefill-chunk", "4")  # tiny chunks: many lockstep steps
    try:
        loaded = next(r for r in tp.log_records() if r.get("event") == "loaded")
        assert loaded["tp"]["size"] == 2 and len(_children(tp.proc.pid)) == 1
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert 0.45 * full_bytes < loaded["tp"]["parameter_bytes_per_rank"]["model"] < 0.6 * full_bytes
        got = _requests(tp.client, run.name)
        # The plain-torch references of the unsharded model: full forwards, no cache, no engine.
        for i, prompt in enumerate(PROMPTS):  # texts: greedy, then choices 0 and 1 (seeds 10 + i, 11 + i)
            ids = encode(tok, prompt)
            assert got[3 * i] == tok.decode(greedy_reference(model, ids, 24, eos)), prompt
            assert got[3 * i + 1] == tok.decode(sampled_reference(model, ids, 24, 0.9, 10 + i, eos)), prompt
            assert got[3 * i + 2] == tok.decode(sampled_reference(model, ids, 24, 0.9, 11 + i, eos)), prompt
        chat = dict(model=run.name, messages=[{"role": "user", "content": "hello"}], max_tokens=20,
                    temperature=0.8, seed=3)
        chat_text = tp.client.chat.completions.create(**chat).choices[0].message.content
        stream = "".join(c.choices[0].delta.content or "" for c in
                         tp.client.chat.completions.create(**chat, stream=True) if c.choices)
        assert stream == chat_text
        # Sampling without a seed: the ranks draw alike (a rank that diverged would have stopped the server).
        tp.client.completions.create(model=run.name, prompt=PROMPTS[0], max_tokens=16, temperature=1.0, n=3)
        assert tp.health()["status"] == "ok"
        tp.wait_idle()
    finally:
        tp.close()
    assert tp.proc.returncode == 0
    full = Server(run, "--max-slots", "8")
    try:
        assert _requests(full.client, run.name) == got
        assert full.client.chat.completions.create(**chat).choices[0].message.content == chat_text
    finally:
        full.close()
    assert len(set(got)) > len(PROMPTS)  # sampled texts differ from the greedy ones


def test_bad_tp_values_are_one_line_and_exit_2(runs, tmp_path):
    run = runs["gpt2"]  # 4 heads, a vocabulary of 512
    # A run whose tokenizer is missing fails only when loading, after rank 1 has started: still one line.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "tokenizer.json").unlink()
    for path, tp, message in [
            (run, "0", "error: --tp must be >= 1, got 0"),
            (run, "3", "error: --tp 3: tensor parallelism: the vocabulary"),
            (run, "8", "error: --tp 8: tensor parallelism: n_head=4 is not divisible by tp=8"),
            (broken, "2", f"error: {broken}/tokenizer.json: no tokenizer file")]:
        res = subprocess.run([sys.executable, "-m", "serve", str(path), "--tp", tp], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.startswith(message), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_sigterm_finishes_the_stream_and_every_rank_exits(runs):
    run = runs["llama"]
    model, tok = _reference(run)
    s = Server(run, "--tp", "2")
    try:
        (rank1,) = _children(s.proc.pid)
        chunks: list = []
        started = threading.Event()

        def stream():
            for c in s.client.completions.create(model=run.name, prompt=PROMPTS[0], max_tokens=100, temperature=0,
                                                 stream=True):
                chunks.append(c.choices[0])
                started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert s.proc.wait(60) == 0
        want = greedy_reference(model, encode(tok, PROMPTS[0]), 100, tok.token_to_id("<|endoftext|>"))
        assert "".join(c.text for c in chunks) == tok.decode(want)  # the whole stream came
        assert chunks[-1].finish_reason is not None
        assert not Path(f"/proc/{rank1}").exists()  # rank 0 waited for it: exited and reaped
    finally:
        s.close()


def test_a_lost_rank_fails_requests_with_503_and_the_server_exits(runs):
    run = runs["gpt2"]
    s = Server(run, "--tp", "2")
    try:
        (rank1,) = _children(s.proc.pid)
        result: dict = {}

        def long_request():  # 16 rows of ~100 tokens: still decoding when rank 1 is killed
            r = httpx.post(s.url + "/v1/completions", timeout=60,
                           json={"model": run.name, "prompt": PROMPTS[1], "max_tokens": CONTEXT - 20, "n": 16,
                                 "temperature": 0})
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 30
        while s.health()["running"] == 0:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.002)
        subprocess.run(["kill", "-KILL", str(rank1)], check=True)
        t.join(60)
        assert result["status"] == 503 and result["body"]["error"]["code"] == "unavailable", result
        assert "RankLost" in result["body"]["error"]["message"]
        assert s.proc.wait(10) == 1  # stopped by itself at once, not by the 30 s hard exit
        lines = [json.loads(x) for x in s.log_path.read_text().splitlines() if x.startswith("{")]
        assert any(x.get("event") == "tp_rank_lost" and "rank 1 exited" in x["error"] for x in lines)
    finally:
        s.close()


def test_replicas_of_tp_groups_behind_the_router(runs):
    run = runs["gpt2"]
    model, tok = _reference(run)
    s = Server(run, "--replicas", "2", "--tp", "2", "--max-slots", "4", "--no-prefix-cache")
    try:
        replicas = _children(s.proc.pid)
        assert len(replicas) == 2 and all(len(_children(r)) == 1 for r in replicas)  # each a group of 2 ranks
        ranks = replicas + [c for r in replicas for c in _children(r)]
        # --no-prefix-cache reaches every replica and every rank (the ranks' engines must match rank 0's: the
        # same prompt twice on one replica would otherwise be a hit on one rank and a miss on the other)
        assert all(b"--no-prefix-cache" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in ranks)
        ids = encode(tok, PROMPTS[2])
        want = tok.decode(greedy_reference(model, ids, 16, tok.token_to_id("<|endoftext|>")))
        for _ in range(2):
            assert s.client.completions.create(model=run.name, prompt=PROMPTS[2], max_tokens=16,
                                               temperature=0).choices[0].text == want
        text = s.metrics()
        for i in range(2):
            assert f'serve_prefix_cache_enabled{{replica="{i}",module="model"}} 0' in text
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
        assert not any(Path(f"/proc/{p}").exists() for p in ranks)
    finally:
        s.close()
