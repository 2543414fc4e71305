"""Rollouts on their own layout: a copy of the student on a second grid, refitted after each step.

``--rollout-tensor-model-parallel-size T --rollout-pipeline-model-parallel-size P`` (Megatron-RL
calls these ``--rl-inference-*-model-parallel-size``) build a frozen copy of the student at
TP ``T`` x PP ``P`` over the whole world (DP = world / (T x P)), beside the training model.
Before each rollout the training weights are copied into it (the refit), and each of its replicas
samples a contiguous share of the step's prompts from every data-parallel rank.

Why: decoding is one token at a time, so a pipeline-parallel decode visits its stages one after
the other and every stage but one waits (``docs/benchmarks.md``); a student trained at PP2 can
sample at TP1 x DP2 instead. A small student trained at TP8 can likewise sample at TP1 or TP2.

The refit streams one parameter at a time, so it never holds more than one full tensor beyond
the two models: the training ranks that hold a tensor (data-parallel replica 0, one pipeline
stage) gather its tensor-parallel shards on their first rank, which broadcasts the full tensor;
each rank whose rollout chunk holds that tensor copies its own shard out of it. Shards follow
Megatron's local-spec layout: column-parallel weights split along dim 0 (the fused QKV by whole
query groups, so a plain concatenation is exact), row-parallel along dim 1, the gated
``linear_fc1`` as ``[gate shard; up shard]`` per rank, and vocabulary rows padded per layout
(the rows past the true vocabulary are zeros, and the sampler never reads them). With tied
embeddings a later pipeline stage's ``output_layer.weight`` is the embedding.

The refit reads the model's parameters as the optimizer step left them: Megatron's
``overlap_param_gather`` (not used here) would leave them stale until the next forward.

Cost: every rank receives every full tensor (one broadcast over the world per tensor), which is
what a TP1 copy needs; a sharded copy (TP or PP > 1) receives T x P times more than it keeps.
Students small enough to sample at TP1 are the case this is for. Memory: one more copy of the
student's weights per model-parallel group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.models import gpt
from megatron_opd.rollout.generation import Generation, generate
from megatron_opd.runtime.checkpointing import unwrap
from megatron_opd.runtime.distributed import ModelGrid, build_model_grid
from megatron_opd.training import teacher

TP_FLAG = "--rollout-tensor-model-parallel-size"
PP_FLAG = "--rollout-pipeline-model-parallel-size"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def global_parameters(chunks: Sequence[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under layout-free names: ``decoder.layers.<global index>.…``
    (Megatron numbers each chunk's layers from 0), the tied output weight left out."""
    out = {}
    for chunk in chunks:
        core = unwrap(chunk)
        numbers = [layer.layer_number - 1 for layer in core.decoder.layers]
        for name, param in core.named_parameters():
            if name == "output_layer.weight" and core.share_embeddings_and_output_weights:
                continue  # a copy of the embedding kept in sync by Megatron
            match = _LAYER.match(name)
            if match:
                name = f"decoder.layers.{numbers[int(match[1])]}.{match[2]}"
            out[name] = param
    return out


def _split_dim(param: torch.nn.Parameter) -> Optional[int]:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _gated(name: str, gated: bool) -> bool:
    return gated and name.endswith("mlp.linear_fc1.weight")


def merge_shards(name: str, shards: list[torch.Tensor], dim: int, gated: bool) -> torch.Tensor:
    """The full tensor from its TP shards in TP-rank order."""
    if _gated(name, gated):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def shard_of(
    name: str, full: torch.Tensor, dim: int, rank: int, size: int, gated: bool
) -> torch.Tensor:
    """TP rank ``rank``'s shard of ``full`` out of ``size`` (``merge_shards``' inverse)."""
    if _gated(name, gated):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


@dataclass
class _Source:
    """Where a full tensor comes from: the training ranks holding its shards, in TP order."""

    ranks: list[int]
    shape: tuple[int, ...]  # the full tensor's (vocabulary rows padded at the training TP)
    dim: Optional[int]
    dtype: torch.dtype


