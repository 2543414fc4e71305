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

- a handled error (a user error, a stopped run, a full disk: ``errors.exit_code_of``): none;
- an echo of another rank's failure (:func:`is_echo`): up to :data:`ECHO_WAIT_S`, then one line
  saying that another rank failed, exit code ``errors.RUN_ERROR_EXIT`` (a rank killed -9 claims
  nothing);
- anything else (a bug): up to :data:`ECHO_WAIT_S` too, since a peer's handled failure may be the
  cause; then its traceback, exit code 1.

One line for the job, but no error is lost: every failing rank whose error is its own (a bug, a
machine failure, a rank-local user error; not a flag every rank rejects alike) writes it to
``<--save>/failures/<claim time>/rank<R>.txt`` (:func:`keep_in`; the system's temporary
directory without one), and when a rank other than the claimant left one, the claimant's line
says where. The claimant prints its line only after the others have gone (bounded by
:data:`GOODBYE_WAIT_S`), so it has seen their files; the line itself cannot be lost to
torchrun's teardown, because a rank that is reporting lets SIGTERM end only its waits
(torchrun stops every rank once one exits, and SIGKILLs 30 s later).

In a job of several ranks, SIGTERM outside ``--exit-signal-handler`` (torchrun stopping the job
after a rank was killed, or a cancelled job) is :class:`errors.JobStopped`: one line, exit code
``errors.RUN_ERROR_EXIT``, not a silent death. Under ``--exit-signal-handler`` SIGTERM asks the
trainer to save after its step; a rank under torchrun that has not started that save
:data:`BEFORE_SIGKILL_S` after SIGTERM (blocked in a collective whose peer is gone) reports the
stop the same way before torchrun's SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

from megatron_opd.runtime import errors

ECHO_WAIT_S = 5.0  # how long an echo (or a bug) waits for the rank that holds the cause
# How long the claimant waits for the other ranks to exit: ranks still importing torch reach a bad
# flag seconds after the first one on a loaded machine. Once SIGTERM says torchrun is stopping the
# job (some rank has exited), at most AFTER_SIGTERM_S more.
GOODBYE_WAIT_S = 30.0
AFTER_SIGTERM_S = 1.0
POLL_S = 0.1
_KEY, _GONE = "claim", "gone"


class Board:
    """The job's failure report in a shared store: who claimed it, with which exit code, and the
    claim's time (it names the directory the failing ranks keep their errors in)."""

    def __init__(self, store, rank: int, world_size: int, hosts_store: bool = False):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.hosts_store = hosts_store  # the store lives in this process: it goes when we go

    def claim(self, code: int) -> tuple[int, int, str]:
        """(rank, code, stamp) of the job's report: ours if nobody claimed before."""
        mine = f"{self.rank} {code} {time.strftime('%Y%m%d-%H%M%S')}"
        got = self.store.compare_set(_KEY, "", mine)
        return _parse(got)

    def claimed(self) -> Optional[tuple[int, int, str]]:
        if not self.store.check([_KEY]):
            return None
        return _parse(self.store.get(_KEY))

    def wait_for_claim(
        self, seconds: float, stop: Optional[threading.Event] = None
    ) -> Optional[tuple[int, int, str]]:
        """The claim once there is one, or None after ``seconds`` (or once ``stop`` is set)."""
        deadline = time.monotonic() + seconds
        while True:
            claim = self.claimed()
            if claim is not None or time.monotonic() >= deadline:
                return claim
            if stop is not None and stop.is_set():
                return None
            _pause(POLL_S)

    def leave(self) -> None:
        self.store.add(_GONE, 1)

    def wait_for_the_others(self, seconds: float) -> None:
        deadline, cut = time.monotonic() + seconds, False
        while self.store.add(_GONE, 0) < self.world_size - 1 and time.monotonic() < deadline:
            if _sigterm.is_set() and not cut:  # torchrun stops the job: the others go anyway
                if not self.hosts_store:  # once the host has gone, a store call logs a C++
                    return  # warning with its stack on stderr: no call after SIGTERM
                deadline, cut = min(deadline, time.monotonic() + AFTER_SIGTERM_S), True
            _pause(POLL_S)


