"""Process groups: torch.distributed from torchrun's environment, then Megatron's TP/PP/DP grid.

Every model runs on a :class:`ModelGrid` that its caller passes in. This is the one module that
reads Megatron's global ``parallel_state``: :func:`initialize` sets it up for Megatron's own code
(its schedules, DDP and optimizer read it), and :func:`student_grid` reads the student's groups
from it once, into the grid that :func:`initialize` returns with the pool.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd import compat
from megatron_opd.runtime import pools
from megatron_opd.runtime.failures import env_rank_and_world


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1  # a size of the grid, not supported yet: must be 1

    def validate(self, world_size: int) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if self.context_parallel_size != 1:
            raise ValueError(
                f"context-parallel size {self.context_parallel_size}: only 1 is supported"
            )
        if tp < 1:
            raise ValueError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
        if pp < 1:
            raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
                f"x --pipeline-model-parallel-size {pp}"
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or (vpp > 1 and pp == 1)):
            raise ValueError(
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"
            )


def set_seeds(seed: int) -> None:
    """Seed python, numpy and torch, then Megatron's model-parallel RNG streams.

    The data-parallel stream gets ``seed`` on every rank; Megatron offsets the tensor-parallel
    stream by the TP rank. Callers add their own offsets for per-rank sampling.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if compat.has_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        compat.install_cpu_rng_tracker()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)  # the tracker forks; the default stream restarts from the seed


