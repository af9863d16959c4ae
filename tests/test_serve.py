"""The OpenAI-compatible server (`python -m serve`, serve/) end to end: a tiny run trained here, served by a
real uvicorn process on a loopback port, queried with the official `openai` client. Every text is checked
against an independent reference: the model's own greedy decode by a plain argmax loop over full forwards
(no KV cache, no engine), or the same request sent alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from launch.multiproc import free_port
from serve.procs import ServerDidNotStart, launch_server
from tests.trainutil import REPO, env, train_once

CONTEXT = 256  # the tiny run's max_seq_len: long enough for requests that take a while to decode
PROMPTS = ["def main(argv):\n", "import os\n\nclass ", "    return self.", "x = [", "# Copyright"]


class Server:
    """`python -m serve RUN` on a free loopback port; stderr (the JSON request log) goes to a file."""

    def __init__(self, run: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = run.parent.parent / f"serve-{run.name}-{self.port}.log"
        self._log = open(self.log_path, "w")
        try:
            self.proc = launch_server([str(run), *args], self.port, self._log, 120, cwd=REPO, env=env())
        except ServerDidNotStart as e:
            raise AssertionError(f"{e}: {self.log_path.read_text()}") from None
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """/health once nothing runs or waits and every slot is free."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0 and h["free_slots"] == h["slots"]:
                return h
            assert time.monotonic() < deadline, f"slots still busy: {h}"
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def greedy_reference(model, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    """The model's own greedy continuation: argmax of a full forward over the whole sequence each step."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            tok = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok == eos:
                break
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    train_once(root, "tiny", "train.max_steps=60", f"model.max_seq_len={CONTEXT}")
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def reference(run):
    """(model, tokenizer) rebuilt from the checkpoint by trainer/ alone, not through serve/."""
    from tokenizers import Tokenizer

    from trainer.consolidate import load_run_model

    return load_run_model(run)[0], Tokenizer.from_file(str(run / "tokenizer.json"))


@pytest.fixture(scope="module")
def server(run):
    s = Server(run, "--max-slots", "16")
    yield s
    s.close()


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def test_models_health_and_cli_errors(server, tmp_path):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    h = server.health()
    assert h["status"] == "ok" and h["models"] == ["tiny"] and h["slots"] == {"model": 16}
    res = subprocess.run([sys.executable, "-m", "serve", str(tmp_path / "nope")], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: RUN=") and "Traceback" not in res.stderr
    res = subprocess.run(["make", "-s", "serve", "RUN="], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "usage: make serve RUN=runs/<name>" in res.stderr


def test_greedy_text_and_usage_equal_the_models_own_greedy_decode(server, reference):
    model, tok = reference
    eos = tok.token_to_id("<|endoftext|>")
    for prompt in PROMPTS:
        ids = encode(tok, prompt)
        want = greedy_reference(model, ids, 40, eos)
        r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
        assert r.choices[0].text == tok.decode(want), prompt
        assert r.choices[0].finish_reason == ("stop" if want[-1] == eos else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
        assert r.usage.total_tokens == len(ids) + len(want)
    # a prompt given as token ids is the same request
    ids = encode(tok, PROMPTS[0])
    r = server.client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == tok.decode(greedy_reference(model, ids, 10, eos))


def test_chat_renders_the_gpt2_template(server, reference):
    from serve.chat import render

    model, tok = reference
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def f("}]
    text = render("gpt2", [(m["role"], m["content"]) for m in messages])
    assert text == "System: You write Python.\n\nUser: def f(\n\nAssistant:"
    ids = encode(tok, text)
    want = greedy_reference(model, ids, 20, tok.token_to_id("<|endoftext|>"))
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))


def sampled_reference(model, prompt: list[int], max_new: int, temperature: float, seed: int, eos: int) -> list[int]:
    """Sampling as serve documents it, in plain torch: softmax(logits / T), one uniform number per token from
    a torch.Generator seeded with `seed`, the first token whose cumulative probability exceeds it."""
    g = torch.Generator().manual_seed(seed)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            probs = (model(torch.tensor([ids]))[0, -1].float() / temperature).softmax(-1)
            cdf = probs.double().cumsum(-1)
            u = float(torch.rand((), generator=g))
            tok = min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64),
                                             right=True)), len(cdf) - 1)
            out.append(tok)
            ids.append(tok)
            if tok == eos:
                break
    return out


def test_seeded_sampling_equals_a_plain_torch_sampler(server, reference):
    model, tok = reference
    eos = tok.token_to_id("<|endoftext|>")
    for seed, prompt in enumerate(PROMPTS[:3]):
        want = sampled_reference(model, encode(tok, prompt), 30, 0.9, seed, eos)
        r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0.9, seed=seed)
        assert r.choices[0].text == tok.decode(want) and r.usage.completion_tokens == len(want)
        assert len(set(want)) > 3  # a varied text, not a repeated token


def _request(client, i: int):
    """Request i of a mixed set: greedy and seeded sampling, ragged prompt and output lengths."""
    kw = dict(model="tiny", prompt=PROMPTS[i % len(PROMPTS)] * (1 + i % 3), max_tokens=12 + 7 * (i % 4))
    kw.update(temperature=0) if i % 2 == 0 else kw.update(temperature=1.0, top_p=0.9, seed=100 + i)
    return client.completions.create(**kw).choices[0].text


def test_eight_concurrent_clients_get_the_text_each_gets_alone(server):
    alone = [_request(server.client, i) for i in range(8)]
    before = server.metrics()
    steps_before = metric(before, 'serve_decode_batch_rows_count')
    single_before = metric(before, 'serve_decode_batch_rows_bucket{le="1"}')
    start = threading.Barrier(8)

    def client(i):
        start.wait()
        return _request(server.client, i)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(client, range(8)))
    assert together == alone
    after = server.metrics()
    # the requests shared decode steps: some steps ran more than one row
    steps = metric(after, 'serve_decode_batch_rows_count') - steps_before
    single = metric(after, 'serve_decode_batch_rows_bucket{le="1"}') - single_before
    assert steps - single > 0


def test_chunked_prefill_and_no_prefix_cache_serve_the_texts_of_whole_prefills(run, server, reference):
    """8 concurrent requests (greedy and seeded, ragged) on servers with tiny chunks (4 tokens a step, the prefix
    cache off) and without chunking: the texts of the default server, and its greedy texts are the model's own."""
    model, tok = reference
    eos = tok.token_to_id("<|endoftext|>")
    start = threading.Barrier(8)

    def together(s):
        def client(i):
            start.wait()
            return _request(s.client, i)

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(client, range(8)))

    want = together(server)
    for i in range(0, 8, 2):  # the greedy ones
        prompt = PROMPTS[i % len(PROMPTS)] * (1 + i % 3)
        assert want[i] == tok.decode(greedy_reference(model, encode(tok, prompt), 12 + 7 * (i % 4), eos)), i
    for args in (["--prefill-chunk", "4", "--no-prefix-cache"], ["--prefill-chunk", "0"]):
        s = Server(run, "--max-slots", "16", *args)
        try:
            got = together(s)
            # a long request (4 choices), then 4 more sent together while it decodes: with chunking they are
            # admitted by chunks (the long choices would all have to end within a few steps for them not to be)
            long = s.client.completions.create(model="tiny", prompt="x", max_tokens=CONTEXT - 8, temperature=1.0,
                                               n=4, seed=0, stream=True)
            next(iter(long))
            with ThreadPoolExecutor(4) as pool:
                late = list(pool.map(_request, [s.client] * 4, range(4)))
            long.close()
            text = s.metrics()
            loaded = next(r for r in s.log_records() if r.get("event") == "loaded")
        finally:
            s.close()
        assert got == want and late == want[:4], args
        chunks, chunked_rows = metric(text, "serve_prefill_chunks_total"), metric(text, "serve_prefill_chunked_rows_total")
        assert (loaded["http"], loaded["loop"]) == ("h11", "uvloop")  # requirements.txt installs uvloop
        if args[1] == "4":
            assert (loaded["prefill_chunk"], loaded["prefix_cache"]) == (4, False)
            assert chunked_rows >= 4 and chunks > chunked_rows and metric(text, "serve_prefill_chunk_tokens") == 4
            assert metric(text, 'serve_prefix_cache_enabled{module="model"}') == 0
            assert "serve_prefix_cache_lookups_total{" not in text
        else:
            assert chunks == chunked_rows == metric(text, "serve_prefill_chunk_tokens") == 0
            assert metric(text, 'serve_prefix_cache_enabled{module="model"}') == 1
            assert metric(text, 'serve_prefix_cache_lookups_total{module="model"}') >= 12
    res = subprocess.run([sys.executable, "-m", "serve", str(run), "--prefill-chunk", "-1"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: --prefill-chunk must be >= 0")


def test_seed_reproduces_the_text_and_n_draws_seed_plus_index(server):
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=1.5)
    a = server.client.completions.create(**kw, seed=7).choices[0].text
    assert server.client.completions.create(**kw, seed=7).choices[0].text == a
    assert server.client.completions.create(**kw, seed=8).choices[0].text != a
    three = server.client.completions.create(**kw, seed=7, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    for j, c in enumerate(three.choices):
        assert c.text == server.client.completions.create(**kw, seed=7 + j).choices[0].text
    greedy = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage.completion_tokens == 16 and greedy.usage.prompt_tokens == three.usage.prompt_tokens


def test_streaming_chunks_concatenate_to_the_text_with_one_usage_chunk(server, reference):
    _, tok = reference
    for create, kw, text_of in [
        (server.client.completions.create, dict(prompt=PROMPTS[0]), lambda c: c.text),
        (server.client.chat.completions.create, dict(messages=[{"role": "user", "content": "hello"}]),
         lambda c: c.delta.content or ""),
    ]:
        kw = dict(model="tiny", max_tokens=30, temperature=0.8, seed=3, n=2, **kw)
        whole = create(**kw)
        chunks = list(create(**kw, stream=True, stream_options={"include_usage": True}))
        usage = [c for c in chunks if c.usage is not None]
        assert len(usage) == 1 and usage[0] is chunks[-1] and chunks[-1].choices == []
        assert usage[0].usage.model_dump() == whole.usage.model_dump()
        for j, choice in enumerate(whole.choices):
            parts = [ch for c in chunks[:-1] for ch in c.choices if ch.index == j]
            full = choice.text if hasattr(choice, "text") else choice.message.content
            assert "".join(text_of(p) for p in parts) == full
            assert [p.finish_reason for p in parts if p.finish_reason] == [choice.finish_reason]
        plain = list(create(**kw, stream=True))
        assert all(c.usage is None for c in plain)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_cut_the_text_streamed_or_not(server):
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=1.0, seed=11)
    full = server.client.completions.create(**kw).choices[0].text
    middle = len(full) // 2
    stop = next(full[i:i + 2] for i in range(middle, len(full) - 1) if full[i:i + 2].strip())
    want = full[:full.index(stop)]
    r = server.client.completions.create(**kw, stop=[stop, "never appears \x00"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < 40
    streamed = server.client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    server.wait_idle()


def test_a_client_that_disconnects_frees_its_slots(server):
    n, max_tokens = 16, CONTEXT - 8
    before = metric(server.metrics(), "serve_generated_tokens_total")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "def", "max_tokens": max_tokens, "n": n, "temperature": 1.0,
                            "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first chunk, then the connection is closed
    h = server.wait_idle()
    assert h["free_slots"] == {"model": 16}
    generated = metric(server.metrics(), "serve_generated_tokens_total") - before
    assert generated < n * max_tokens / 2  # the rows left the batch long before their end
    records = [r for r in server.log_records() if r.get("status") == 499]
    assert records and records[-1]["client_gone"] is True
    # the same without streaming: the client gives up while the response is being generated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.1,
                   json={"model": "tiny", "prompt": "def", "max_tokens": max_tokens, "n": n, "temperature": 1.0})
    server.wait_idle()
    assert len([r for r in server.log_records() if r.get("status") == 499]) == len(records) + 1
    assert server.client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


LONG = "def f(x):\n    return x\n" * 60

BAD = [  # (body, status, param, code)
    ("{not json", 400, None, "invalid_json"),
    ("[1, 2]", 400, None, "invalid_json"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"prompt": "x"}, 400, "model", "missing_model"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt", "empty_prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ({"model": "tiny", "messages": []}, 400, "messages", "empty_messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.[0].role", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "seed": 1.5}, 400, "seed", "invalid_value"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "invalid_value"),
    ({"model": "tiny", "prompt": "x", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ({"model": "tiny", "prompt": "x", "temprature": 1}, 400, "temprature", "unknown_parameter"),
]


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server):
    for body, status, param, code in BAD:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), (body, err)
    long_err = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": LONG}, timeout=30).json()
    assert f"maximum context length is {CONTEXT} tokens" in long_err["error"]["message"]
    # the official client raises its own error classes for these
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=-3)
    for path, method in [("/v1/nothing", "GET"), ("/v1/completions", "GET")]:
        r = httpx.request(method, server.url + path, timeout=30)
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = server.client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and server.health()["status"] == "ok"


