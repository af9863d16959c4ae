"""The two ways a run ends early on purpose, as exceptions the launcher turns into exit codes."""

from __future__ import annotations


class TrainingStopped(Exception):
    """The run stopped early on purpose; `exit_code` and the message are for the launcher."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(ValueError):
    """Bad input found at run time (e.g. a resume that does not fit this run): exit code 2."""
