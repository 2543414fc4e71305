"""One report per job: when ranks fail, exactly one prints its line, every rank ends with that
line's exit code, and no rank waits for a peer that is gone.

A failure seldom reaches every rank at once. A full disk fails one rank's writer; Megatron's save
then raises on the others a ``CheckpointException`` that names no failure (the details stay on the
coordinator); a rank that has exited leaves its peers blocked in a collective, or failing in one
with gloo's ``Connection reset by peer``. Each rank alone cannot tell the cause from the echo.

The ranks share a key-value store (torchrun's agent store, which outlives any rank and exists
before the process group; else the default process group's). A failing rank *claims* the job's
report with one compare-and-set; the first claim prints, every other rank exits quietly with the
claimed code. A watcher thread ends a rank the moment another has claimed, whatever it is blocked
in; the claimant waits a bounded time for the others to go before it goes, so that torchrun sees
every rank exit with the code rather than having to SIGTERM them.

How long a rank waits for a claim before making its own depends on what it holds:

- a handled error (a user error, a stopped run, a full disk: ``cli.exit_code_of``): none;
- an echo of another rank's failure (:func:`is_echo`): up to :data:`ECHO_WAIT_S`, then one line
  saying that another rank failed, exit code ``cli.RUN_ERROR_EXIT`` (a rank killed -9 claims
  nothing);
- anything else (a bug): up to :data:`ECHO_WAIT_S` too, since a peer's handled failure may be the
  cause; then its traceback, exit code 1.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Optional

ECHO_WAIT_S = 5.0  # how long an echo (or a bug) waits for the rank that holds the cause
GOODBYE_WAIT_S = 10.0  # how long the claimant waits for the other ranks to exit
POLL_S = 0.1
_KEY, _GONE = "claim", "gone"


class Board:
    """The job's failure report in a shared store: who claimed it, with which exit code."""

    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size

    def claim(self, code: int) -> tuple[int, int]:
        """(rank, code) of the job's report: ours if nobody claimed before."""
        got = self.store.compare_set(_KEY, "", f"{self.rank} {code}")
        rank, claimed = (got.decode() if isinstance(got, bytes) else got).split()
        return int(rank), int(claimed)

    def claimed(self) -> Optional[tuple[int, int]]:
        if not self.store.check([_KEY]):
            return None
        rank, code = self.store.get(_KEY).decode().split()
        return int(rank), int(code)

    def wait_for_claim(self, seconds: float) -> Optional[tuple[int, int]]:
        deadline = time.monotonic() + seconds
        while True:
            claim = self.claimed()
            if claim is not None or time.monotonic() >= deadline:
                return claim
            time.sleep(POLL_S)

    def leave(self) -> None:
        self.store.add(_GONE, 1)

    def wait_for_the_others(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.store.add(_GONE, 0) < self.world_size - 1 and time.monotonic() < deadline:
            time.sleep(POLL_S)


_board: Optional[Board] = None
_agent_tried = False
_job_store = None  # the launcher's store when the ranks are split into pools (megatron_opd.pools)
_board_lock = threading.Lock()
_handling = threading.Event()  # set while the main thread reports its own failure


def _env_rank_and_world() -> tuple[int, int]:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    return rank, world


def _shared_store():
    """torchrun's agent store (once: an unreachable agent is not tried again), else the default
    process group's store once it exists, else None."""
    global _agent_tried
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True) and not _agent_tried:
        from datetime import timedelta

        _agent_tried = True
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        try:
            agent = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=30),
            )
            return dist.PrefixStore(f"megatron_opd/failures/attempt_{attempt}/", agent)
        except (RuntimeError, KeyError, ValueError):
            pass
    if _job_store is not None:  # each pool's default group has its own: the job's is shared
        return dist.PrefixStore("megatron_opd/failures/", _job_store)
    if dist.is_available() and dist.is_initialized():
        return dist.PrefixStore(
            "megatron_opd/failures/", dist.distributed_c10d._get_default_store()
        )
    return None


