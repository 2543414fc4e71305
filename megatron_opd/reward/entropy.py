"""Entropy of the softmax over vocab-sharded logits (the layout of
``megatron_opd.reward.vocab_parallel``).

Used for the ``student/entropy`` training metric and the gap evaluation: a collapsing entropy is
the first sign of a student that sampled-token rewards push into a few tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.reward.vocab_parallel import default_chunk_size


def _group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


@torch.no_grad()
def vocab_parallel_entropy(
    logits_shard: torch.Tensor, vocab_size: int, group=None, chunk_size: Optional[int] = None
) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the true vocabulary, fp32 ``[...]``.

    ``logits_shard``: ``[..., v/tp]``, TP rank ``k`` holding columns ``[k v/tp, (k+1) v/tp)``;
    columns ``>= vocab_size`` (padding) are left out. Two all-reduces over ``group`` (MAX, then one
    SUM of two numbers per position): H = log S - sum_v e_v (x_v - g) / S with g the global max,
    e_v = exp(x_v - g) and S = sum_v e_v, so no log of a small probability is ever taken.
    """
    vp = logits_shard.shape[-1]
    world = _group_size(group)
    start = (dist.get_rank(group) if world > 1 else 0) * vp
    n_valid = min(max(vocab_size - start, 0), vp)
    x = logits_shard.reshape(-1, vp)
    n = x.shape[0]
    chunk_size = chunk_size or default_chunk_size(x.device)
    gmax = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    if n_valid > 0:
        gmax = x[:, :n_valid].amax(dim=1).float()
    if world > 1:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    sums = torch.zeros(2, n, dtype=torch.float32, device=x.device)
    if n_valid > 0:
        shifted = torch.empty(min(chunk_size, n), n_valid, dtype=torch.float32, device=x.device)
        e = torch.empty_like(shifted)
        for i in range(0, n, chunk_size):
            rows = min(chunk_size, n - i)
            sh, ex = shifted[:rows], e[:rows]
            torch.sub(x[i : i + rows, :n_valid], gmax[i : i + rows, None], out=sh)
            torch.exp(sh, out=ex)
            sums[0, i : i + rows] = ex.sum(dim=1)
            sums[1, i : i + rows] = torch.linalg.vecdot(ex, sh)
    if world > 1:
        dist.all_reduce(sums, group=group)
    return (sums[0].log() - sums[1] / sums[0]).view(logits_shard.shape[:-1])
