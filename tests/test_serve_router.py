"""Replicas behind the router (`python -m serve RUN --replicas N`, serve/router.py, serve/routing.py): a tiny
run trained here, 2 replica processes and the router on loopback ports, queried with the official `openai`
client. Texts are checked against the model's own greedy decode (what one server returns, tests/test_serve.py);
where requests went is read from the router's /health (per-replica counts) and /metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import openai
import pytest

from serve.routing import Router
from tests.test_serve import CONTEXT, PROMPTS, Server, encode, greedy_reference, metric
from tests.trainutil import REPO, env, train_once

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("one_thread")]

SLACK = 2
LONG = 200  # new tokens of a request held in flight while others are routed
SHARED = "import os\nimport sys\n\ndef main(argv):\n    "  # > one 32-character prefix block
SUFFIXES = ["parser = ", "args = ", "for x in ", "if len(", "return ", "print(", "with open(", "x = [", "try:\n"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("router")
    train_once(root, "tiny", "train.max_steps=60", f"model.max_seq_len={CONTEXT}")
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def reference(run):
    """(model, tokenizer) rebuilt from the checkpoint by trainer/ alone, as in tests/test_serve.py."""
    from tokenizers import Tokenizer

    from trainer.consolidate import load_run_model

    return load_run_model(run)[0], Tokenizer.from_file(str(run / "tokenizer.json"))


@pytest.fixture(scope="module")
def router(run):
    s = Server(run, "--replicas", "2", "--max-slots", "8", "--threads", "1", "--cache-slack", str(SLACK))
    yield s
    s.close()


def state(server: Server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def routed(server: Server) -> list[int]:
    return [r["routed"] for r in state(server)["replicas"]]


class Held:
    """A greedy request of LONG tokens in a thread (streamed or not); `first` is set when a streamed one has
    its first chunk; `result` is its text or the exception it raised."""

    def __init__(self, server: Server, prompt: str, stream: bool):
        self.result = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._go, args=(server, prompt, stream), daemon=True)
        self.thread.start()

    def _go(self, server, prompt, stream):
        try:
            r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=LONG, temperature=0,
                                                 stream=stream)
            if stream:
                text = []
                for c in r:
                    self.first.set()
                    text += [c.choices[0].text] if c.choices else []
                r = "".join(text)
            else:
                r = r.choices[0].text
            self.result = r
        except Exception as e:  # noqa: BLE001 - the test inspects it
            self.result = e
        self.first.set()

    def join(self):
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.result


@contextmanager
def paused(pid: int):
    """The replica process stopped (SIGSTOP): what the router sends it stays in flight (the kernel still
    accepts its connections) until SIGCONT, so loads are exact instead of timing-dependent."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def wait_in_flight(server: Server, total: int) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        flights = [r["in_flight"] for r in state(server)["replicas"]]
        if sum(flights) >= total:
            return flights
        assert time.monotonic() < deadline, f"in flight: {flights}, expected {total}"
        time.sleep(0.01)


def test_routing_rule_units():
    r = Router(["a", "b", "c"], "cache_aware", slack=2, block=4)
    a, b, c = r.replicas
    first = r.choose("m", "abcdefgh")
    assert first.replica is a and not first.had_owner
    r.dispatched(first)
    second = r.choose("m", "abcdXYZ")  # shares the first block: a is its owner, 1 < 0 + 2
    assert second.replica is a and second.hit
    r.dispatched(second)
    third = r.choose("m", "abcdefghij")  # a has 2 in flight, not < 0 + 2: spills to the least loaded
    assert third.replica is b and third.had_owner and not third.hit and r.spills == 1
    r.dispatched(third)
    assert r.choose("m", "abcdefgh").replica is b  # the longest match is now b's (it served it last)
    assert r.choose("other", "abcdefgh").replica is c  # the model name is part of the key: no owner
    r.done(a)
    r.done(a)
    only_b = r.choose("m", "wxyz")
    assert only_b.replica is c and not only_b.had_owner  # (least loaded, fewest sent lately)
    only_b.replica = b  # recorded for b alone
    r.dispatched(only_b)
    r.done(b)
    b.alive = False
    assert r.choose("m", "wxyz").replica is c  # a dead owner is no owner: the least loaded (fewest sent lately)
    assert r.choose("m", "abcdefgh").replica is a  # a was sent it too: the live replica with the longest match
    assert r.choose("m", "abcdefghij").replica is a  # (2 of its 3 blocks)
    c.alive = a.alive = False
    with pytest.raises(LookupError):
        r.choose("m", "x")
    rr = Router(["a", "b"], "round_robin")
    picks = []
    for _ in range(4):
        ch = rr.choose("m", "same prompt")
        rr.dispatched(ch)
        picks.append(ch.replica.index)
    assert picks == [0, 1, 0, 1]  # whatever the load and the prefix