def plan_sources(params: dict[str, torch.nn.Parameter], dp_rank: int, tp_group,
                 group=None) -> dict[str, _Source]:  # fmt: skip
    """Every full tensor's source, the same on every rank of ``group`` (one all-gather):
    the ranks of data-parallel replica 0 that hold its tensor-parallel shards, in TP order."""
    tp = dist.get_world_size(tp_group)
    tp_rank = dist.get_rank(tp_group)
    mine = {}
    if dp_rank == 0:
        for name, p in params.items():
            dim = _split_dim(p)
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp
            mine[name] = (tuple(shape), dim, p.dtype, tp_rank)
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, (dist.get_rank(), mine), group=group)
    holders: dict[str, list[tuple[int, int]]] = {}
    info: dict[str, tuple] = {}
    for rank, table in every:
        for name, (shape, dim, dtype, shard) in table.items():
            holders.setdefault(name, []).append((shard, rank))
            info[name] = (shape, dim, dtype)
    return {
        name: _Source([r for _, r in sorted(holders[name])], *info[name])
        for name in sorted(holders)
    }


def assemble(name: str, src: _Source, params: dict[str, torch.nn.Parameter], tp_group,
             gated: bool) -> Optional[torch.Tensor]:  # fmt: skip
    """The full tensor ``name`` on its first source rank (``src.ranks[0]``), gathered from the
    tensor-parallel shards of the ranks that hold it; None on every other rank (the holders
    must all call it)."""
    me = dist.get_rank()
    if me not in src.ranks:
        return None
    local = params[name].detach().contiguous()
    if len(src.ranks) == 1 or src.dim is None:
        return local
    root = src.ranks[0]
    shards = [torch.empty_like(local) for _ in src.ranks] if me == root else None
    dist.gather(local, shards, dst=root, group=tp_group)
    return merge_shards(name, shards, src.dim, gated) if me == root else None


def load_full(targets: dict[str, torch.nn.Parameter], name: str, full: torch.Tensor,
              tp_rank: int, tp_size: int, gated: bool) -> None:  # fmt: skip
    """Copy this rank's shard of the full tensor ``name`` into ``targets[name]`` (if it holds
    that tensor): vocabulary rows padded to the target layout, split at its TP size."""
    target = targets.get(name)
    if target is None:
        return
    dim = _split_dim(target)
    if name in _VOCAB_ROWS:  # rows padded per layout: copy the common rows, zero the rest
        rows = target.shape[0] * (tp_size if dim is not None else 1)
        padded = full.new_zeros((rows, *full.shape[1:]))
        n = min(rows, full.shape[0])
        padded[:n] = full[:n]
        full = padded
    if dim is not None and tp_size > 1:
        full = shard_of(name, full, dim, tp_rank, tp_size, gated)
    target.copy_(full.to(target.device))


