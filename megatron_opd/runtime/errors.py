"""The project's error kinds and the exit code each ends a script with: a user error (2), a run
that stopped itself (3), a run the environment failed (4); anything else is a bug (a traceback).

A leaf module: ``cli`` (how a script ends) and ``failures`` (which rank of a job reports) both
read it."""

from __future__ import annotations

import sys

USER_ERROR_EXIT = 2  # argparse's code for a bad command line
NON_FINITE_EXIT = 3  # the run stopped itself: non-finite rewards, gradients or weights
RUN_ERROR_EXIT = 4  # the environment failed the run: disk full, a checkpoint writer killed


class UserError(ValueError):
    """Something the user must change (a flag, a file). ``rank_local``: only the raising rank may
    know (a file it checked alone), so it prints even when it is not rank 0."""

    exit_code = USER_ERROR_EXIT

    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


class RunStopped(RuntimeError):
    """The run stopped on purpose (it cannot go on); one line, its own exit code."""

    exit_code = NON_FINITE_EXIT
    rank_local = False


class RunError(RuntimeError):
    """The machine failed the run (disk full, a killed writer process); one line, no traceback."""

    exit_code = RUN_ERROR_EXIT
    rank_local = True


class JobStopped(RunError):
    """SIGTERM on a rank of a job of several, outside ``--exit-signal-handler``: torchrun stops
    every rank once one has failed or been killed, or the job was cancelled."""


_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def exit_code_of(error: BaseException) -> int | None:
    """The exit code a script ends with for ``error``; None for a bug (show the traceback)."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(error, _USER_ERRORS):
        return USER_ERROR_EXIT
    return None


def failed_alone() -> bool:
    """Inside a ``finally``: is this rank unwinding an error the other ranks may not share (a
    killed writer, a full disk)? Then a teardown barrier would wait for ranks that never come."""
    error = sys.exc_info()[1]
    return error is not None and bool(getattr(error, "rank_local", False))