def _parse(value) -> tuple[int, int, str]:
    rank, code, stamp = (value.decode() if isinstance(value, bytes) else value).split()
    return int(rank), int(code), stamp


_board: Optional[Board] = None
_agent_tried = False
_on_agent_store = False  # the board is in torchrun's agent store (no rank hosts it)
_printed = False  # this rank printed the job's report
_job_store = (
    None  # the launcher's store when the ranks are split into pools (megatron_opd.runtime.pools)
)
_board_lock = threading.RLock()  # re-entered by a SIGTERM handler that interrupts board()
_handling = threading.Event()  # set once a thread of this rank reports its failure
_handling_lock = threading.RLock()
_sigterm = threading.Event()  # SIGTERM arrived (whoever handles it): no long waits for others
_keep_dir: Optional[str] = None  # --save: where the failing ranks keep their errors
_handler_pid: Optional[int] = None  # the process that installed the SIGTERM handler
_wakeup: Optional[int] = None  # read end of the fd Python's C signal handler writes to
_prog = "megatron_opd"  # the script's name, for a report the watcher makes
MAIN_THREAD_GRACE_S = 2.0  # after SIGTERM: how long the main thread has to start reporting
# torchrun SIGKILLs a rank 30 s after its SIGTERM (torch.distributed.elastic's close timeout). A
# rank that keeps SIGTERM for --exit-signal-handler and has neither started that save nor reported
# by BEFORE_SIGKILL_S after it reports the stop itself: its one line, not a silent -9.
BEFORE_SIGKILL_S = 25.0
_exit_saving = threading.Event()  # the trainer saves on its exit signal: leave it to finish
JOB_STOPPED = (
    "another rank of the job failed or was killed, or the job was cancelled: this rank got "
    "SIGTERM and stopped without saving (--exit-signal-handler saves first)"
)
NO_EXIT_SAVE = (
    "another rank of the job failed or was killed, or the job was cancelled: this rank got "
    f"SIGTERM and did not reach its --exit-signal-handler save within {BEFORE_SIGKILL_S:g} s "
    "(torchrun SIGKILLs 30 s after SIGTERM); nothing was saved"
)


def _take_report() -> bool:
    """This thread reports this rank's failure (False: another thread of the rank does)."""
    with _handling_lock:
        if _handling.is_set():
            return False
        _handling.set()
        return True