def copy_targets(chunk: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """A rollout copy's parameters by layout-free name (a later stage's tied output layer
    stands for the embedding)."""
    targets = global_parameters([chunk])
    core = unwrap(chunk)
    if core.post_process and core.share_embeddings_and_output_weights and not core.pre_process:
        targets["embedding.word_embeddings.weight"] = core.output_layer.weight
    return targets


def build_copy(arch: gpt.ArchConfig, grid: ModelGrid, dtype: torch.dtype,
               vocab_divisor: int) -> torch.nn.Module:  # fmt: skip
    """A frozen, uninitialised copy of the student on ``grid`` (this stage's chunk), for a refit
    to fill: the colocated copy's and the rollout ranks' one builder."""
    config = gpt.transformer_config(
        arch, grid.tp_size, grid.pp_size, dtype=dtype, perform_initialization=False
    )
    (chunk,) = gpt.build_model(arch, config, grid, vocab_divisor)
    chunk.eval()
    chunk.requires_grad_(False)
    return chunk


class RolloutModel:
    """The student's rollout copy on its own TP x PP grid (see the module docstring)."""

    def __init__(self, student: Sequence[torch.nn.Module], student_grid: ModelGrid,
                 arch: gpt.ArchConfig, vocab_divisor: int, tp: int, pp: int,
                 timeout_minutes: int = 30):  # fmt: skip
        """A copy at TP ``tp`` x PP ``pp`` of the ``student`` (its chunks on
        ``student_grid``)."""
        self.grid: ModelGrid = build_model_grid(tp, pp, timeout_minutes=timeout_minutes)
        dtype = unwrap(student[0]).config.params_dtype
        self.chunk = build_copy(arch, self.grid, dtype, vocab_divisor)
        self.gated = bool(self.chunk.config.gated_linear_unit)
        self.train_dp_rank = student_grid.dp_rank
        self.train_tp_group = student_grid.tp
        self.sources = plan_sources(
            global_parameters(student), self.train_dp_rank, self.train_tp_group
        )
        self.targets = copy_targets(self.chunk)

    @torch.no_grad()
    def refit(self, student: Sequence[torch.nn.Module]) -> None:
        """Copy the training weights into the rollout copy (collective over the world)."""
        params = global_parameters(student)
        device = next(self.chunk.parameters()).device
        for name, src in self.sources.items():
            full = assemble(name, src, params, self.train_tp_group, self.gated)
            if full is None:
                full = torch.empty(src.shape, dtype=src.dtype, device=device)
            dist.broadcast(full, src=src.ranks[0])
            load_full(self.targets, name, full, self.grid.tp_rank, self.grid.tp_size, self.gated)

    def generate(self, tokenizer, prompts: Sequence[Sequence[int]], seed: int,
                 **kwargs) -> list[Generation]:  # fmt: skip
        """One generation per prompt of this training data-parallel rank: every rank's prompts
        are pooled in data-parallel order, each rollout replica samples a contiguous share
        (seed ``seed`` + its replica index), and the results go back to where they came from.
        ``kwargs``: :func:`megatron_opd.rollout.generation.generate`'s sampling arguments."""
        grid = self.grid
        pooled: list = [None] * dist.get_world_size()
        dist.all_gather_object(pooled, (self.train_dp_rank, [list(map(int, p)) for p in prompts]))
        by_dp = dict(pooled)  # the ranks of one training replica hold the same prompts
        order = sorted(by_dp)
        flat = [p for d in order for p in by_dp[d]]
        bounds = [len(flat) * r // grid.dp_size for r in range(grid.dp_size + 1)]
        share = flat[bounds[grid.dp_rank] : bounds[grid.dp_rank + 1]]
        gens = []
        if share:
            gens = generate(
                [self.chunk], tokenizer, share, seed=seed + grid.dp_rank,
                pg_collection=grid.pg_collection(), **kwargs,
            )  # fmt: skip
        results: list = [None] * dist.get_world_size()
        dist.all_gather_object(results, (grid.dp_rank, gens))
        by_replica = dict(results)
        every = [g for r in range(grid.dp_size) for g in by_replica[r]]
        start = sum(len(by_dp[d]) for d in order if d < self.train_dp_rank)
        return every[start : start + len(prompts)]


def check_layout(
    arch: gpt.ArchConfig,
    world_size: int,
    *,
    training: tuple[int, int],
    rollout: tuple[Optional[int], Optional[int]],
    rollout_ranks: int = 0,
    engine: str = "auto",
) -> Optional[tuple[int, int]]:
    """The rollout layout ``(TP, PP)`` asked for, ``None`` for the training layout (given or
    not: no copy is made); a ValueError naming the flag when ``arch`` cannot run at it.

    ``training``: the student's (TP, PP); ``rollout``: ``--rollout-{tensor,pipeline}-model-
    parallel-size`` as given (None: unset); ``rollout_ranks``, ``engine``: ``--rollout-ranks``,
    ``--rollout-engine``."""
    tp, pp = rollout
    if rollout_ranks:  # the copy on rollout ranks of its own (megatron_opd.rollout.remote)
        tp, pp = tp or 1, pp or 1
        teacher.check_layout(arch, tp, pp, rollout_ranks, "student", flags=(TP_FLAG, PP_FLAG))
        return tp, pp
    if tp is None and pp is None:
        return None
    tp = training[0] if tp is None else tp
    pp = training[1] if pp is None else pp
    teacher.check_layout(arch, tp, pp, world_size, "student", flags=(TP_FLAG, PP_FLAG))
    if (tp, pp) == tuple(training):
        return None
    if engine == "dynamic":
        raise ValueError(
            f"--rollout-engine dynamic runs on the training layout; unset {TP_FLAG} / {PP_FLAG}"
        )
    return tp, pp