def test_new_prefixes_spread_by_recent_dispatches_not_lifetime_ones():
    """Replica c was out of rotation for a long while (a and b served 400 requests each) and has been back for
    the last 192, a third of them its own. Six new prefixes then arrive with nothing in flight: they go 2, 2, 2,
    where ties broken by lifetime dispatches sent all six to c."""
    from serve.routing import RECENT_HALF_LIFE

    r = Router(["a", "b", "c"], "cache_aware", slack=2, block=4)
    a, b, c = r.replicas

    def send(replica, text):
        ch = r.choose("m", text)
        ch.replica = replica
        r.dispatched(ch)
        r.done(replica)

    def new_agents(name):  # six prefixes no replica was sent, one request each, nothing left in flight
        picks = []
        for agent in range(6):
            ch = r.choose("m", f"{agent}th {name}, a system prompt of its own")
            r.dispatched(ch)
            r.done(ch.replica)
            picks.append(ch.replica.url)
        return picks

    for i in range(400):
        send(a, f"old a {i}")
        send(b, f"old b {i}")
    for i in range(64):
        for x in (a, b, c):
            send(x, f"recent {x.url} {i}")
    assert (a.routed, c.routed) == (464, 64)
    # 1 + d + d^2 + ... over all dispatches (d = 2^(-1 / half-life)), a third each: the 800 old ones weigh ~0
    total = 1 / (1 - 0.5 ** (1 / RECENT_HALF_LIFE))
    assert sum(x.recent for x in r.replicas) == pytest.approx(total, rel=1e-3)
    assert all(x.recent == pytest.approx(total / 3, rel=0.05) for x in r.replicas)
    picks = new_agents("agent")
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"], picks
    # c out of rotation for 200 dispatches, then back: it rejoins at the others' mean, not at ~0
    c.alive = False
    for i in range(100):
        send(a, f"while c is down a {i}")
        send(b, f"while c is down b {i}")
    assert c.recent < 0.5  # 200 dispatches: 2^-6.25 of its share
    r.back_in_rotation(c)
    assert c.alive and c.recent == pytest.approx((a.recent + b.recent) / 2)
    picks = new_agents("new agent after c came back")
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"], picks


def test_a_spill_goes_to_another_replica_holding_the_prefix_under_the_cap():
    r = Router(["a", "b", "c"], "cache_aware", slack=2, block=4)
    a, b, c = r.replicas
    p = "abcdefgh"
    r.dispatched(r.choose("m", p + "1"))  # a was sent the prefix
    a.in_flight = 5
    first = r.choose("m", p + "2")  # a over the cap; no other holder: the least loaded
    assert first.replica is b and first.spill and not first.holder and not first.hit
    r.dispatched(first)  # b was sent it too, last: b owns it
    assert r.choose("m", p + "3").replica is b and r.choose("m", p + "3").hit
    b.in_flight, a.in_flight = 5, 1  # the owner b over the cap, a under it (1 < 0 + 2), c the least loaded
    spill = r.choose("m", p + "3")
    assert spill.replica is a and spill.spill and spill.holder and spill.had_owner and not spill.hit
    assert (r.spills, r.spills_to_holder) == (2, 1)
    a.in_flight = 2  # a holds it but is at the cap (not 2 < 0 + 2): the load cap wins, the least loaded
    capped = r.choose("m", p + "3")
    assert capped.replica is c and capped.spill and not capped.holder
    assert r.choose("m", "zzzzzzzz").replica is c  # no holder at all: the least loaded, as before
    assert Router(["a"], "least_loaded").choose("m", p).spill is False


