"""The processes of a running job, read from /proc (Linux): torchrun's ranks, a rank's forked
checkpoint writers, every process that carries a mark in its environment. The fault soak and the
fault tests use them to aim a signal at one rank or writer and to count orphans after a job."""

from __future__ import annotations

import os
from pathlib import Path


def _proc(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    """The live children of ``pid``."""
    return [int(k) for k in _proc(pid, f"task/{pid}/children").split()]


def cmdline(pid: int) -> bytes:
    return _proc(pid, "cmdline")


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of each worker torchrun started (its children, by their ``RANK``)."""
    out = {}
    for pid in children(torchrun_pid):
        for item in _proc(pid, "environ").split(b"\0"):
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def writer_pids(rank_pid: int) -> list[int]:
    """A rank's forked dist-checkpoint writers: its children with its own command line (none
    where Megatron-Core writes from threads of the rank)."""
    own = cmdline(rank_pid)
    return [c for c in children(rank_pid) if own and cmdline(c) == own]


def marked(mark: str) -> list[int]:
    """Live processes (zombies aside) whose environment carries ``mark``: every process a job
    started with it in its environment inherits it."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            pid = int(proc.name)
            if mark.encode() in _proc(pid, "environ") and b"State:\tZ" not in _proc(pid, "status"):
                out.append(pid)
    return out
