"""`python -m serve RUN [--host 127.0.0.1] [--port 8000] [--max-slots 16]` (`make serve RUN=runs/<name>`).

Loads the run (serve.loader), starts the scheduler's thread and serves the app with uvicorn until SIGINT or
SIGTERM; on either, uvicorn stops accepting connections, lets the requests in flight finish, and then the
scheduler thread ends. A run that cannot be served is one line on stderr and exit 2. `--replicas N` puts N such
servers behind a router (serve.router); `--tp N` splits every model over N processes (serve.tp, serve.tp_ranks),
this one rank 0. `--engine vllm` serves a `make export FORMAT=hf` folder with `vllm serve` processes behind the
router instead (serve.vllm_engine; vLLM is not installed with this project)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

from trainer.checkpoint import CheckpointError
from trainer.errors import UsageError

from .routing import DEFAULT_BLOCK, DEFAULT_SLACK, POLICIES
from .scheduler import DEFAULT_PREFILL_CHUNK

__all__ = ["main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description="OpenAI-compatible server for a trained run")
    p.add_argument("run", help="the run directory, runs/<name>")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, named in the "
                   "'loaded' line)")
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)  # a socket bound by the parent
    p.add_argument("--max-slots", type=int, default=16,
                   help="KV-cache slots per module: the most rows decoded together (default 16)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder of the run (default: its latest)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the decoding loop (default: torch's)")
    p.add_argument("--engine", default="torch", choices=["torch", "onnxruntime", "vllm"],
                   help="onnxruntime: RUN is a `make export FORMAT=onnx` folder, served by ONNX Runtime (serve.ort: "
                        "requests interleave per token, not batched); vllm: RUN is a `make export FORMAT=hf` folder, "
                        "served by `vllm serve` processes behind the router (serve.vllm_engine; GPU machines, "
                        "vLLM installed)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: int8 weight-only linear layers (model/quantize.py; a tied head stays float)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="chunked prefill: while rows decode, new prompts are computed in chunks, each scheduler step "
                        "a budget of N tokens shared by the decoding rows (one each) and the prompt chunks (at "
                        f"least N/4); 0: whole prompts in one prefill (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="no prefix KV cache: every prompt is computed from its first token")
    p.add_argument("--tp", type=int, default=1,
                   help="N > 1: tensor-parallel over N processes, each holding 1/N of every model; rank 0 serves "
                        "HTTP and the others follow its engine steps (serve.tp, serve.tp_ranks)")
    p.add_argument("--replicas", type=int, default=1,
                   help="N > 1: N replica processes on loopback ports behind a router on --host/--port (serve.router)")
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="the router's rule (serve.routing; default cache_aware)")
    p.add_argument("--cache-slack", type=int, default=None,
                   help="cache_aware: a prefix stays on its replica while that replica has fewer than this many "
                        "requests in flight more than the least-loaded one (default 4)")
    p.add_argument("--prefix-block", type=int, default=None,
                   help="characters per prefix block of the router (default 32)")
    return p.parse_args(argv)


ROUTER_DEFAULTS = {"policy": "cache_aware", "cache_slack": DEFAULT_SLACK, "prefix_block": DEFAULT_BLOCK}


def quantize(run) -> dict:
    """Every served module's linear layers to int8 weight-only (model.quantize), in place; what was done."""
    from model.quantize import quantize_int8_weight_only

    done = {}
    for key, module in run.modules.items():
        if any("lora_" in name for name, _ in module.named_modules()):
            raise UsageError(f"--quantize int8: module {key!r} carries LoRA adapters; quantised LoRA serving is "
                             "not supported")
        done[key] = {"scheme": "int8 weight-only", **quantize_int8_weight_only(module)}
    return done


def listening_socket(args: argparse.Namespace) -> socket.socket:
    """The HTTP socket, bound before anything else starts: a tensor-parallel rank's or a replica's own
    ephemeral ports (gloo's, the TCPStore's) could otherwise take --port between its choice and uvicorn's
    bind. With --listen-fd (serve.procs.launch_server, the router's replicas) the parent bound it already
    and passed it on. args.port becomes the bound port (--port 0: the one the OS chose)."""
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
        sock.set_inheritable(False)  # not on to the tensor-parallel ranks this process starts
    else:
        from .procs import bound_socket

        try:
            sock = bound_socket(args.port, args.host)
        except OSError as e:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    args.port = sock.getsockname()[1]
    return sock