def env_rank_and_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun (or Slurm's srun) sets them; (0, 0, 1) alone.
    Read from the environment, so it answers before any process group exists."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return rank, local_rank, world


def _shared_store():
    """torchrun's agent store (once: an unreachable agent is not tried again), else the default
    process group's store once it exists, else None."""
    global _agent_tried, _on_agent_store
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
            _on_agent_store = True
            return dist.PrefixStore(f"megatron_opd/runtime/failures/attempt_{attempt}/", agent)
        except (RuntimeError, KeyError, ValueError):
            pass
    if _job_store is not None:  # each pool's default group has its own: the job's is shared
        return dist.PrefixStore("megatron_opd/runtime/failures/", _job_store)
    # a default group that does not span the job's world is not the job's (a process group left
    # by an earlier run in this process, as in-process tests do): settling on it would wait for
    # ranks that never come
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == env_rank_and_world()[2]:
            return dist.PrefixStore(
                "megatron_opd/runtime/failures/", dist.distributed_c10d._get_default_store()
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


def board(may_import: bool = False) -> Optional[Board]:
    """The job's board, or None: a job of one rank, or no shared store yet (before the process
    group exists, when the launcher is not torchrun). ``may_import``: the main thread may import
    torch.distributed to reach torchrun's store (a bad flag fails before the script imports it)."""
    global _board
    rank, _, world = env_rank_and_world()
    if may_import and world > 1 and _board is None:
        import torch.distributed  # noqa: F401
    with _board_lock:
        if _board is None and world > 1 and _imported("torch") and _imported("torch.distributed"):
            store = _shared_store()
            if store is not None:
                _board = Board(store, rank, world, hosts_store=rank == 0 and not _on_agent_store)
        return _board


def _exit_quietly(b: Board, code: int) -> None:
    """Leave, and exit with ``code`` once every other rank has left too: a rank that exits
    first has torchrun SIGTERM the ranks still importing torch, before they reach the error."""
    try:
        b.leave()
        b.wait_for_the_others(GOODBYE_WAIT_S)
    except Exception:  # noqa: BLE001 - the store may be gone with its host rank
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _watch() -> None:
    b, termed_at, grace, message = None, None, MAIN_THREAD_GRACE_S, JOB_STOPPED
    while True:
        _pause(POLL_S)
        if _handling.is_set():  # this rank reports: nothing left to watch (its waits read SIGTERM)
            return
        if _sigterm.is_set() and termed_at is None:
            termed_at = time.monotonic()
            if signal.getsignal(signal.SIGTERM) is not _on_sigterm:  # --exit-signal-handler's
                grace = BEFORE_SIGKILL_S if "TORCHELASTIC_RUN_ID" in os.environ else None
                message = NO_EXIT_SAVE
        if grace is not None and termed_at is not None and not _exit_saving.is_set():
            if time.monotonic() - termed_at > grace:
                _report_stop(message)  # the main thread is in a call that does not return
        try:
            b = b or board()
            if b is None:
                continue
            claim = b.claimed()
        except Exception:  # noqa: BLE001 - the store went away: nothing left to watch
            return
        # the main thread may start reporting its own failure at this moment: whoever takes the
        # report first ends the rank (a file half-written as the watcher exits would be lost)
        if claim is not None and claim[0] != b.rank and _take_report():
            _exit_quietly(b, claim[1])


def _pause(seconds: float) -> None:
    """Sleep up to ``seconds``, and set :data:`_sigterm` if SIGTERM came meanwhile, whichever
    Python handler has it (``--exit-signal-handler``'s too): Python's C-level handler writes each
    signal's number to the wakeup fd at once, wherever the main thread is."""
    if _wakeup is None:
        time.sleep(seconds)
        return
    import select

    try:
        if select.select([_wakeup], [], [], seconds)[0] and signal.SIGTERM in os.read(_wakeup, 512):
            _sigterm.set()
    except BlockingIOError:  # another thread read the byte first (and set the event if SIGTERM)
        pass
    except (OSError, ValueError):  # the fd closed under us (a fork's child forgot it)
        time.sleep(seconds)


def _report_stop(message: str = JOB_STOPPED) -> None:
    """Report SIGTERM as :class:`errors.JobStopped` and end the process, unless a thread of this
    rank reports already. From the handler (the main thread, between two bytecodes: no ``finally``
    runs, none can block the way out), or from the watcher when the main thread is inside a call
    that does not return (a collective or a store wait on a rank that is gone), where Python
    cannot run the handler."""
    if not _take_report():
        return
    _sigterm.set()
    error, code = errors.JobStopped(message), errors.RUN_ERROR_EXIT
    b = board()
    try:
        if b is None:
            raise RuntimeError("no store shared with the other ranks")
        code = _settle(b, error, code, _prog)
    except RuntimeError:
        if not _printed:
            print(" ".join(f"{_prog}: error: {error}".split()), file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_watching(prog: str = _prog) -> None:
    """In a job of several ranks: end this rank, quietly and with the claimed code, once another
    rank claims the job's report (a daemon thread polling the store every :data:`POLL_S`), and
    turn SIGTERM into :class:`errors.JobStopped` (``cli.run`` calls this first; the trainer's
    ``--exit-signal-handler`` replaces the handler once the run starts). Where the main thread
    cannot take the signal (blocked in C++), the watcher reports the stop itself."""
    global _handler_pid, _prog, _wakeup
    _prog = prog
    if env_rank_and_world()[2] <= 1:
        return
    if threading.current_thread() is threading.main_thread():
        _handler_pid = os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)
        read, write = os.pipe()
        os.set_blocking(write, False)
        # several threads wait on the read end at once (the watcher, and the main thread while it
        # reports): a blocking read by one that lost the byte to another would never return
        os.set_blocking(read, False)
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if previous == -1:
            _wakeup = read
            # a forked helper (a checkpoint writer) must not write its signals into this pipe:
            # multiprocessing ends its workers with SIGTERM
            os.register_at_fork(after_in_child=_forget_wakeup)
        else:  # someone else's fd: leave it theirs
            signal.set_wakeup_fd(previous)
            os.close(read)
            os.close(write)
    threading.Thread(target=_watch, name="megatron_opd-failures", daemon=True).start()


def _forget_wakeup() -> None:
    global _wakeup
    _wakeup = None
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread
        pass


def exit_saving() -> None:
    """The trainer starts the save its exit signal asked for: the watcher leaves the rank to it
    (torchrun's SIGKILL, 30 s after SIGTERM, is the only bound left)."""
    _exit_saving.set()


def _on_sigterm(signum, frame) -> None:

    if os.getpid() != _handler_pid:  # a forked helper (a checkpoint writer): die as before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _sigterm.set()  # torchrun is stopping the job: no rank waits long for another
    if _handling.is_set():  # reporting already: end the waits, never the line
        return
    _report_stop()


def exit_after_stop() -> None:
    """End a rank the job told to stop early (a rollout rank, by the training leader's stop
    flag). A leader that stops because it failed sets the flag before it claims the job's report:
    wait up to :data:`ECHO_WAIT_S` + 1 s for that claim and end quietly with its code (the rank
    exited 0 before, while the job failed); no claim by then: the stop was planned, exit 0."""
    b = board()
    if b is not None:
        try:
            claim = b.wait_for_claim(ECHO_WAIT_S + 1.0)
        except RuntimeError:  # the store went with its host: the job is over
            claim = None
        if claim is not None and claim[0] != b.rank:
            _exit_quietly(b, claim[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def keep_in(directory: Optional[str]) -> None:
    """Failing ranks keep their errors under ``<directory>/failures/`` (the run's ``--save``)."""
    global _keep_dir
    _keep_dir = None if directory is None else str(directory)


def failure_dir(stamp: str) -> Path:
    """Where the ranks that fail in the report claimed at ``stamp`` keep their errors."""
    if _keep_dir is not None:
        return Path(_keep_dir) / "failures" / stamp
    import tempfile

    return Path(tempfile.gettempdir()) / "megatron_opd-failures" / stamp


def _kept(error: BaseException, code: Optional[int]) -> bool:
    """Is this rank's error its own, worth a file? Not a flag every rank rejects alike, nor a
    stop every rank decided together."""
    shared = code in (errors.USER_ERROR_EXIT, errors.NON_FINITE_EXIT)
    if shared and not getattr(error, "rank_local", False):
        return False
    if isinstance(error, errors.JobStopped):  # "not me": torchrun stops the job
        return False
    # a handled error (a full disk) is this rank's own, whatever collective error it chains
    return code is not None or not is_echo(error)


def _keep(stamp: str, rank: int, code: int, text: str) -> Optional[Path]:
    """Write this rank's error to its file (a temporary name, then renamed: a reader never sees
    half of one); None when the directory cannot be written."""
    directory = failure_dir(stamp)
    path = directory / f"rank{rank}.txt"
    tmp = directory / f".rank{rank}.txt.{os.getpid()}.tmp"
    head = f"rank {rank} (host {socket.gethostname()}, pid {os.getpid()}), exit code {code}\n"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(head + text)
        os.replace(tmp, path)
        return path
    except OSError:  # a full or read-only disk: leave nothing half-made behind
        for leftover in (tmp, directory, directory.parent):
            try:
                leftover.unlink() if leftover is tmp else leftover.rmdir()
            except OSError:
                pass
        return None


def kept_errors(directory: Path) -> dict[int, str]:
    """rank -> the error it kept in ``directory``."""
    out = {}
    for path in Path(directory).glob("rank*.txt"):
        try:
            out[int(path.stem[len("rank") :])] = path.read_text()
        except (OSError, ValueError):
            pass
    return out


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


def _error_text(error: BaseException, code: Optional[int], line: str) -> str:
    trace = "".join(traceback.format_exception(error))
    return trace if code is None else f"{' '.join(line.split())}\n\n{trace}"


def report(error: BaseException, code: Optional[int], prog: str) -> int:
    """Settle ``error`` with the other ranks and return the exit code; at most one line (or one
    traceback) for the whole job is printed. ``code``: the handled error's exit code, None for
    anything else. Needs a :func:`board`."""
    if not _take_report():  # the watcher ends this rank (a claim seen, or a SIGTERM it took)
        while True:
            time.sleep(1)
    b = board()
    assert b is not None, "report() needs the job's board"
    try:
        return _settle(b, error, code, prog)
    except RuntimeError:  # the store went with its host rank (no torchrun agent): report alone
        if _printed:
            return 1 if code is None else code
        if code is None:
            traceback.print_exception(error)
        else:
            print(" ".join(f"{prog}: error: {error}".split()), file=sys.stderr, flush=True)
        return 1 if code is None else code


def _settle(b: Board, error: BaseException, code: Optional[int], prog: str) -> int:
    line = f"{prog}: error: {error}"
    kept = _kept(error, code)
    if code is None:
        claim = b.wait_for_claim(ECHO_WAIT_S, stop=_sigterm)
        if claim is not None:
            if kept:
                _keep(claim[2], b.rank, claim[1], _error_text(error, None, line))
            _exit_quietly(b, claim[1])
        if is_echo(error):
            code = errors.RUN_ERROR_EXIT
            line = f"{prog}: error: another rank of the job failed or was killed ({error})"
    mine = 1 if code is None else code
    rank, claimed, stamp = b.claim(mine)
    if rank != b.rank:
        if kept:  # the job's line is another rank's: this error lives on in its file
            _keep(stamp, b.rank, mine, _error_text(error, code, line))
        _exit_quietly(b, claimed)
    # torchrun SIGTERMs the ranks still running once one has exited: the claimant, last to go,
    # prints its line and ends with its code all the same (the handler only ends the waits)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: _sigterm.set())
    if kept:  # the others' errors may differ: wait until they are kept, then say where
        b.wait_for_the_others(GOODBYE_WAIT_S)
        others = sorted(r for r in kept_errors(failure_dir(stamp)) if r != b.rank)
        where = None
        if others:
            _keep(stamp, b.rank, claimed, _error_text(error, code, line))
            where = (
                f"rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too;"
                f" every failing rank's error is in {failure_dir(stamp)}/"
            )
        _print_report(error, code, line, prog, where)
    else:  # every rank failed alike: the line at once
        _print_report(error, code, line, prog, None)
        b.wait_for_the_others(GOODBYE_WAIT_S)
    return claimed


def _print_report(
    error: BaseException, code: Optional[int], line: str, prog: str, where: Optional[str]
) -> None:
    """The job's report: ``line`` (a traceback for a bug), and where the others' errors are."""
    global _printed
    _printed = True
    if code is None:
        traceback.print_exception(error)
        if where is not None:
            print(f"{prog}: error: {where}", file=sys.stderr)
    else:
        text = " ".join(line.split())
        print(text if where is None else f"{text} ({where})", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
