"""`python -m serve RUN [--host 127.0.0.1] [--port 8000] [--max-slots 16]` (`make serve RUN=runs/<name>`).

Loads the run (serve.loader), starts the scheduler's thread and serves the app with uvicorn until SIGINT or
SIGTERM; on either, uvicorn stops accepting connections, lets the requests in flight finish, and then the
scheduler thread ends. A run that cannot be served is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from trainer.checkpoint import CheckpointError
from trainer.errors import UsageError

__all__ = ["main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description="OpenAI-compatible server for a trained run")
    p.add_argument("run", help="the run directory, runs/<name>")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-slots", type=int, default=16,
                   help="KV-cache slots per module: the most rows decoded together (default 16)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder of the run (default: its latest)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the decoding loop (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .app import build_app
    from .loader import load_run
    from .metrics import Metrics
    from .scheduler import Scheduler

    try:
        if args.max_slots < 1:
            raise UsageError(f"--max-slots must be >= 1, got {args.max_slots}")
        run = load_run(args.run, args.checkpoint)
    except (UsageError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    # The decoding thread and the event loop share the GIL. At Python's default switch interval (5 ms) the
    # decoding thread, back from a torch op, can wait up to 5 ms while the loop runs Python code; 0.5 ms
    # gave ~1.2-1.4x the tokens/s at 16 streaming clients on 2 cores (bench/bench_serve.py).
    sys.setswitchinterval(0.0005)

    metrics = Metrics()
    scheduler = Scheduler(run.modules, args.max_slots, metrics, threads=args.threads)
    app = build_app(run, scheduler, metrics)
    print(json.dumps({"event": "loaded", "run": str(run.run_dir), "checkpoint": str(run.checkpoint),
                      "models": list(run.models), "url": f"http://{args.host}:{args.port}/v1"}), file=sys.stderr,
          flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, restores the handlers it found and raises the signal
    # again; with these no-op handlers in place that second delivery does nothing and a clean shutdown
    # exits 0 (set just before uvicorn.run: while the run loads, a signal still stops the process at once).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # access_log off: every request already gets one JSON line from the app.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    print(json.dumps({"event": "stopped", "run": str(run.run_dir)}), file=sys.stderr, flush=True)
    return 0
