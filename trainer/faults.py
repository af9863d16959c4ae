"""Fault injection used by the test suite to exercise failure paths deterministically.

Set through environment variables so the production code path is the one under test:
    RECIPES_FAULT_NAN_STEPS=3,4        the loss of these optimizer steps (1-based) becomes NaN
    RECIPES_FAULT_KILL_AFTER_STEP=8    SIGKILL this process once step 8 (and its checkpoint) is done
    RECIPES_FAULT_KILL_IN_SAVE=8       SIGKILL this process in the middle of saving step 8's checkpoint
    RECIPES_FAULT_KILL_IN_RESAVE=8     SIGKILL the saving rank while step 8 is saved again over a finished
                                       step_8/ (moved aside, the new one not yet in place)
    RECIPES_FAULT_RANK=1               apply the kills above on this rank only (default: every rank)
    RECIPES_FAULT_ENV_RAISE_AT_STEP=5  a multi-agent run's env raises in its first env step of training step 5
Unset (the default), none of these does anything.
"""

from __future__ import annotations

import os
import signal


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


NAN_STEPS = "RECIPES_FAULT_NAN_STEPS"
KILL_AFTER_STEP = "RECIPES_FAULT_KILL_AFTER_STEP"
KILL_IN_SAVE = "RECIPES_FAULT_KILL_IN_SAVE"
KILL_IN_RESAVE = "RECIPES_FAULT_KILL_IN_RESAVE"
ENV_RAISE_AT_STEP = "RECIPES_FAULT_ENV_RAISE_AT_STEP"


def env_raise_steps() -> set[int]:
    return _steps(ENV_RAISE_AT_STEP)


def nan_steps() -> set[int]:
    return _steps(NAN_STEPS)


def maybe_kill(name: str, step: int) -> None:
    only = os.environ.get("RECIPES_FAULT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    if step in _steps(name):
        os.kill(os.getpid(), signal.SIGKILL)
