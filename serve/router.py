"""Replicas behind a router (`python -m serve RUN --replicas N`, `make serve RUN=... REPLICAS=N`).

`Workers` starts N replica processes, each the one-process server (`python -m serve RUN --port P`) on its
own loopback port, in its own session (Ctrl-C reaches the router only) and bound to the router's life
(Linux: the kernel sends a replica SIGTERM when the router dies, so none is left behind). Their stderr (the
JSON request log) is passed on, each JSON line with `"replica": i`.

`build_router_app` is the router: an ASGI app with the same OpenAI routes. Each generation request goes to
the replica `serve.routing.Router` picks (least-loaded, cache-aware with a load cap; the rule is there), its
body untouched; the replica's answer is passed back as it comes (a stream chunk by chunk), with an
`x-replica` header naming the replica. Replicas may each serve models of their own (`--engine vllm`): then
only those that serve a request's `model` are candidates, an unknown model is the server's 404, and
`/v1/models` is the union of theirs. A client that disconnects closes the router's connection to the
replica, so the replica frees the request's KV slots as it does for a direct client.

A replica whose process exits (or that refuses a connection) is taken out of rotation at once; the requests
it had in flight get a 503 with OpenAI's error body (code `replica_failed`; a stream that had begun gets it
as its last event), and later requests go to the others. One that refused connections but whose process
lives is put back once its /health answers 200. `/health` and `/metrics` aggregate the replicas'.
SIGTERM/Ctrl-C: the router stops accepting connections, lets the requests in flight finish, then sends each
replica SIGTERM (they have nothing left in flight) and waits for it."""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, suppress

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from launch.multiproc import free_port

from .procs import bound_socket, stop_all
from .protocol import MISSING_MODEL, APIError, unknown_model
from .routing import Replica, Router, UnknownModel, prefix_text

__all__ = ["Workers", "build_router_app"]

_log_lock = threading.Lock()


