"""Soak test of one server (`python -m serve`): SERVE_SOAK_REQUESTS requests (default 200; issue 14 asks
for 1,000: `SERVE_SOAK_REQUESTS=1000 pytest tests/test_serve_soak.py`) from 8 concurrent clients, a random
mix of full and cut-off requests (a stream closed after a few chunks, a non-streamed request given up
after 20 ms). Afterwards: no error but the intended disconnects (499), every KV slot free again (/metrics),
nothing running or waiting, and the server's RSS flat (within 10% + 16 MiB of its size after the first
tenth of the requests). Marked `dist` (a server process, ~20 s at 200): not in `make test-fast`."""

from __future__ import annotations

import json
import os
import random
import re
import threading
from pathlib import Path

import httpx
import pytest

from tests.test_serve import CONTEXT, Server, metric
from tests.trainutil import train_once

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("one_thread")]

REQUESTS = int(os.environ.get("SERVE_SOAK_REQUESTS", "200"))
CLIENTS = 8
SLOTS = 8
WORDS = ["def", "class", "import", "return", "self", "x", "=", "(", ")", ":", "\n", "    ", "for", "in", "if"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("soak")
    train_once(root, "tiny", "train.max_steps=60", f"model.max_seq_len={CONTEXT}")
    return root / "runs" / "tiny"


def rss_kib(pid: int) -> int:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def one(client: httpx.Client, url: str, rng: random.Random, i: int) -> str:
    """One request of a random kind; returns the kind, raises on anything unintended."""
    kind = rng.choice(["stream", "stream_cut", "plain", "plain_cut"])
    body = {"model": "tiny", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))),
            "max_tokens": rng.randint(4, 64), "temperature": 0.8, "seed": i, "n": rng.choice([1, 1, 1, 2])}
    if kind.startswith("stream"):
        body["stream"] = True
        cut = rng.randint(1, 4) if kind == "stream_cut" else None
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events += 1
                    if line == "data: [DONE]":
                        break
                    assert "error" not in json.loads(line[6:]), line
                    if cut is not None and events >= cut:
                        return kind  # closing the response here disconnects
            else:
                raise AssertionError("the stream ended without [DONE]")
        return kind
    if kind == "plain_cut":
        try:
            r = client.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.02))
        except httpx.ReadTimeout:
            return kind
    else:
        r = client.post(url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
    return kind


def test_soak_with_random_disconnects_leaks_no_slot_and_no_memory(run):
    server = Server(run, "--max-slots", str(SLOTS), "--threads", "1")
    try:
        kinds: dict[str, int] = {}
        errors: list[str] = []
        rss: dict[str, int] = {}
        lock = threading.Lock()
        counter = iter(range(REQUESTS))

        def client(c: int):
            rng = random.Random(c)
            with httpx.Client(timeout=60) as http:
                while True:
                    with lock:
                        i = next(counter, None)
                        if i == REQUESTS // 10:
                            rss["warm"] = rss_kib(server.proc.pid)
                    if i is None:
                        return
                    try:
                        k = one(http, server.url, rng, i)
                    except Exception as e:  # noqa: BLE001 - collected, asserted below
                        with lock:
                            errors.append(f"request {i}: {e!r}")
                        continue
                    with lock:
                        kinds[k] = kinds.get(k, 0) + 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1800)
        assert not errors, errors[:5]
        assert sum(kinds.values()) == REQUESTS
        h = server.wait_idle(60)
        rss["end"] = rss_kib(server.proc.pid)
        text = server.metrics()
        assert metric(text, 'serve_kv_slots_free{module="model"}') == SLOTS
        assert metric(text, "serve_requests_running") == 0 and metric(text, "serve_queue_length") == 0
        statuses = {int(s): int(n) for s, n in re.findall(
            r'^serve_requests_total\{endpoint="completions",status="(\d+)"\} (\d+)$', text, re.M)}
        assert set(statuses) <= {200, 499}, statuses
        assert sum(statuses.values()) == REQUESTS
        assert statuses[200] >= kinds.get("stream", 0) + kinds.get("plain", 0)
        assert rss["end"] <= rss["warm"] * 1.10 + 16 * 1024, rss
        print(json.dumps({"requests": REQUESTS, "kinds": kinds, "statuses": statuses, "rss_kib": rss,
                          "health": h}))
    finally:
        server.close()