def http_stack() -> dict[str, str]:
    """uvicorn's HTTP parser and event loop: h11, and uvloop (requirements.txt pins it) or asyncio where it
    cannot be imported, which `http_stack_note` says. Not httptools: with it, tests/test_serve_router.py's
    least-loaded test hung reproducibly (a third request on the client's connection never reached the
    router's handler while a stream of another thread was held on a stopped replica); h11 passes it. Both C
    parts together gave 5.08x against 4.29x one at a time at 16 clients (bench/results/serve-cpu-http-*.md);
    what uvloop alone gives is not measured."""
    import importlib

    try:
        importlib.import_module("uvloop")
    except ImportError:
        return {"http": "h11", "loop": "asyncio"}
    return {"http": "h11", "loop": "uvloop"}


def http_stack_note(stack: dict[str, str]) -> None:
    if stack["loop"] != "uvloop":
        print("serve: uvloop cannot be imported: serving on asyncio's event loop (slower per streamed token); "
              "`pip install uvloop` for the C one", file=sys.stderr, flush=True)


def serve_http(app, sock: socket.socket, stack: dict[str, str]) -> None:
    """uvicorn on the bound socket; graceful shutdown on SIGINT/SIGTERM as uvicorn.run. access_log off:
    every request already gets one JSON line from the app."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **stack)).run(sockets=[sock])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        args.listen = listening_socket(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.engine == "vllm":
        return serve_vllm(args)
    if args.replicas != 1:
        for key, value in ROUTER_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        return serve_replicas(args)
    given = [f"--{k.replace('_', '-')}" for k in ROUTER_DEFAULTS if getattr(args, k) is not None]
    if given:
        print(f"error: {', '.join(given)} (router options) need --replicas N > 1", file=sys.stderr)
        return 2
    from .app import build_app
    from .loader import load_run
    from .metrics import Metrics
    from .scheduler import Scheduler

    try:
        if args.max_slots < 1:
            raise UsageError(f"--max-slots must be >= 1, got {args.max_slots}")
        if args.tp < 1:
            raise UsageError(f"--tp must be >= 1, got {args.tp}")
        if args.prefill_chunk < 0:
            raise UsageError(f"--prefill-chunk must be >= 0 tokens (0: whole prompts), got {args.prefill_chunk}")
        if args.tp > 1 and (args.engine != "torch" or args.quantize):
            bad = ([f"--engine {args.engine}"] if args.engine != "torch" else []) + (
                [f"--quantize {args.quantize}"] if args.quantize else [])
            raise UsageError(f"--tp {args.tp} does not combine with {' or '.join(bad)}: tensor-parallel serving runs "
                             "the torch engine in float")
        if args.engine == "onnxruntime":
            from .ort import OrtEngine, load_onnx

            if args.checkpoint is not None:
                raise UsageError("--checkpoint does not apply to --engine onnxruntime (RUN is the exported folder)")

            run = load_onnx(args.run)
            variant = args.quantize or "fp32"
            engines = {"model": OrtEngine(args.run, variant, args.max_slots, args.threads)}
            quantized = {"model": {"scheme": f"onnxruntime {variant}"}} if args.quantize else None
        elif args.tp > 1:  # checked from the checkpoint's meta alone: no process starts for a run refused here
            from .loader import module_configs
            from .tp import check_tp

            check_tp(module_configs(args.run, args.checkpoint), args.tp)
            engines = quantized = None
        else:
            run = load_run(args.run, args.checkpoint)
            engines = None
            quantized = quantize(run) if args.quantize else None
    except (UsageError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ranks = None
    if args.tp > 1:
        from .tp import TPScheduler

        started = start_tp(args)
        if isinstance(started, int):
            return started
        ranks, run = started
        engines = ranks.engines

    # The decoding thread and the event loop share the GIL. At Python's default switch interval (5 ms) the
    # decoding thread, back from a torch op, can wait up to 5 ms while the loop runs Python code; 0.5 ms
    # gave ~1.2-1.4x the tokens/s at 16 streaming clients on 2 cores (bench/bench_serve.py).
    sys.setswitchinterval(0.0005)

    metrics = Metrics()
    options = {"prefill_chunk": args.prefill_chunk or None, "prefix_cache": not args.no_prefix_cache}
    if ranks is None:
        scheduler = Scheduler(run.modules, args.max_slots, metrics, threads=args.threads, engines=engines, **options)
        tp_info = None
    else:
        scheduler = TPScheduler(ranks.channel, run.modules, args.max_slots, metrics, threads=ranks.threads,
                                engines=engines, **options)
        tp_info = {"size": args.tp, "device": str(ranks.device), "threads_per_rank": ranks.threads,
                   "parameter_bytes_per_rank": ranks.parameter_bytes}
    app = build_app(run, scheduler, metrics)
    stack = http_stack()
    http_stack_note(stack)
    print(json.dumps({"event": "loaded", "run": str(run.run_dir), "checkpoint": str(run.checkpoint),
                      "models": list(run.models), "quantized": quantized, "tp": tp_info,
                      "prefill_chunk": args.prefill_chunk, "prefix_cache": not args.no_prefix_cache,
                      **stack, "url": f"http://{args.host}:{args.port}/v1"}), file=sys.stderr,
          flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, restores the handlers it found and raises the signal
    # again; with these no-op handlers in place that second delivery does nothing and a clean shutdown
    # exits 0 (set just before uvicorn.run: while the run loads, a signal still stops the process at once).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        if ranks is not None:
            from .tp import RankLost
            ranks.watch(on_lost=lambda why: scheduler.fail_all(RankLost(why)))
        serve_http(app, args.listen, stack)
    finally:
        if ranks is not None:
            ranks.stop()  # every other rank exits (after the requests in flight, which uvicorn waited for)
    lost = ranks.lost if ranks is not None else None
    print(json.dumps({"event": "stopped", "run": str(run.run_dir), "error": lost}), file=sys.stderr, flush=True)
    if lost:  # now: the scheduler thread may still wait in a collective, and the interpreter's exit with it
        sys.stdout.flush()
        os._exit(1)
    return 0


def start_tp(args: argparse.Namespace):
    """Rank 0 of `--tp N`: start and join the other ranks, load this rank's shard of every model, wrap each
    engine in a LockstepEngine. (Ranks, LoadedRun), or an exit code (a rank's failure, or the run's one-line
    error, after which the other ranks are stopped)."""
    import torch
    import torch.distributed as dist

    from .loader import load_run
    from .tp import LockstepEngine, make_engine, make_shard, parameter_bytes
    from .tp_ranks import default_threads, start_ranks

    threads = args.threads or default_threads(args.tp)
    torch.set_num_threads(threads)
    follower_args = ["--max-slots", str(args.max_slots), "--threads", str(threads)]
    if args.checkpoint is not None:
        follower_args += ["--checkpoint", args.checkpoint]
    if args.no_prefix_cache:
        follower_args.append("--no-prefix-cache")
    try:
        ranks = start_ranks(args.run, args.tp, follower_args)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if isinstance(ranks, int):
        return ranks
    try:
        run = load_run(args.run, args.checkpoint, shard=make_shard(None, ranks.device))
    except (UsageError, CheckpointError, OSError) as e:  # the other ranks fail alike and say nothing
        print(f"error: {e}", file=sys.stderr)
        ranks.abort()
        return 2
    ranks.threads = threads
    ranks.parameter_bytes = {key: parameter_bytes(m) for key, m in run.modules.items()}
    ranks.engines = {key: LockstepEngine(ranks.channel, key, make_engine(m, args.max_slots, not args.no_prefix_cache))
                     for key, m in run.modules.items()}
    try:
        dist.barrier(group=ranks.channel.group)
    except Exception as e:  # noqa: BLE001 - another rank died while loading (killed for memory, say)
        print(f"error: a tensor-parallel rank failed while loading the run: {str(e).splitlines()[0][:200]}",
              file=sys.stderr)
        ranks.abort()
        return 1
    return ranks, run


def serve_replicas(args: argparse.Namespace) -> int:
    """N replica processes behind the router (serve.router), the router in this process."""
    from .router import Workers

    for flag, value, low in (("--replicas", args.replicas, 1), ("--max-slots", args.max_slots, 1),
                             ("--cache-slack", args.cache_slack, 1), ("--prefix-block", args.prefix_block, 1)):
        if value < low:
            print(f"error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    worker_args = ["--max-slots", str(args.max_slots)]
    if args.threads is not None:
        worker_args += ["--threads", str(args.threads)]
    if args.checkpoint is not None:
        worker_args += ["--checkpoint", args.checkpoint]
    if args.quantize is not None:
        worker_args += ["--quantize", args.quantize]
    if args.engine != "torch":
        worker_args += ["--engine", args.engine]
    if args.tp != 1:  # each replica is a tensor-parallel group of its own
        worker_args += ["--tp", str(args.tp)]
    worker_args += ["--prefill-chunk", str(args.prefill_chunk)] + (["--no-prefix-cache"] if args.no_prefix_cache else [])
    return run_router(args, Workers(args.run, args.replicas, worker_args))


def run_router(args: argparse.Namespace, workers, models: list | None = None, start_timeout: float = 300.0) -> int:
    """Start `workers`, then serve the router over them on --host/--port until SIGINT/SIGTERM. `models`: per
    replica, the model names it serves (None: each serves every model)."""
    from .router import build_router_app
    from .routing import Router

    try:
        rc = workers.start(start_timeout)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if rc is not None:  # the replica printed its one-line error
        return rc
    try:
        router = Router(workers.urls, args.policy, slack=args.cache_slack, block=args.prefix_block, models=models)
        app = build_router_app(router, workers)
        stack = http_stack()
        http_stack_note(stack)
        print(json.dumps({"event": "router", "run": args.run, "replicas": workers.urls, "policy": args.policy,
                          "slack": args.cache_slack, "engine": args.engine,
                          "models": [sorted(m) for m in models] if models else None,
                          **stack, "url": f"http://{args.host}:{args.port}/v1"}),
              file=sys.stderr, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # as in main(): uvicorn's graceful shutdown, then exit 0
            signal.signal(sig, lambda *_: None)
        serve_http(app, args.listen, stack)
    finally:
        workers.stop()  # after uvicorn's shutdown this finds them stopped already
    print(json.dumps({"event": "stopped", "run": args.run, "replicas": len(workers.urls)}), file=sys.stderr,
          flush=True)
    return 0


VLLM_START_TIMEOUT = 1200.0  # s per process: vLLM loads the weights, profiles memory and captures CUDA graphs


def serve_vllm(args: argparse.Namespace) -> int:
    """`--engine vllm`: the export's vLLM processes (serve.vllm_engine) behind the router, this process. Stops
    with one line and exit 2, before starting anything, when vLLM is missing or the options do not apply."""
    from .router import Workers
    from .vllm_engine import commands, missing_vllm, plan

    not_here = [flag for flag, given in (("--tp", args.tp != 1), ("--quantize", args.quantize),
                                         ("--checkpoint", args.checkpoint), ("--replicas", args.replicas != 1),
                                         ("--threads", args.threads), ("--no-prefix-cache", args.no_prefix_cache))
                if given]
    if not_here:
        print(f"error: {', '.join(not_here)} {'does' if len(not_here) == 1 else 'do'} not apply to --engine vllm "
              "(RUN is the exported folder; vLLM's own settings are `vllm serve` flags)", file=sys.stderr)
        return 2
    missing = missing_vllm()
    if missing is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        processes = plan(args.run)
        command = commands(processes)
        for i in range(len(processes)):
            command(i, 0)  # every command line is built (a LoRA rank vLLM cannot take fails here)
    except (UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, value in ROUTER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    workers = Workers(args.run, len(processes), [], command=command, one_at_a_time=True)
    return run_router(args, workers, [p.models for p in processes], VLLM_START_TIMEOUT)