def _log(**fields) -> None:
    record = {"ts": round(time.time(), 3), **{k: v for k, v in fields.items() if v is not None}}
    with _log_lock:
        sys.stderr.write(json.dumps(record, separators=(",", ":")) + "\n")
        sys.stderr.flush()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Workers:
    """The replica processes: `python -m serve RUN --host 127.0.0.1 --port P ...worker_args`, or the command
    line `command(i, P)` gives for replica i (serve.vllm_engine: `vllm serve ...`), which must serve the
    OpenAI routes and `/health` on 127.0.0.1:P. `one_at_a_time`: each replica is started once the one before
    answers /health (vLLM sizes its KV cache from the GPU memory free when it starts)."""

    def __init__(self, run: str, n: int, worker_args: list[str], env: dict | None = None, command=None,
                 one_at_a_time: bool = False):
        self.run, self.n, self.worker_args, self.env = run, n, worker_args, env
        self.command, self.one_at_a_time = command, one_at_a_time
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self._threads: list[threading.Thread] = []

    def _spawn(self, i: int) -> None:
        if self.command is not None:  # another program (vLLM) binds the port itself
            port = free_port()
            cmd, sock = self.command(i, port), None
        else:  # our replica gets the port bound (--listen-fd): nothing started meanwhile can take it
            sock = bound_socket(0)
            port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "serve", self.run, "--host", "127.0.0.1", "--port", str(port),
                   "--listen-fd", str(sock.fileno()), *self.worker_args]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env,
                                    start_new_session=True, preexec_fn=_die_with_parent,
                                    pass_fds=(sock.fileno(),) if sock is not None else ())
        finally:
            if sock is not None:
                sock.close()  # the replica holds its own copy
        t = threading.Thread(target=self._forward, args=(i, proc), name=f"replica-{i}-log", daemon=True)
        t.start()
        self.procs.append(proc)
        self.urls.append(f"http://127.0.0.1:{port}")
        self._threads.append(t)

    @staticmethod
    def _forward(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            text = line.decode("utf-8", "replace")
            if text.startswith("{"):
                with suppress(ValueError):
                    text = json.dumps({**json.loads(text), "replica": i}, separators=(",", ":")) + "\n"
            with _log_lock:
                sys.stderr.write(text)
                sys.stderr.flush()

    def _wait_healthy(self, indices: list[int], timeout: float) -> int | None:
        """None when every replica in `indices` answers /health 200; else the exit code of one that exited."""
        deadline = time.monotonic() + timeout
        pending = set(indices)
        while pending:
            for i in sorted(pending):
                rc = self.procs[i].poll()
                if rc is not None:
                    return rc or 1
                with suppress(httpx.HTTPError):
                    if httpx.get(self.urls[i] + "/health", timeout=1).status_code == 200:
                        pending.discard(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas {sorted(pending)} did not answer /health within {timeout:.0f} s")
            if pending:
                time.sleep(0.1)
        return None

    def start(self, timeout: float = 300.0) -> int | None:
        """Start replica 0 first (a run that cannot be served fails once, with the replica's one-line
        error), then the others together (`one_at_a_time`: each once the one before is up). None when all are up, else the failed replica's exit code (the
        others are stopped)."""
        try:
            self._spawn(0)
            rc = self._wait_healthy([0], timeout)
            rest = list(range(1, self.n))
            for batch in ([[i] for i in rest] if self.one_at_a_time else [rest]):
                if rc is not None or not batch:
                    break
                for i in batch:
                    self._spawn(i)
                rc = self._wait_healthy(batch, timeout)
        except BaseException:
            self.stop(kill=True)
            raise
        if rc is not None:
            self.stop()
        return rc

    def stop(self, timeout: float = 60.0, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) every replica still running, then wait for all (SIGKILL after `timeout`)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        stop_all(self.procs, timeout)
        for t in self._threads:
            t.join(5)


def _error(status: int, message: str, code: str) -> JSONResponse:
    e = APIError(status, message, type="server_error" if status >= 500 else "invalid_request_error", code=code)
    return JSONResponse(e.body(), status_code=status)


def _relabel(text: str, i: int, seen: set[str]) -> list[str]:
    """A replica's Prometheus lines with replica="i" added (HELP/TYPE lines once per metric)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            if line not in seen:
                seen.add(line)
                out.append(line)
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (.*)$", line)
        if m:
            labels = f'replica="{i}"' + (f",{m.group(3)}" if m.group(3) else "")
            out.append(f"{m.group(1)}{{{labels}}} {m.group(4)}")
    return out


def build_router_app(router: Router, workers: Workers | None = None) -> Starlette:
    """`workers`: the replica processes, watched for exits and stopped at shutdown (None in unit use)."""
    state: dict = {"client": None, "requests": {}}
    procs = workers.procs if workers else []

    def take_down(r: Replica, why: str) -> None:
        if r.alive:
            r.alive = False
            rc = procs[r.index].poll() if procs else None
            _log(event="replica_down", replica=r.index, reason=why, returncode=rc,
                 in_rotation=[x.index for x in router.live()])

    async def monitor() -> None:
        client: httpx.AsyncClient = state["client"]
        while True:
            for r in router.replicas:
                rc = procs[r.index].poll() if procs else None
                if r.alive and rc is not None:
                    take_down(r, f"the process exited with {rc}")
                elif not r.alive and procs and rc is None:  # refused a connection; back once healthy
                    with suppress(httpx.HTTPError):
                        if (await client.get(r.url + "/health", timeout=1)).status_code == 200:
                            router.back_in_rotation(r)
                            _log(event="replica_up", replica=r.index)
            await asyncio.sleep(0.2)

    @asynccontextmanager
    async def lifespan(app):
        state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        task = asyncio.create_task(monitor())
        yield
        # uvicorn calls this after the requests in flight have been answered.
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await state["client"].aclose()
        if workers:
            await asyncio.to_thread(workers.stop)

    def count(status: int) -> None:
        state["requests"][status] = state["requests"].get(status, 0) + 1

    def failed(r: Replica, e: Exception) -> str:
        """The replica failed under a request: out of rotation if its process is gone or the connection broke
        (refused, reset, closed mid-answer). A killed replica's connections break before its exit can be
        reaped, and on a loaded machine the next request came in that gap and went to it; one still alive
        is back in rotation (the monitor) as soon as /health answers."""
        r.failed += 1
        rc = procs[r.index].poll() if procs else None
        if rc is not None or isinstance(e, httpx.TransportError):
            take_down(r, f"the process exited with {rc}" if rc is not None else repr(e))
        return f"replica {r.index} failed while answering: {type(e).__name__}"

    async def models(request: Request):
        live = router.live()
        if not live:
            return _error(503, "no replica is in rotation", "unavailable")
        if router.model_sets():
            return await union_of_models(live)
        r = min(live, key=lambda x: x.in_flight)
        try:
            resp = await state["client"].get(r.url + "/v1/models")
        except httpx.HTTPError as e:
            return _error(503, failed(r, e), "replica_failed")
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    async def union_of_models(live: list[Replica]):
        """Replicas that each serve their own models: every live replica's /v1/models entries for the models
        it is routed (a vLLM process also lists a LoRA base's own name, which is not routed), by name."""
        async def one(r: Replica):
            try:
                resp = await state["client"].get(r.url + "/v1/models")
                return r, resp.json()["data"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                if isinstance(e, httpx.HTTPError):
                    failed(r, e)
                return r, []

        seen: dict[str, dict] = {}
        for r, data in await asyncio.gather(*(one(r) for r in live)):
            for m in data:
                if isinstance(m, dict) and router.serves(r, m.get("id")):
                    seen.setdefault(m["id"], m)
        return JSONResponse({"object": "list", "data": [seen[k] for k in sorted(seen)]})

    async def health(request: Request):
        async def one(r: Replica):
            if not r.alive:
                return None
            with suppress(httpx.HTTPError, ValueError):
                return (await state["client"].get(r.url + "/health", timeout=1)).json()
            return None

        answers = await asyncio.gather(*(one(r) for r in router.replicas))
        reps = [{"replica": r.index, "url": r.url, "pid": procs[r.index].pid if procs else None, "alive": r.alive,
                 "models": sorted(r.models) if r.models is not None else None,
                 "returncode": procs[r.index].poll() if procs else None, "in_flight": r.in_flight,
                 "routed": r.routed, "recent": r.recent, "prefix_hits": r.prefix_hits, "failed": r.failed, "health": h}
                for r, h in zip(router.replicas, answers)]
        ok = bool(router.live())
        return JSONResponse({"status": "ok" if ok else "unavailable", "policy": router.policy,
                             "slack": router.slack, "replicas_alive": len(router.live()),
                             "in_flight": sum(r.in_flight for r in router.replicas),
                             "routed": sum(r.routed for r in router.replicas),
                             "prefix_lookups": router.lookups, "prefix_hits": sum(r.prefix_hits for r in router.replicas),
                             "prefix_spills": router.spills, "prefix_spills_to_holder": router.spills_to_holder,
                             "replicas": reps}, status_code=200 if ok else 503)

    async def prometheus(request: Request):
        rs = router.replicas
        out = ["# HELP router_replica_up 1 while the replica is in rotation.", "# TYPE router_replica_up gauge",
               *(f'router_replica_up{{replica="{r.index}"}} {int(r.alive)}' for r in rs),
               "# HELP router_requests_in_flight Requests sent to the replica and not yet answered in full.",
               "# TYPE router_requests_in_flight gauge",
               *(f'router_requests_in_flight{{replica="{r.index}"}} {r.in_flight}' for r in rs),
               "# HELP router_requests_routed_total Requests sent to the replica.",
               "# TYPE router_requests_routed_total counter",
               *(f'router_requests_routed_total{{replica="{r.index}"}} {r.routed}' for r in rs),
               "# HELP router_prefix_hits_total Requests sent to the replica that served their prefix last.",
               "# TYPE router_prefix_hits_total counter",
               *(f'router_prefix_hits_total{{replica="{r.index}"}} {r.prefix_hits}' for r in rs),
               "# HELP router_replica_failures_total Requests that got a 503 because the replica failed.",
               "# TYPE router_replica_failures_total counter",
               *(f'router_replica_failures_total{{replica="{r.index}"}} {r.failed}' for r in rs),
               "# HELP router_prefix_lookups_total Routed requests that had a prefix text.",
               "# TYPE router_prefix_lookups_total counter", f"router_prefix_lookups_total {router.lookups}",
               "# HELP router_prefix_spills_total Requests sent elsewhere because their prefix's replica was over the cap.",
               "# TYPE router_prefix_spills_total counter", f"router_prefix_spills_total {router.spills}",
               "# HELP router_prefix_spills_to_holder_total Spills sent to another replica that was sent the prefix.",
               "# TYPE router_prefix_spills_to_holder_total counter",
               f"router_prefix_spills_to_holder_total {router.spills_to_holder}",
               "# HELP router_requests_total Generation requests answered by the router, by HTTP status.",
               "# TYPE router_requests_total counter",
               *(f'router_requests_total{{status="{s}"}} {n}' for s, n in sorted(state["requests"].items()))]

        async def one(r: Replica):
            if not r.alive:
                return ""
            with suppress(httpx.HTTPError):
                return (await state["client"].get(r.url + "/metrics", timeout=1)).text
            return ""

        seen: set[str] = set()
        for r, text in zip(rs, await asyncio.gather(*(one(r) for r in rs))):
            out += _relabel(text, r.index, seen)
        return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")

    async def generate(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # the replica answers the error
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else ""
        if not model and router.model_sets() and isinstance(body, dict):  # no replica serves every model
            count(400)
            e = APIError(400, MISSING_MODEL, param="model", code="missing_model")
            return JSONResponse(e.body(), status_code=400)
        try:
            choice = router.choose(model, prefix_text(body))
        except UnknownModel as e:  # as the one-process server answers it
            count(404)
            return JSONResponse(unknown_model(model, e.known).body(), status_code=404)
        except LookupError:
            count(503)
            return _error(503, "no replica is in rotation (every replica has failed)", "unavailable")
        router.dispatched(choice)
        return _Proxy(choice.replica, request.url.path, raw, state["client"], router, failed, count)

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        e = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(e.body(), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {exc!r}", None)

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/completions", generate, methods=["POST"]),
              Route("/v1/chat/completions", generate, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


class _Proxy:
    """The replica's answer passed back as it comes; the client's disconnect closes the replica connection."""

    def __init__(self, replica: Replica, path: str, raw: bytes, client: httpx.AsyncClient, router: Router,
                 failed, count):
        self.replica, self.path, self.raw, self.client = replica, path, raw, client
        self.router, self.failed, self.count = router, failed, count

    async def __call__(self, scope, receive, send):
        task = asyncio.ensure_future(self._pass(send))
        watcher = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                try:
                    status = task.result()
                except OSError:  # the client went away while we wrote to it
                    status = 499
            else:  # the client went away: closing the stream closes the replica's connection
                task.cancel()
                with suppress(asyncio.CancelledError, OSError):
                    await task
                status = 499
        finally:
            watcher.cancel()
            self.router.done(self.replica)
        self.count(status)

    async def _pass(self, send) -> int:
        r = self.replica
        started = False
        try:
            async with self.client.stream("POST", r.url + self.path, content=self.raw,
                                          headers={"content-type": "application/json"}) as resp:
                ctype = resp.headers.get("content-type", "application/json")
                headers = [(b"content-type", ctype.encode()), (b"x-replica", str(r.index).encode())]
                if ctype.startswith("text/event-stream"):
                    await send({"type": "http.response.start", "status": resp.status_code,
                                "headers": headers + [(b"cache-control", b"no-cache")]})
                    started = True
                    async for chunk in resp.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                else:
                    data = await resp.aread()
                    await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
                    started = True
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                return resp.status_code
        except httpx.HTTPError as e:
            message = self.failed(r, e)
            body = APIError(503, message + "; retry the request", type="server_error", code="replica_failed").body()
            if not started:
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"x-replica", str(r.index).encode())]})
                await send({"type": "http.response.body", "body": json.dumps(body).encode(), "more_body": False})
            else:  # a stream that had begun: the error as its last event (as the server does for engine errors)
                with suppress(OSError):
                    await send({"type": "http.response.body", "body": f"data: {json.dumps(body)}\n\n".encode(),
                                "more_body": False})
            return 503


async def _disconnect(receive) -> None:
    while True:
        if (await receive())["type"] == "http.disconnect":
            return