def initialize(
    parallel: ParallelConfig = ParallelConfig(),
    seed: int = 1234,
    timeout_minutes: int = 30,
    rollout_ranks: int = 0,
    rollout_parallel: Optional[ParallelConfig] = None,
) -> pools.Pool:
    """Initialize torch.distributed (NCCL on GPU, gloo on CPU), Megatron's groups and the seeds;
    returns this rank's :class:`megatron_opd.runtime.pools.Pool`, whose ``grid`` is the
    student's grid (:func:`student_grid`; on a rollout pool, that of the student's copy there).

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment. A process
    started without them runs as a world of one. ``rollout_ranks``: the last ones form a pool of
    their own at ``rollout_parallel`` (``megatron_opd.runtime.pools``); the default process group
    and Megatron's groups are then the pool's.
    """
    from megatron.core import parallel_state

    compat.apply()
    rank, local_rank, world = env_rank_and_world()
    if compat.has_cuda():
        torch.cuda.set_device(local_rank)
    pool = pools.Pool(pools.TRAIN, rank, world, rank, world)
    if rollout_ranks and not dist.is_initialized():
        pool = pools.split(rollout_ranks, compat.distributed_backend(), timeout_minutes)
        if pool.is_rollout:
            parallel = rollout_parallel
    parallel.validate(pool.size)
    if not dist.is_initialized():
        init_method = None  # torchrun's MASTER_ADDR / MASTER_PORT
        if world == 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            # a lone process: a private port, kept out of os.environ so that subprocesses
            # (converters, evaluators) do not inherit an address that is already taken
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(
            backend=compat.distributed_backend(),
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    set_seeds(seed)
    pool.grid = student_grid()
    return pool


@dataclass
class ModelGrid:
    """A model's TP x PP x DP grid over the whole world: the student's (:func:`student_grid`,
    Megatron's global groups) or a model's own (:func:`build_model_grid`: a teacher or a rollout
    copy on another layout than the student's). Ranks are laid out as Megatron's default order
    ``tp-dp-pp``: ``rank = tp_rank + TP * (dp_rank + DP * pp_rank)``.

    Expert parallelism folds over data parallelism as in Megatron (``tp-ep-dp-pp`` with the
    experts' TP equal to the attention's): the EP ranks of an expert group are ``EP`` consecutive
    DP ranks of one stage (``ep_rank = dp_rank % EP``). Each holds its own replica of the dense
    weights and its share of the experts; the MoE layers exchange tokens over ``tp_ep``, so the
    members of an EP group run every forward pass together, on equally shaped batches."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    mp: dist.ProcessGroup  # TP x PP: one replica of the model, the ranks that score together
    embd: dist.ProcessGroup  # first and last pipeline stage (tied embeddings)
    cp: dist.ProcessGroup  # the context-parallel ranks: this rank alone while cp_size is 1
    mp_ranks: tuple[int, ...]  # global ranks of ``mp``, ascending
    # True for the grid read from parallel_state (student_grid). Megatron's GPTModel and
    # schedules are then given no pg_collection (model_groups) and read these same groups from
    # parallel_state themselves, as Megatron's DDP, optimizer, finalize_model_grads and checkpoint
    # replica ids do for the student: the student runs exactly as Megatron runs a model of its
    # own. Handing the student an explicit collection is not shown to keep every figure on both
    # Megatron versions (its virtual stages would also need the interleaved schedule's vp_size).
    from_parallel_state: bool = False
    cp_size: int = 1  # context parallelism: a field of the grid, not supported yet (must be 1)
    ep_size: int = 1
    ep: Optional[dist.ProcessGroup] = None  # the DP ranks that share one set of experts
    tp_ep: Optional[dist.ProcessGroup] = None  # TP x EP: the MoE dispatcher's all-gather
    expt_dp: Optional[dist.ProcessGroup] = None  # replicas of the same experts
    tp_dp: Optional[dist.ProcessGroup] = None  # one stage (the router's load-balancing sums)

    def rank_of(self, tp_rank: int, pp_rank: int, dp_rank: Optional[int] = None) -> int:
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        return tp_rank + self.tp_size * (dp_rank + self.dp_size * pp_rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def last_stage_rank(self) -> int:
        """The global rank of the last pipeline stage in this rank's ``pp`` group."""
        return self.rank_of(self.tp_rank, self.pp_size - 1)

    def model_groups(self):
        """What Megatron's GPTModel and pipeline schedules take as ``pg_collection``: ``None``
        on parallel_state's groups (``from_parallel_state``), this grid's collection otherwise."""
        return None if self.from_parallel_state else self.pg_collection()

    def pg_collection(self):
        """Megatron-Core's ``ProcessGroupCollection`` of this grid, for GPTModel and the
        pipeline schedules."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        if self.cp_size != 1:  # the context-parallel groups (tp_cp, dp_cp) are not built yet
            raise NotImplementedError(f"context-parallel size {self.cp_size}: only 1 is supported")
        return ProcessGroupCollection(
            tp=self.tp,
            pp=self.pp,
            mp=self.mp,
            embd=self.embd,
            pos_embd=None,
            cp=self.cp,
            tp_cp=self.tp,  # TP x CP at CP 1
            dp=self.dp,
            dp_cp=self.dp,  # DP x CP at CP 1
            # the MoE layers' groups (the router's tp_dp_cp sums load-balancing statistics)
            ep=self.ep if self.ep is not None else self.cp,
            expt_tp=self.tp,
            tp_ep=self.tp_ep if self.tp_ep is not None else self.tp,
            expt_dp=self.expt_dp if self.expt_dp is not None else self.dp,
            tp_dp_cp=self.tp_dp,
        )


def build_model_grid(
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    timeout_minutes: int = 30,
    expert_parallel_size: int = 1,
    context_parallel_size: int = 1,
) -> ModelGrid:
    """Process groups of a TP x PP (x EP) grid over all ranks (DP = world / (TP x PP), EP
    dividing DP), every group created on every rank in the same order, as
    ``torch.distributed.new_group`` requires. Context parallelism is a size of the grid but
    not supported yet: ``context_parallel_size`` must be 1.

    Megatron's ``HyperCommGrid`` does this enumeration too but needs ``einops``, which is not a
    dependency of this project; the arithmetic is the one line in :class:`ModelGrid`."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by TP {tp} x PP {pp}")
    dp = world // (tp * pp)
    ep, cp = expert_parallel_size, context_parallel_size
    if cp != 1:
        raise ValueError(f"context-parallel size {cp}: only 1 is supported")
    if dp % ep != 0:
        raise ValueError(
            f"expert-parallel size {ep} does not divide the data-parallel size {dp} "
            f"(world {world} / (TP {tp} x PP {pp}))"
        )
    timeout = timedelta(minutes=timeout_minutes)

    def at(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    def mine(rank_lists: list[list[int]]) -> dist.ProcessGroup:
        found = None
        for ranks in rank_lists:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                found = group
        assert found is not None, (rank, rank_lists)
        return found

    pp_lists = [[at(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    t_rank, d_rank, p_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    mp_lists = [sorted(at(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)]
    expert_groups = {}
    if ep > 1:  # DP rank d = e + EP * x: expert rank e of the x-th expert group
        firsts = [(p, x) for p in range(pp) for x in range(dp // ep)]
        expert_groups = dict(
            ep_size=ep,
            ep=mine([[at(t, x * ep + e, p) for e in range(ep)] for p, x in firsts
                     for t in range(tp)]),
            tp_ep=mine([sorted(at(t, x * ep + e, p) for e in range(ep) for t in range(tp))
                        for p, x in firsts]),
            expt_dp=mine([[at(t, x * ep + e, p) for x in range(dp // ep)] for p in range(pp)
                          for e in range(ep) for t in range(tp)]),
        )  # fmt: skip
    return ModelGrid(
        tp_size=tp,
        pp_size=pp,
        dp_size=dp,
        tp_rank=t_rank,
        pp_rank=p_rank,
        dp_rank=d_rank,
        tp=mine([[at(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]),
        pp=mine(pp_lists),
        dp=mine([[at(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)]),
        mp=mine(mp_lists),
        embd=mine([sorted({ranks[0], ranks[-1]}) for ranks in pp_lists]),
        cp=mine([[r] for r in range(world)]),  # CP 1: each rank alone
        mp_ranks=tuple(mp_lists[d_rank]),
        cp_size=cp,
        tp_dp=mine([[at(t, d, p) for d in range(dp) for t in range(tp)] for p in range(pp)]),
        **expert_groups,
    )


def student_grid() -> ModelGrid:
    """The student's grid (Megatron's global groups in ``parallel_state``; on a rollout pool, those
    of the student's copy there) as a :class:`ModelGrid`, no group created: a teacher on the
    student's layout is a teacher on this grid. :func:`initialize` returns it as ``pool.grid``;
    callers hand that down rather than call this again."""
    from megatron.core import parallel_state as ps

    mp = ps.get_model_parallel_group()
    return ModelGrid(
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        mp=mp,
        embd=ps.get_embedding_group(),
        cp=ps.get_context_parallel_group(),
        mp_ranks=tuple(sorted(dist.get_process_group_ranks(mp))),
        from_parallel_state=True,
        cp_size=ps.get_context_parallel_world_size(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_group(),
        tp_ep=ps.get_expert_tensor_and_model_parallel_group(),
        expt_dp=ps.get_expert_data_parallel_group(),
        tp_dp=ps.get_tensor_and_data_parallel_group(),
    )


def is_initialized() -> bool:
    """Whether Megatron's groups are set up in this process (:func:`initialize`)."""
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def teardown(timeout_s: float = 60.0) -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice).

    The ranks first wait for each other, for at most ``timeout_s``, through the store rather
    than a collective, so a rank whose peer has gone neither blocks nor raises. Called while an
    exception propagates (from a ``finally``), it does not wait at all: a failing rank's peers
    may be gone, and ``cli.run`` ends the process."""
    from megatron.core import parallel_state

    failing = sys.exc_info()[1] is not None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        if not failing:
            _bounded_barrier(timeout_s)
        dist.destroy_process_group()


_teardowns = 0


def _bounded_barrier(timeout_s: float) -> None:
    """Every rank arrives, or ``timeout_s`` passes, or the store is gone: whichever is first."""
    global _teardowns
    world = dist.get_world_size()
    if world == 1:
        return
    _teardowns += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"megatron_opd/teardown/{attempt}/{_teardowns}"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
    except RuntimeError:  # the store's host rank is gone
        pass


LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def standalone_env() -> dict[str, str]:
    """This process's environment without the launcher's rank variables: for a subprocess that
    must start its own world (e.g. a converter run from rank 0) rather than join this one."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")
    }


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
