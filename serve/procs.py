"""Child processes of the server: waiting for them to stop, and for a server to answer.

`stop_all` is how serve.router stops its replicas and serve.tp_ranks its ranks; `launch_server` is how the
benchmarks (bench/bench_serve*.py) and the tests (tests/test_serve.py) start a server and wait for it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import suppress

__all__ = ["ServerDidNotStart", "launch_server", "stop_all", "wait_healthy"]


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer /health in time (it is then killed)."""


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


def bound_socket(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to host:port (0: any free port; IPv6 when host has a ':'), not yet listening:
    the server's own (serve.cli.listening_socket), or one handed to a server started with --listen-fd, so
    the port is held from the moment it is chosen. OSError when it cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def launch_server(args: list[str], port: int, log=None, timeout: float = 120, poll: float = 0.1, **popen) -> subprocess.Popen:
    """`python -m serve *args --port port` on loopback, its stdout and stderr to `log` (an open file; None:
    discarded); returns the process once /health answers 200. ServerDidNotStart when it exits first or does
    not answer within `timeout` seconds. popen: more subprocess.Popen arguments (cwd, env)."""
    out = subprocess.DEVNULL if log is None else log
    # Bound here and handed over (--listen-fd): nothing started meanwhile can take the port.
    sock = bound_socket(port)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "serve", *args, "--port", str(port), "--listen-fd",
                                 str(sock.fileno())], stdout=out, stderr=subprocess.STDOUT,
                                pass_fds=(sock.fileno(),), **popen)
    finally:
        sock.close()  # the server holds its own copy
    try:
        rc = wait_healthy(proc, f"http://127.0.0.1:{port}", timeout, poll)
    except TimeoutError as e:
        proc.kill()
        proc.wait()
        raise ServerDidNotStart(str(e)) from None
    if rc is not None:
        raise ServerDidNotStart(f"the server exited with {rc}")
    return proc
