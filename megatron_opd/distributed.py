"""Process groups: torch.distributed from torchrun's environment, then Megatron's TP/PP/DP grid."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd import compat


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None

    def validate(self, world_size: int) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
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


def env_rank_and_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun (or Slurm's srun) sets them; (0, 0, 1) alone."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return rank, local_rank, world


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
) -> None:
    """Initialize torch.distributed (NCCL on GPU, gloo on CPU), Megatron's groups and the seeds.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment. A process
    started without them runs as a world of one.
    """
    from megatron.core import parallel_state

    compat.apply()
    rank, local_rank, world = env_rank_and_world()
    parallel.validate(world)
    if compat.has_cuda():
        torch.cuda.set_device(local_rank)
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
            distributed_timeout_minutes=timeout_minutes,
        )
    set_seeds(seed)


def teardown() -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
