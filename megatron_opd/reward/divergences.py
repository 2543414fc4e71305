"""Exact divergences between the student's and the teacher's next-token distributions, from
vocab-sharded logits (the layout of ``megatron_opd.reward.vocab_parallel``): the held-out gap's
yardsticks besides the reverse KL.

* total variation  TV = 1/2 sum_v |pi_S(v) - pi_T(v)|, in [0, 1]; the sign-only reward's
  expected update descends it.
* power divergence  D_a = sum_v [pi_S^(1+a) - (1+a) pi_T^a pi_S + a pi_T^(1+a)], the Bregman
  divergence of phi(x) = x^(1+a) between pi_S and pi_T. With the reward held constant, PowerOPD's
  expected update is sum_v (pi_T^a - pi_S^a) grad pi_S = -grad D_a / (1+a): it descends D_a.
  Every term is >= 0 (phi is convex); D_1 is the squared L2 distance, D_a / a -> KL(pi_S || pi_T)
  as a -> 0.

Evaluation only (no gradient). Three collectives over ``group`` whatever the number of tokens: MAX
of the row maxima, SUM of the two normalizers, SUM of the per-row results. The probabilities of one
chunk of rows are formed in float64 from logits relative to the global max, so the power terms'
cancellation near pi_S = pi_T costs ~1e-16 of the largest term, not fp32's ~1e-7.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.reward.vocab_parallel import default_chunk_size


def _group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if _group_size(group) > 1:
        t = t.contiguous()  # gloo sends wrong data from non-contiguous views
        dist.all_reduce(t, op=op, group=group)
    return t


@torch.no_grad()
def vocab_parallel_divergences(
    student_shard: torch.Tensor,
    teacher_shard: torch.Tensor,
    vocab_size: int,
    group=None,
    alphas: Sequence[float] = (),
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TV ``[...]``, D_a ``[len(alphas), ...]``) per position, float64.

    ``student_shard``, ``teacher_shard``: ``[..., v/tp]`` logits, TP rank ``k`` holding columns
    ``[k v/tp, (k+1) v/tp)``; columns ``>= vocab_size`` (padding) are left out.
    """
    if student_shard.shape != teacher_shard.shape:
        raise ValueError(
            f"student logits {tuple(student_shard.shape)} and teacher logits "
            f"{tuple(teacher_shard.shape)} differ in shape"
        )
    if any(not a > 0 for a in alphas):
        raise ValueError(f"power divergence alphas must be > 0, got {list(alphas)}")
    vp = student_shard.shape[-1]
    world = _group_size(group)
    start = (dist.get_rank(group) if world > 1 else 0) * vp
    n_valid = min(max(vocab_size - start, 0), vp)
    xs = student_shard.reshape(-1, vp)
    xt = teacher_shard.reshape(-1, vp)
    n = xs.shape[0]
    dev = xs.device
    chunk_size = chunk_size or default_chunk_size(dev)
    gmax = torch.full((2, n), float("-inf"), dtype=torch.float32, device=dev)
    if n_valid > 0:
        gmax[0] = xs[:, :n_valid].amax(dim=1).float()
        gmax[1] = xt[:, :n_valid].amax(dim=1).float()
    gmax = _all_reduce(gmax, dist.ReduceOp.MAX, group).double()

    def shifted(x: torch.Tensor, row: int, i: int, j: int) -> torch.Tensor:
        return x[i:j, :n_valid].double() - gmax[row, i:j, None]

    norm = torch.zeros(2, n, dtype=torch.float64, device=dev)
    if n_valid > 0:
        for i in range(0, n, chunk_size):
            j = min(i + chunk_size, n)
            norm[0, i:j] = shifted(xs, 0, i, j).exp().sum(dim=1)
            norm[1, i:j] = shifted(xt, 1, i, j).exp().sum(dim=1)
    log_norm = _all_reduce(norm, dist.ReduceOp.SUM, group).log()

    out = torch.zeros(1 + len(alphas), n, dtype=torch.float64, device=dev)
    if n_valid > 0:
        for i in range(0, n, chunk_size):
            j = min(i + chunk_size, n)
            ls = shifted(xs, 0, i, j) - log_norm[0, i:j, None]  # log pi_S on this shard
            lt = shifted(xt, 1, i, j) - log_norm[1, i:j, None]
            out[0, i:j] = 0.5 * (ls.exp() - lt.exp()).abs().sum(dim=1)
            for k, a in enumerate(alphas, start=1):
                terms = (
                    torch.exp((1 + a) * ls)
                    - (1 + a) * torch.exp(a * lt + ls)
                    + a * torch.exp((1 + a) * lt)
                )
                out[k, i:j] = terms.sum(dim=1)
    out = _all_reduce(out, dist.ReduceOp.SUM, group)
    lead = student_shard.shape[:-1]
    return out[0].view(lead), out[1:].view(len(alphas), *lead)
