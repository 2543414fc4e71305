"""Two pools of ranks in one job: ``--rollout-ranks N`` gives the last N ranks of the launcher's
world only the rollout copy of the student; the others train (student, teachers, optimizer).

Each pool is a world of its own: its ranks form the default process group, and Megatron's
``parallel_state`` is initialized over it at the pool's layout (the training TP x PP, or
``--rollout-*-model-parallel-size``). So everything that trains runs unchanged on the training
pool, and everything that samples runs unchanged on the rollout pool; neither sees the other's
ranks. Megatron's groups cannot be built over a subset of the default group, which is why the
pools are two worlds and not two grids over one.

The pools meet in a *bridge*: a gloo group of the training pool's rank 0 (the leader) and every
rollout rank, built on the job's store (torchrun's, or the one rank 0 hosts under Slurm). Over
it the leader broadcasts control messages and the weights, and rollout rank 0 broadcasts each
batch. The bridge stages tensors through host memory (gloo), so on GPUs the weights make
one device-to-host and one host-to-device copy per refit.

A rollout rank that waits on the bridge polls a stop flag in the job's store, which the leader
sets when training ends early (``--exit-interval``, an exit signal, a non-finite stop): a
training pool that leaves never strands its rollout pool.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_opd.runtime import failures

TRAIN, ROLLOUT = "train", "rollout"
POLL_S = 0.005


def _attempt() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


@dataclass
class Pool:
    """This rank's pool. ``rank`` / ``size``: within the pool (its default process group)."""

    role: str
    rank: int
    size: int
    global_rank: int
    global_size: int
    store: Any = None  # the job's store (both pools), None without rollout ranks
    bridge: Optional[Bridge] = None  # the training leader and the rollout ranks only
    # the ModelGrid of the model this pool runs (the student, or its rollout copy on a rollout
    # pool), set by megatron_opd.runtime.distributed.initialize
    grid: Any = None

    @property
    def is_rollout(self) -> bool:
        return self.role == ROLLOUT


def job_store(rank: int, world: int, timeout: timedelta):
    """The launcher's store: torchrun's agent store, or one hosted by rank 0 (``env://``)."""
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return store


def split(rollout_ranks: int, backend: str, timeout_minutes: int) -> Pool:
    """Initialize this rank's pool as its default process group (and the bridge); see the
    module docstring. ``rollout_ranks == 0``: one pool, the launcher's world, as before."""
    rank, _, world = failures.env_rank_and_world()
    if rollout_ranks == 0:
        return Pool(TRAIN, rank, world, rank, world)
    timeout = timedelta(minutes=timeout_minutes)
    store = job_store(rank, world, timeout)
    failures.use_job_store(store)
    trainers = world - rollout_ranks
    role = TRAIN if rank < trainers else ROLLOUT
    pool_rank = rank if role == TRAIN else rank - trainers
    pool_size = trainers if role == TRAIN else rollout_ranks
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"megatron_opd/pool/{role}/", store),
        rank=pool_rank,
        world_size=pool_size,
        timeout=timeout,
    )
    bridge = None
    if rank == 0 or role == ROLLOUT:
        bridge_rank = 0 if rank == 0 else pool_rank + 1
        bridge = Bridge(store, bridge_rank, rollout_ranks + 1, timeout)
    return Pool(role, pool_rank, pool_size, rank, world, store, bridge)


@dataclass
class Bridge:
    """The gloo group of the training leader (bridge rank 0) and the rollout ranks (1..N)."""

    store: Any
    rank: int
    size: int
    timeout: timedelta
    group: Any = field(init=False)

    def __post_init__(self) -> None:
        prefixed = dist.PrefixStore(f"megatron_opd/bridge/{_attempt()}/", self.store)
        self.group = dist.ProcessGroupGloo(prefixed, self.rank, self.size, self.timeout)

    # -- stop flag ---------------------------------------------------------------------------

    @property
    def _stop_key(self) -> str:
        return f"megatron_opd/rollout/stop/{_attempt()}"

    def stop(self) -> None:
        """Tell the rollout ranks to leave (the leader, when training ends early)."""
        self.store.set(self._stop_key, "1")

    def stopped(self) -> bool:
        try:
            return self.store.check([self._stop_key])
        except RuntimeError:  # the store's host is gone: so is the job
            return True

    def _wait(self, work) -> bool:
        """Wait for ``work``; False when the stop flag came first (the work is abandoned)."""
        while not work.is_completed():
            if self.stopped():
                return False
            time.sleep(POLL_S)
        work.wait()  # raises what the transfer raised (a peer gone, a timeout)
        return True

    # -- transfers ---------------------------------------------------------------------------

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Optional[torch.Tensor]:
        """Bridge rank ``root``'s ``tensor`` on every bridge rank (in place); None when stopped.

        Everything goes by broadcast, batches too (from rollout rank 0, bridge rank 1): gloo's
        send and recv complete only inside ``wait()``, so a stop flag could not be polled."""
        host = tensor if tensor.device.type == "cpu" else tensor.cpu()
        host = host.contiguous()
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root, 0
        if not self._wait(self.group.broadcast([host], opts)):
            return None
        return host

    def broadcast_object(self, obj: Any = None, root: int = 0) -> Any:
        """Bridge rank ``root``'s ``obj`` on every bridge rank; the stop sentinel
        :data:`STOPPED`."""
        if self.rank == root:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        size = self.broadcast(size, root)
        if size is None:
            return STOPPED
        if self.rank != root:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        data = self.broadcast(data, root)
        if data is None:
            return STOPPED
        return obj if self.rank == root else pickle.loads(data.numpy().tobytes())


class _Stopped:
    def __repr__(self) -> str:
        return "STOPPED"


STOPPED = _Stopped()