def test_a_spill_prefers_the_holder_with_the_longest_match_then_the_least_loaded():
    r = Router(["a", "b", "c", "d"], "cache_aware", slack=3, block=4)
    a, b, c, d = r.replicas

    def send(text, replica):
        ch = r.choose("m", text)
        ch.replica = replica
        r.dispatched(ch)

    send("wxyz1234", a)  # a holds 2 blocks of the request below
    send("wxyzAB", b)  # b holds 1 (wxyz)
    send("wxyz1234ZZ", c)  # c holds 2 and was sent them last: the owner
    a.in_flight, b.in_flight, c.in_flight, d.in_flight = 2, 0, 9, 0
    ch = r.choose("m", "wxyz1234QQ")
    assert ch.had_owner and ch.replica is a and ch.holder  # the longest match under the cap (2 < 0 + 3)
    a.in_flight = 3  # at the cap: b (1 block) rather than d (none), both idle
    assert r.choose("m", "wxyz1234QQ").replica is b
    send("wxyz1234", d)  # d now holds 2 blocks too, with fewer in flight than a
    c.in_flight, d.in_flight, a.in_flight = 9, 9, 1  # d became the owner: over the cap with c
    a2 = r.choose("m", "wxyz1234QQ")
    assert a2.replica is a and a2.holder
    d.in_flight = 0
    a.in_flight = 2
    assert r.choose("m", "wxyz1234QQ").replica is d  # d: the owner (longest match, sent last), under the cap


def test_cache_aware_never_exceeds_the_load_cap():
    """Random prefixes, dispatches and completions: every pick has fewer than `slack` more requests in flight
    than the least-loaded replica had (so none runs more than `slack` above it), spills to holders included."""
    import random

    rng = random.Random(0)
    for slack in (1, 2, 3):
        r = Router([str(i) for i in range(3)], "cache_aware", slack=slack, block=4)
        flying = []
        for _ in range(3000):
            if flying and rng.random() < 0.45:
                r.done(flying.pop(rng.randrange(len(flying))))
                continue
            ch = r.choose("m", f"agent{rng.randrange(8)}:" + "x" * rng.randrange(12))
            least = min(x.in_flight for x in r.live())
            assert ch.replica.in_flight < least + slack
            r.dispatched(ch)
            flying.append(ch.replica)
        assert r.spills_to_holder > 0 and r.spills > r.spills_to_holder


def test_texts_equal_the_models_own_greedy_decode_on_every_replica(router, reference):
    model, tok = reference
    eos = tok.token_to_id("<|endoftext|>")
    assert [m.id for m in router.client.models.list().data] == ["tiny"]
    before = routed(router)
    for p in PROMPTS:
        r = router.client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
        want = greedy_reference(model, encode(tok, p), 24, eos)
        assert r.choices[0].text == tok.decode(want)
        assert r.usage.completion_tokens == len(want)
        streamed = router.client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    after = routed(router)
    assert all(a - b >= 3 for a, b in zip(after, before)), (before, after)  # both replicas answered


def test_least_loaded_dispatch(router, reference):
    model, tok = reference
    eos = tok.token_to_id("<|endoftext|>")
    h = state(router)
    # The next request without a prefix owner goes to the least loaded: both idle, so the one sent fewer lately.
    first = min(h["replicas"], key=lambda r: (r["in_flight"], r["recent"], r["replica"]))["replica"]
    before = routed(router)
    with paused(h["replicas"][first]["pid"]):
        held = Held(router, "while True:\n", stream=True)
        assert wait_in_flight(router, 1)[first] == 1
        for p in ["q1 = 0", "q2 = 0", "q3 = 0"]:  # new prompts, no prefix owner: all to the idle replica
            router.client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0)
        after = routed(router)
        assert after[first] == before[first] + 1 and after[1 - first] == before[1 - first] + 3
    assert held.join() == tok.decode(greedy_reference(model, encode(tok, "while True:\n"), LONG, eos))
    # Concurrent requests spread: 4 at once over 2 idle replicas go 2 and 2. Both replicas are paused while
    # the 4 are dispatched, so none can finish (and free its replica) before the last is routed: under a
    # loaded machine a request answered early let the next go to the same replica (3 and 1, a flake).
    before = routed(router)
    threads = [threading.Thread(target=router.client.completions.create,
                                kwargs={"model": "tiny", "prompt": p, "max_tokens": 60, "temperature": 0})
               for p in ["a = 1", "b = 2", "c = 3", "d = 4"]]
    with paused(h["replicas"][0]["pid"]), paused(h["replicas"][1]["pid"]):
        for t in threads:
            t.start()
        assert sorted(wait_in_flight(router, 4)) == [2, 2]
    for t in threads:
        t.join(60)
    after = routed(router)
    assert sorted(a - b for a, b in zip(after, before)) == [2, 2]
    text = router.metrics()
    assert metric(text, 'router_requests_in_flight{replica="0"}') == 0
    assert metric(text, 'router_requests_routed_total{replica="0"}') == after[0]
    assert 'serve_kv_slots_free{replica="1",module="model"} 8' in text