def test_metrics_and_one_json_line_per_request(server):
    server.client.completions.create(model="tiny", prompt="x", max_tokens=4)
    text = server.metrics()
    for name in ["serve_requests_running", "serve_queue_length", "serve_batch_size", "serve_tokens_per_second",
                 "serve_generated_tokens_total", "serve_time_to_first_token_seconds_count",
                 "serve_request_latency_seconds_count", 'serve_kv_slots_free{module="model"}',
                 "serve_prefilling_rows", "serve_prefill_chunks_total", "serve_prefill_chunked_rows_total",
                 "serve_prefill_chunks_with_decode_total"]:
        assert metric(text, name) >= 0
    # the server's defaults: chunked prefill at 64 tokens a step, the prefix cache on and counting
    assert metric(text, "serve_prefill_chunk_tokens") == 64
    assert metric(text, 'serve_prefix_cache_enabled{module="model"}') == 1
    lookups = metric(text, 'serve_prefix_cache_lookups_total{module="model"}')
    server.client.completions.create(model="tiny", prompt="x", max_tokens=4)
    assert metric(server.metrics(), 'serve_prefix_cache_lookups_total{module="model"}') == lookups + 1
    assert metric(text, 'serve_requests_total{endpoint="completions",status="200"}') >= 1
    assert metric(text, 'serve_requests_total{endpoint="completions",status="400"}') >= 1
    assert metric(text, "serve_time_to_first_token_seconds_count") >= 1
    records = server.log_records()
    done = [r for r in records if r.get("event") == "request" and r["status"] == 200]
    assert done and all({"id", "ts", "endpoint", "model", "prompt_tokens", "completion_tokens", "ttft_s",
                         "latency_s", "finish_reasons"} <= set(r) for r in done)
    assert len({r["id"] for r in records if r.get("event") == "request"}) == len(
        [r for r in records if r.get("event") == "request"])


def test_sigterm_finishes_the_requests_in_flight(run, server):
    kw = dict(model="tiny", prompt="def", max_tokens=CONTEXT - 8, n=16, temperature=1.0, seed=1)
    want = server.client.completions.create(**kw)  # the same request on a server left running
    s = Server(run)
    try:
        got: dict = {}
        t = threading.Thread(target=lambda: got.update(r=s.client.completions.create(**kw)))
        t.start()
        deadline = time.monotonic() + 30
        while s.health()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(s.proc.pid, signal.SIGTERM)
        t.join(120)
        assert s.proc.wait(60) == 0
        assert [c.text for c in got["r"].choices] == [c.text for c in want.choices]
        assert got["r"].usage.model_dump() == want.usage.model_dump()
        assert [r["status"] for r in s.log_records() if r.get("event") == "request"] == [200]
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.close()