def use_job_store(store) -> None:
    """The store every rank of the job shares, where the pools' default groups do not."""
    global _job_store
    _job_store = store


def _imported(name: str) -> bool:
    """``name`` is imported and done importing. The watcher thread starts while the main thread
    is still importing torch; importing torch.distributed from the watcher then raced it, and the
    process died with "terminate called after throwing an instance of 'python_error'"."""
    module = sys.modules.get(name)
    return module is not None and not getattr(module.__spec__, "_initializing", False)


def board() -> Optional[Board]:
    """The job's board, or None: a job of one rank, or no shared store yet (before the process
    group exists, when the launcher is not torchrun)."""
    global _board
    with _board_lock:
        rank, world = _env_rank_and_world()
        if _board is None and world > 1 and _imported("torch") and _imported("torch.distributed"):
            store = _shared_store()
            if store is not None:
                _board = Board(store, rank, world)
        return _board


def _exit_quietly(b: Board, code: int) -> None:
    try:
        b.leave()
    except Exception:  # noqa: BLE001 - the store may be gone with its host rank
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _watch() -> None:
    b = None
    while True:
        time.sleep(POLL_S)
        try:
            b = b or board()
            if b is None:
                continue
            claim = b.claimed()
        except Exception:  # noqa: BLE001 - the store went away: nothing left to watch
            return
        if claim is not None and claim[0] != b.rank and not _handling.is_set():
            _exit_quietly(b, claim[1])


def start_watching() -> None:
    """End this rank, quietly and with the claimed code, once another rank claims the job's
    report (``cli.run`` starts it; a daemon thread polling the store every :data:`POLL_S`)."""
    if _env_rank_and_world()[1] > 1:
        threading.Thread(target=_watch, name="megatron_opd-failures", daemon=True).start()


def is_echo(error: BaseException) -> bool:
    """An error that only says another rank failed: Megatron's save raising a
    ``CheckpointException`` that names no failing rank (the details are on the coordinator), or a
    collective that lost its peer."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "CheckpointException" and not getattr(error, "failures", 1):
            return True
        if type(error).__name__ in ("DistNetworkError", "DistBackendError"):
            return True
        text = str(error)
        if isinstance(error, RuntimeError) and any(
            s in text
            for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def report(error: BaseException, code: Optional[int], prog: str) -> int:
    """Settle ``error`` with the other ranks and return the exit code; at most one line (or one
    traceback) for the whole job is printed. ``code``: the handled error's exit code, None for
    anything else. Needs a :func:`board`."""
    _handling.set()
    b = board()
    assert b is not None, "report() needs the job's board"
    try:
        return _settle(b, error, code, prog)
    except RuntimeError:  # the store went with its host rank (no torchrun agent): report alone
        if code is None:
            traceback.print_exception(error)
        else:
            print(" ".join(f"{prog}: error: {error}".split()), file=sys.stderr, flush=True)
        return 1 if code is None else code


def _settle(b: Board, error: BaseException, code: Optional[int], prog: str) -> int:
    from megatron_opd import cli

    line = f"{prog}: error: {error}"
    if code is None:
        claim = b.wait_for_claim(ECHO_WAIT_S)
        if claim is not None:
            _exit_quietly(b, claim[1])
        if is_echo(error):
            code = cli.RUN_ERROR_EXIT
            line = f"{prog}: error: another rank of the job failed or was killed ({error})"
    rank, claimed = b.claim(1 if code is None else code)
    if rank != b.rank:
        _exit_quietly(b, claimed)
    import signal

    # torchrun SIGTERMs the ranks still running once one has exited: the claimant, last to go,
    # ends with its code all the same
    signal.signal(signal.SIGTERM, lambda *_: os._exit(claimed))
    if code is None:
        traceback.print_exception(error)
    else:
        print(" ".join(line.split()), file=sys.stderr, flush=True)
    sys.stdout.flush()
    b.wait_for_the_others(GOODBYE_WAIT_S)
    return claimed