def test_cache_aware_keeps_a_prefix_on_its_replica_then_spills_at_the_cap(router, reference):
    model, tok = reference
    eos = tok.token_to_id("<|endoftext|>")
    h0 = state(router)
    before = routed(router)
    for s in SUFFIXES:  # one at a time: all on the replica that served the prefix first
        router.client.completions.create(model="tiny", prompt=SHARED + s, max_tokens=4, temperature=0)
    h1 = state(router)
    delta = [a - b for a, b in zip(routed(router), before)]
    owner = delta.index(len(SUFFIXES))
    assert delta[1 - owner] == 0
    assert h1["prefix_hits"] - h0["prefix_hits"] == len(SUFFIXES) - 1
    # SLACK requests of the prefix in flight on the owner, the other idle: the next one spills over.
    with paused(h1["replicas"][owner]["pid"]):
        held = [Held(router, SHARED + s, stream=False) for s in SUFFIXES[:SLACK]]
        assert wait_in_flight(router, SLACK)[owner] == SLACK
        r = router.client.completions.with_raw_response.create(model="tiny", prompt=SHARED + "pass",
                                                               max_tokens=4, temperature=0)
        assert r.headers["x-replica"] == str(1 - owner)
        assert state(router)["prefix_spills"] == h1["prefix_spills"] + 1
    for h, s in zip(held, SUFFIXES):
        assert h.join() == tok.decode(greedy_reference(model, encode(tok, SHARED + s), LONG, eos))


def test_a_client_that_disconnects_from_the_router_frees_the_replicas_slots(router):
    body = {"model": "tiny", "prompt": "def cut(", "max_tokens": LONG, "n": 4, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event, then the client goes away
    deadline = time.monotonic() + 30
    while True:
        h = state(router)
        if h["in_flight"] == 0 and all(x["health"]["free_slots"] == x["health"]["slots"] and
                                       x["health"]["running"] == 0 for x in h["replicas"]):
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert metric(router.metrics(), 'router_requests_total{status="499"}') >= 1
    statuses = re.findall(r'^serve_requests_total\{replica="\d",endpoint="completions",status="499"\} (\d+)$',
                          router.metrics(), re.M)
    assert sum(int(n) for n in statuses) == 1  # the replica saw the disconnect too


def test_a_killed_replica_fails_its_requests_with_503_and_the_other_serves(router, reference):
    model, tok = reference
    prompt = SHARED + "def g("
    r = router.client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=2)
    victim = int(r.headers["x-replica"])  # now the prefix's owner: the next two follow it (0 and 1 < 0 + 2)
    pid = state(router)["replicas"][victim]["pid"]
    streamed = Held(router, prompt, stream=True)
    assert streamed.first.wait(60)
    os.kill(pid, signal.SIGSTOP)  # mid-stream (LONG - 1 tokens to go)
    plain = Held(router, prompt, stream=False)
    assert wait_in_flight(router, 2)[victim] == 2
    os.kill(pid, signal.SIGKILL)
    plain, streamed = plain.join(), streamed.join()
    assert isinstance(plain, openai.APIStatusError) and plain.status_code == 503, plain
    assert plain.body["code"] == "replica_failed"
    assert isinstance(streamed, openai.APIError), streamed  # the stream's last event is the error
    eos = tok.token_to_id("<|endoftext|>")
    for p in PROMPTS[:3] + [prompt]:
        r = router.client.completions.with_raw_response.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
        assert r.headers["x-replica"] == str(1 - victim)
        assert r.parse().choices[0].text == tok.decode(greedy_reference(model, encode(tok, p), 8, eos))
    h = state(router)
    assert h["status"] == "ok" and h["replicas_alive"] == 1
    dead = h["replicas"][victim]
    assert dead["alive"] is False and dead["returncode"] == -signal.SIGKILL and dead["failed"] == 2
    assert metric(router.metrics(), f'router_replica_up{{replica="{victim}"}}') == 0


