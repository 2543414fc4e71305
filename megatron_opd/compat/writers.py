"""Dist-checkpoint writers that cannot hang a rank or outlive it (every platform).

0.16 forks writer processes; 0.19 writes from threads of the rank itself, so there a killed writer
is a killed rank, and only the results-queue patch below applies."""

from __future__ import annotations


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``): a helper
    process of a rank that is killed -9 must not live on holding hundreds of MB."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class WriterDied(RuntimeError):
    """A dist-checkpoint writer process ended without reporting (killed, out of memory)."""


def _watched_fork_context():
    """multiprocessing's fork context, except that a ``JoinableQueue.join()`` stops waiting with
    :class:`WriterDied` once a process started from the same context has died without finishing,
    and those processes die with their parent."""
    import multiprocessing as mp
    from multiprocessing import queues

    base = mp.get_context("fork")
    started: list = []

    class WatchedJoinableQueue(queues.JoinableQueue):
        def join(self):
            with self._cond:
                while not self._unfinished_tasks._semlock._is_zero():
                    self._cond.wait(timeout=0.5)
                    for p in started:
                        code = p.exitcode
                        if code is not None and code != 0:
                            raise WriterDied(
                                f"a checkpoint writer process (pid {p.pid}) died with exit code "
                                f"{code} before finishing its file"
                            )

    class WatchedContext:
        def __getattr__(self, name):
            return getattr(base, name)

        def JoinableQueue(self, maxsize=0):  # noqa: N802 - multiprocessing's name
            return WatchedJoinableQueue(maxsize, ctx=base)

        def Process(self, *args, target=None, **kwargs):  # noqa: N802
            def run(*a, **k):
                die_with_parent()
                return target(*a, **k)

            proc = base.Process(*args, target=run, **kwargs)
            started.append(proc)
            return proc

    return WatchedContext()


def _watch_checkpoint_writers() -> None:
    """Megatron-Core 0.16 ``dist_checkpointing/strategies/filesystem_async.py`` forks one writer
    per bucket and waits in ``count_queue.join()`` with no timeout: a writer killed by the OOM
    killer hangs the rank forever. Its fork context is swapped for one whose join notices dead
    writers, and whose writers die with the rank.

    Its results queue lives in a ``multiprocessing.Manager`` (a spawned server of ~270 MB that
    re-imports the script, seconds on the first save, and outlived a rank killed -9). That is for
    Megatron's asynchronous saves, whose persistent worker is a separate process; this project
    saves synchronously: the rank itself puts the writers' collected results and reads them back
    (``get_nowait``, so not a multiprocessing queue with its feeder thread), so a plain
    ``queue.Queue`` does.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if getattr(fsa, "_megatron_opd_watched", False):
        return
    import multiprocessing

    class _Multiprocessing:
        def __getattr__(self, name):
            return getattr(multiprocessing, name)

        def get_context(self, method=None):
            if method == "fork":
                return _watched_fork_context()
            return multiprocessing.get_context(method)

    def results_queue(mp_mode="spawn"):
        if fsa._results_queue is None:
            import queue

            fsa._results_queue = queue.Queue()
        return fsa._results_queue

    fsa.mp = _Multiprocessing()  # 0.19 starts no writer process: harmless there
    # the queue getter: 0.16 ``_get_write_results_queue``, 0.19 ``get_write_results_queue``
    for name in ("_get_write_results_queue", "get_write_results_queue"):
        if hasattr(fsa, name):
            setattr(fsa, name, results_queue)
    fsa._megatron_opd_watched = True


def writers_are_processes() -> bool:
    """0.16 forks a writer process per bucket; 0.19 writes from threads of the rank (a dead
    writer there is a dead rank, and there is no writer process to watch or to kill)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    return hasattr(fsa, "_get_write_results_queue")


def apply() -> None:
    _watch_checkpoint_writers()
