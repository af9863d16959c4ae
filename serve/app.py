"""The ASGI app (Starlette): the OpenAI routes over a loaded run and its scheduler.

    GET  /v1/models              the run's model names (an agent each in a multi-agent run)
    POST /v1/completions         prompt -> text (stream: server-sent events, ending `data: [DONE]`)
    POST /v1/chat/completions    messages -> the chat template of the model's style (serve.chat) -> text
    GET  /health                 200 {"status": "ok", ...} while the scheduler runs, else 503
    GET  /metrics                Prometheus text (serve.metrics)

Every error, ours or Starlette's (unknown route, wrong method), has OpenAI's body
{"error": {"message", "type", "param", "code"}}. A client that disconnects cancels its request: its rows
leave the batch at the next token boundary and their KV slots are freed. Each request ends with one JSON
line on stderr (serve.metrics.log_request)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from .job import ClientGone, Job, LoopHandoff
from .loader import LoadedRun
from .metrics import Metrics, log_request
from .protocol import APIError, parse_body, parse_request
from .scheduler import Scheduler

__all__ = ["build_app"]


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(run: LoadedRun, scheduler: Scheduler, metrics: Metrics) -> Starlette:
    created = int(time.time())
    handoff: list[LoopHandoff] = []  # the serving loop's, made at startup

    @asynccontextmanager
    async def lifespan(app):
        handoff.append(LoopHandoff(asyncio.get_running_loop()))
        scheduler.start()
        yield
        # uvicorn calls this after in-flight requests have been answered (graceful shutdown on SIGTERM).
        scheduler.stop()

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": run.run_dir.name}
            for name in run.models]})

    async def health(request: Request):
        snap = scheduler.snapshot
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "stopped", "models": list(run.models),
                             "waiting": snap["waiting"], "running": snap["running"], "free_slots": snap["free_slots"],
                             "slots": {k: e.max_slots for k, e in scheduler.engines.items()}},
                            status_code=200 if ok else 503)

    async def prometheus(request: Request):
        return PlainTextResponse(metrics.render(scheduler.snapshot), media_type="text/plain; version=0.0.4")

    async def completions(request: Request):
        return await generate(request, is_chat=False)

    async def chat_completions(request: Request):
        return await generate(request, is_chat=True)

    async def generate(request: Request, is_chat: bool):
        endpoint = "chat.completions" if is_chat else "completions"
        started = time.perf_counter()
        rid = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            req = parse_request(parse_body(await request.body()), run.models, is_chat)
        except APIError as e:
            metrics.request_refused(endpoint, e.status)
            log_request(id=rid, endpoint=endpoint, status=e.status, error=e.message,
                        latency_s=round(time.perf_counter() - started, 6))
            return error_response(e)
        job = Job(req, scheduler, handoff[0], started)
        try:
            job.submit()
        except RuntimeError as e:  # shutting down, or the decoding loop has stopped
            err = APIError(503, str(e), type="server_error", code="unavailable")
            metrics.request_refused(endpoint, err.status)
            log_request(id=rid, endpoint=endpoint, status=err.status, error=err.message)
            return error_response(err)
        metrics.request_started()
        watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
        meta = {"id": rid, "object": "chat.completion" if is_chat else "text_completion", "created": int(time.time()),
                "model": req.model.name}

        def finish(status: int, error: str | None = None):
            watcher.cancel()
            metrics.request_finished(endpoint, status, job.ttft(), job.latency() if status == 200 else None)
            usage = job.usage()
            log_request(id=rid, endpoint=endpoint, model=req.model.name, status=status, stream=req.stream, n=req.n,
                        prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                        finish_reasons=[c.finish_reason for c in job.choices], client_gone=job.client_gone or None,
                        ttft_s=_round(job.ttft()), latency_s=_round(time.perf_counter() - started), error=error)

        if req.stream:
            return _SSE(_stream(job, meta, is_chat), finish)

        try:
            async for _ in job.events():
                pass
        except ClientGone:
            finish(499, "client disconnected")
            return PlainTextResponse("", status_code=499)  # nobody reads it
        except Exception as e:  # noqa: BLE001 - the engine failed on this request's batch: 500, the server goes on
            # 503 where the error says the server cannot decode any more (serve.tp.RankLost: a rank is gone)
            status = getattr(e, "http_status", 500)
            finish(status, repr(e))
            return error_response(APIError(status, f"generation failed: {e!r}", type="server_error",
                                           code="unavailable" if status == 503 else "engine_error"))
        finish(200)
        if is_chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                        "finish_reason": c.finish_reason} for i, c in enumerate(job.choices)]
        else:
            choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for i, c in enumerate(job.choices)]
        return JSONResponse({**meta, "choices": choices, "usage": job.usage()})

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    async def server_error(request: Request, exc: Exception):
        return error_response(APIError(500, f"internal error: {exc!r}", type="server_error"))

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


async def _watch_disconnect(receive, job: Job) -> None:
    """Cancel the job when the client disconnects (the request body has been read already, so the next
    message is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel(client_gone=True)
            return


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _stream(job: Job, meta: dict, is_chat: bool):
    """The server-sent events of a streamed request; each chunk carries one choice's delta."""
    req = job.req
    kind = {**meta, "object": "chat.completion.chunk" if is_chat else "text_completion"}
    extra = {"usage": None} if req.include_usage else {}
    if is_chat:  # the first chunk of each choice names the role
        for i in range(len(job.choices)):
            yield _sse({**kind, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra})
    async for index, delta, finish in job.events():
        if not delta and finish is None:
            continue
        if is_chat:
            choice = {"index": index, "delta": {"content": delta} if delta else {}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}
        yield _sse({**kind, "choices": [choice], **extra})
    if req.include_usage:
        yield _sse({**kind, "choices": [], "usage": job.usage()})
    yield b"data: [DONE]\n\n"


class _SSE:
    """A text/event-stream response that reports how it ended: 200 when every chunk was sent, 499 when the
    client went away, 500 (with an error event in the stream) when generation failed."""

    def __init__(self, chunks, finish):
        self.chunks, self.finish = chunks, finish

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
        status, error = 200, None
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            status, error = 499, "client disconnected"
        except Exception as e:  # noqa: BLE001 - report it in the stream, then close it
            status, error = getattr(e, "http_status", 500), repr(e)  # as for a request without streaming
            body = APIError(status, f"generation failed: {e!r}", type="server_error",
                            code="unavailable" if status == 503 else "engine_error").body()
            try:
                await send({"type": "http.response.body", "body": _sse(body), "more_body": False})
            except OSError:
                pass
        finally:
            await self.chunks.aclose()
            self.finish(status, error)
