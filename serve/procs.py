"""Child processes of the server: waiting for them to stop, and for a server to answer.

`stop_all` is how serve.router stops its replicas and serve.tp_ranks its ranks; `wait_healthy` is how the
benchmarks (bench/bench_serve*.py) and the tests (tests/test_serve.py) wait for a server they started."""

from __future__ import annotations

import subprocess
import time
from contextlib import suppress

__all__ = ["stop_all", "wait_healthy"]


def stop_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process until one shared deadline `timeout` seconds away; SIGKILL those still running
    then (each is waited for at least 0.1 s) and reap them."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, poll: float = 0.1) -> int | None:
    """Poll `url`/health until it answers 200 (None) or `proc` exits (its exit code); TimeoutError after
    `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            return rc
        with suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer /health within {timeout:.0f} s")
        time.sleep(poll)
