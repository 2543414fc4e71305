"""How every script ends: a user error is one line on stderr and exit code 2, a stopped run is one
line and an exit code of its own, a bug is a traceback.

    from megatron_opd.runtime import cli
    cli.quiet()                      # before anything imports Megatron
    ...
    if __name__ == "__main__":
        cli.run(main, "pretrain_opd.py")

User errors are ``ValueError`` (the project's validation convention: the message names the flag or
file), ``FileNotFoundError`` / ``NotADirectoryError`` and :class:`UserError`. Under torchrun every
rank checks the same inputs and fails the same way; the ranks settle which one prints through
torchrun's store (``megatron_opd.runtime.failures``), argparse's own errors included, so the line is
printed by whichever rank gets there first, however far behind the others are. Without a shared
store (srun before the process group exists) rank 0 prints (a :class:`UserError` with
``rank_local=True`` prints on the rank that raised it) and the other ranks give it time to.
Every rank exits with the same code. ``--debug`` or ``MEGATRON_OPD_DEBUG=1`` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from megatron_opd.runtime import failures
from megatron_opd.runtime.errors import USER_ERROR_EXIT, UserError, exit_code_of

DEBUG_ENV = "MEGATRON_OPD_DEBUG"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and a ``--debug`` flag; a script's whole
    docstring may be passed as ``description`` (its first line is the one shown)."""

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("description"):
            kwargs["description"] = kwargs["description"].strip().splitlines()[0]
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            help=f"show a traceback for errors (or set {DEBUG_ENV}=1)",
        )

    def error(self, message: str) -> NoReturn:
        # the job's one line, settled like any user error: printing on rank 0 alone lost the
        # line whenever another rank failed first and torchrun stopped rank 0 before it printed
        _end(UserError(message), USER_ERROR_EXIT, self.prog)


RANK0_GRACE_S = 10.0  # without a shared store: how long the other ranks give rank 0 to print


def _print_once(line: str, rank_local: bool) -> None:
    """Without a shared store: rank 0 prints. Another rank waits for rank 0 to fail alike and
    the launcher to stop it (srun --kill-on-bad-exit, torchrun); still running after
    :data:`RANK0_GRACE_S`, it failed alone (a file its node cannot see) and prints itself."""
    rank, _, world = failures.env_rank_and_world()
    text = " ".join(line.split("\n"))  # one line, whatever the message held
    if not rank_local and rank != 0 and world > 1:
        import time

        time.sleep(RANK0_GRACE_S)
    print(text, file=sys.stderr, flush=True)


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def exit_with(error: BaseException, prog: str) -> NoReturn:
    """End the script for ``error``: one line (from one rank) and its exit code; a bug, or any
    error under ``--debug``, is re-raised with its traceback.

    In a job of several ranks that share a store, the ranks settle who reports
    (``megatron_opd.runtime.failures``): exactly one rank prints, every rank exits with that
    code."""
    code = exit_code_of(error)
    if debug_requested():
        raise error
    _end(error, code, prog)


def _end(error: BaseException, code: int | None, prog: str) -> NoReturn:
    if failures.board(may_import=True) is not None:
        raise SystemExit(failures.report(error, code, prog)) from None
    if code is None:
        raise error
    _print_once(f"{prog}: error: {error}", getattr(error, "rank_local", False))
    sys.stdout.flush()
    raise SystemExit(code) from None