def test_sigterm_finishes_in_flight_requests_and_stops_the_replicas(router, reference):
    model, tok = reference
    eos = tok.token_to_id("<|endoftext|>")
    h = state(router)
    pids = [r["pid"] for r in h["replicas"]]
    live = [r for r in h["replicas"] if r["alive"]]
    with paused(live[0]["pid"]):
        held = Held(router, PROMPTS[0], stream=True)
        wait_in_flight(router, 1)
        router.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert router.proc.poll() is None  # waiting for the request in flight
    assert router.proc.wait(60) == 0
    assert held.join() == tok.decode(greedy_reference(model, encode(tok, PROMPTS[0]), LONG, eos))
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    records = router.log_records()
    down = {r["replica"] for r in records if r.get("event") == "replica_down"}
    assert {r["replica"] for r in records if r.get("event") == "stopped" and "replica" in r} == {0, 1} - down
    assert records[-1]["event"] == "stopped" and records[-1]["replicas"] == 2


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    for args, text in ((["--replicas", "0"], "--replicas must be >= 1, got 0"),
                       (["--replicas", "2", "--cache-slack", "0"], "--cache-slack must be >= 1, got 0"),
                       (["--policy", "round_robin"], "--policy (router options) need --replicas N > 1")):
        out = subprocess.run([sys.executable, "-m", "serve", str(tmp_path), *args], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.strip() == f"error: {text}", out.stderr
    out = subprocess.run([sys.executable, "-m", "serve", str(tmp_path / "nope"), "--replicas", "2"], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"error: RUN={tmp_path / 'nope'}: no such run directory"]


def test_quantized_server_text_equals_the_quantized_models_greedy_decode(run, reference):
    import copy

    from model.quantize import quantize_int8_weight_only

    model, tok = reference
    q = copy.deepcopy(model)
    assert quantize_int8_weight_only(q)["layers"] > 0
    eos = tok.token_to_id("<|endoftext|>")
    server = Server(run, "--quantize", "int8", "--max-slots", "4", "--threads", "1")
    try:
        differs = 0
        for p in PROMPTS:
            r = server.client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
            want = tok.decode(greedy_reference(q, encode(tok, p), 24, eos))
            assert r.choices[0].text == want
            differs += want != tok.decode(greedy_reference(model, encode(tok, p), 24, eos))
        print(f"int8 greedy texts that differ from fp32: {differs} of {len(PROMPTS)}")
        loaded = next(r for r in server.log_records() if r.get("event") == "loaded")
        assert loaded["quantized"]["model"]["layers"] == quantize_int8_weight_only(copy.deepcopy(model))["layers"]
    finally:
        server.close()


def test_onnxruntime_engine_serves_an_onnx_export(run, reference, tmp_path):
    from launch.onnx_export import OrtDecoder, write_onnx_folder

    model, tok = reference
    folder = tmp_path / "exports" / "tiny-onnx"
    write_onnx_folder(model, folder, run / "tokenizer.json", int8=False)
    eos = tok.token_to_id("<|endoftext|>")
    ort = OrtDecoder(folder, threads=1)
    server = Server(folder, "--engine", "onnxruntime", "--max-slots", "4", "--threads", "1")
    try:
        assert [m.id for m in server.client.models.list().data] == ["tiny-onnx"]
        texts = {}
        for p in PROMPTS[:3]:
            r = server.client.completions.create(model="tiny-onnx", prompt=p, max_tokens=20, temperature=0)
            want = ort.greedy([encode(tok, p)], 20)[0]
            want = want[:want.index(eos) + 1] if eos in want else want
            assert r.choices[0].text == tok.decode(want)
            texts[p] = r.choices[0].text
        # Requests in flight together (interleaved per token) get their lone texts; a seed repeats its draw.
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: server.client.completions.create(
                model="tiny-onnx", prompt=p, max_tokens=20, temperature=0).choices[0].text, PROMPTS[:3]))
        assert got == [texts[p] for p in PROMPTS[:3]]
        a, b = (server.client.completions.create(model="tiny-onnx", prompt="x = ", max_tokens=20, temperature=0.9,
                                                 seed=7).choices[0].text for _ in range(2))
        assert a == b
        assert server.wait_idle()["free_slots"] == {"model": 4}
    finally:
        server.close()
