"""How a rank's process ends. Standard library only: bench/gpu_train.py loads this file by path on
machines that have torch and nothing else of ours."""

from __future__ import annotations

import atexit
import os
import sys
import threading


def is_launched_rank() -> bool:
    """Started as one rank of several by a launcher (deepspeed, torchrun, accelerate, Slurm). Ask
    before the run starts: a single process sets these variables itself to initialise
    torch.distributed."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def end_process(code: int):
    """End a rank's process with `code` the way a normal exit would (other threads joined, atexit
    handlers run, output flushed), but without the interpreter's and the C++ runtime's teardown.

    Why: after a complete multi-process CPU run, gloo's (and DeepSpeed's) C++ objects are destroyed
    at exit while one of their threads is still joinable now and then; the runtime then aborts
    ("terminate called without an active exception", SIGABRT) and the launcher reports a job that
    finished as failed. Every rank process, ours and bench/gpu_train.py's, ends here.

    The order is the interpreter's own (Py_FinalizeEx): `threading._shutdown` first, which runs the
    threading module's exit hooks (concurrent.futures tells its idle pool workers to stop there; a
    plain join would wait for them forever, as it did behind torch.compile's compile pool) and then
    joins the non-daemon threads; then the atexit handlers."""
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