def run(main: Callable[[], Any], prog: str) -> NoReturn:
    """Call ``main()``; turn user errors and stopped runs into one line and an exit code.

    The process then ends at once (``os._exit``) instead of through the interpreter's shutdown:
    with models, process groups and checkpoint helpers in memory, that shutdown's final garbage
    collection took more than 10 s after a signalled save, past torchrun's 30 s shutdown window
    (torchrun then kills the worker). Everything worth keeping is written and closed by then; the
    checkpoint helpers die with this process (``compat.die_with_parent``)."""
    failures.start_watching(prog)  # another rank's failure ends this one, quietly
    try:
        try:
            main()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:  # noqa: BLE001 - torch's CheckpointException is one
            exit_with(error, prog)
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    if not isinstance(code, int):  # SystemExit("message") or SystemExit(None)
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Warnings every Megatron-Core import prints on a machine without Transformer Engine / Apex, and
# deprecations in torch and Megatron that the user cannot act on. Filtered here and only here.
KNOWN_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r".*is deprecated",
    r".*deprecated.*",
    r"Apex is not installed",
    r"torch\.distributed\..* is deprecated",
    r"TypedStorage is deprecated",
    # torch.distributed.checkpoint, when a converter reads a checkpoint outside a process group
    r"torch\.distributed is disabled, unavailable or uninitialized",
    # megatron-core 0.19 calls torch.distributed.checkpoint.load with positional arguments
    r"The argument order of load has been changed",
)


def quiet() -> None:
    """Silence the known Megatron/torch warnings; call before Megatron is imported (spawned
    children re-import the script, so they run it too)."""
    if debug_requested():
        return
    # torch's C++ warnings (c10d's "recvValue failed" with a stack dump when a peer's store has
    # closed as a job ends) would follow the job's one line; read by libc10 when torch loads
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    import logging

    # Megatron logs a few INFO/WARNING lines per checkpoint and per engine build
    logging.getLogger("megatron").setLevel(logging.ERROR)
    # a failed save is reported by checkpointing.atomic_save (one line); the writer's own
    # "Local process 0 encountered an error" would be a second
    logging.getLogger("megatron.core.dist_checkpointing").setLevel(logging.CRITICAL)
    # megatron-core 0.19 imports torch.utils.cpp_extension, which warns on a machine without CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# Numeric flags: finite, and within their range, before anything is built


class Range:
    """``lo <(=) value <(=) hi``; either bound may be None (open)."""

    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        lo_closed: bool = True,
        hi_closed: bool = True,
    ):
        self.lo, self.hi, self.lo_closed, self.hi_closed = lo, hi, lo_closed, hi_closed

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and not (value >= self.lo if self.lo_closed else value > self.lo):
            return False
        return self.hi is None or (value <= self.hi if self.hi_closed else value < self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>=' if self.lo_closed else '>'} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<=' if self.hi_closed else '<'} {_num(self.hi)}"
        left, right = "[" if self.lo_closed else "(", "]" if self.hi_closed else ")"
        return f"in {left}{_num(self.lo)}, {_num(self.hi)}{right}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def at_least(lo: float) -> Range:
    return Range(lo)


def above(lo: float) -> Range:
    return Range(lo, lo_closed=False)


def check_numbers(
    parser: argparse.ArgumentParser, parsed: argparse.Namespace, ranges: dict
) -> None:
    """Every float flag ``parser`` gave ``parsed`` is finite (NaN passes every comparison, inf
    most), and every flag named in ``ranges`` (``{"--lr": at_least(0)}``) is inside its range
    unless it is unset (None). The parsing layer's check, beside :class:`ArgumentParser`: each
    script calls it right after parsing, before any config is built from the flags."""
    import math

    flags = {a.option_strings[0]: a.dest for a in parser._actions if a.option_strings}
    for action in parser._actions:
        value = getattr(parsed, action.dest, None)
        if action.type is float and isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{action.option_strings[0]} must be a finite number, got {value}")
    for flag, allowed in ranges.items():
        value = getattr(parsed, flags[flag])
        if value is not None and value not in allowed:
            raise UserError(f"{flag} must be {allowed}, got {_num(value)}")


def flags(parsed: argparse.Namespace, *names: str, prefix: str = "") -> dict[str, Any]:
    """``{name: parsed.<prefix><name>}``: the keyword arguments of a config whose fields are its
    flags' names (``--rollout-top-k`` -> ``top_k`` with ``prefix="rollout_"``), as Megatron-LM
    builds its configs from ``args``."""
    return {name: getattr(parsed, prefix + name) for name in names}
