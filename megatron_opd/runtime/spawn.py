"""Run a function on N gloo ranks in separate processes, as torchrun would start them.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), calls
``fn(*args)`` in each and returns the per-rank results. A failure on any rank raises with that
rank's traceback; a rank that hangs past ``timeout`` seconds fails the call and every process is
killed. ``fn`` must be importable (a module-level function), since the children are spawned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class DistributedFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, results, threads):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # megatron-core warns on import about missing transformer-engine / apex; that is expected here
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    torch.set_num_threads(threads)
    try:
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                # imported only where a rank set up Megatron's groups: this module stays free of
                # Megatron, so that a benchmark without megatron-core can spawn ranks too
                from megatron_opd.runtime.distributed import teardown

                teardown()
            except Exception:
                pass


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, results, threads))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(out) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise DistributedFailure(f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not failures:
                    # a rank died without reporting (segfault, OOM kill): fail fast
                    time.sleep(1.0)
                    if results.empty():
                        raise DistributedFailure(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}"
                        ) from None
                continue
            if ok:
                out[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                break
        if failures:
            raise DistributedFailure("\n".join(failures))
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
