"""The OPD loss in Megatron-Core's schedule contract.

``forward_step(data_iterator, model)`` returns ``(student_logits_shard, opd_loss_func(...))``
and the schedule calls ``loss_func(output_tensor) -> (loss_sum, num_tokens, report)``:

    loss_sum   = -sum over the micro-batch's valid tokens of sg[r_t] * log pi_S(o_t)
                 (full_vocab_kl: sum of KL(pi_S || pi_T) over the valid positions)
    num_tokens = the number of those tokens (an int tensor, as the schedule accumulates it)

Normalization (checked against megatron/core 0.16.1 and 0.19.2): with ``TransformerConfig.
calculate_per_token_loss=True`` the schedule (``pipeline_parallel/schedules.py``,
``forward_step_calc_loss``) back-propagates ``loss_sum`` unscaled and adds up ``num_tokens`` over
the micro-batches; ``distributed/finalize_model_grads.py`` then all-reduces that count over the
data-parallel (x context-parallel) group and multiplies every gradient by 1 / count, after Megatron
DDP has *summed* the gradients over the DP ranks (DDP uses gradient_scaling_factor 1.0 and refuses
``average_in_collective`` in this mode). The result is the token mean over the whole optimizer step,
whatever the micro-batch split and the DP size. The caller must therefore set
``calculate_per_token_loss=True`` and ``config.finalize_model_grads_func = finalize_model_grads``
(:func:`require_per_token_loss` checks both); without them the schedule divides each micro-batch by
its own count and by the number of micro-batches, which is not the paper's normalization.

Report: the schedule (0.16.1 and 0.19.2) only appends the third value of every micro-batch to the
list that ``forward_backward_func`` returns on the last pipeline stage; it does not combine them.
Each report value here is a tensor that merges by sum (min / max for the reward extrema, and a
fixed-size histogram for percentiles), so :func:`reduce_reports` combines micro-batches and DP
ranks exactly.

Z-score needs the mean and std of the log-ratio over the whole step *before* any micro-batch's
backward: run the pre-update student forward-only over the step, then
:func:`step_log_ratio_moments`, and pass the moments to every micro-batch's loss function.

Layout: Megatron's GPTModel returns logits ``[b, s, v/tp]`` when called without labels, so the
tensors here are ``[b, s]``: position ``i`` predicts token ``i + 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.reward import rewards
from megatron_opd.reward.entropy import vocab_parallel_entropy
from megatron_opd.reward.rewards import RewardConfig
from megatron_opd.reward.vocab_parallel import (
    full_vocab_reverse_kl,
    opd_token_terms,
    sampled_token_logprobs,
)

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def require_per_token_loss(config) -> None:
    """Raise unless the TransformerConfig gives the step-wide token mean (see module docstring)."""
    if not getattr(config, "calculate_per_token_loss", False):
        raise ValueError(
            "the OPD loss needs TransformerConfig(calculate_per_token_loss=True): otherwise "
            "Megatron averages per micro-batch instead of over the step's tokens"
        )
    if getattr(config, "finalize_model_grads_func", None) is None:
        raise ValueError(
            "the OPD loss needs config.finalize_model_grads_func = finalize_model_grads: it is "
            "what divides the gradients by the step's token count"
        )


def shift_targets(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """``targets[:, i] = input_ids[:, i + 1]``; the last position gets ``pad_id`` (never scored)."""
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def build_loss_mask(
    prompt_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    truncated: torch.Tensor,
    seq_len: int,
    mask_final_stop_token: bool = True,
) -> torch.Tensor:
    """Boolean ``[b, seq_len]`` mask over the positions whose *target* is a trained response token.

    Row ``k`` holds the prompt in ``[0, P)`` and the response in ``[P, P + R)``; position ``i``
    predicts token ``i + 1``, so the response is scored at positions ``[P - 1, P + R - 1)``. A
    response that was not truncated ends with its stop token; with ``mask_final_stop_token`` that
    last token is left out (teacher and student may end differently). Truncated responses have no
    stop token and keep every token.
    """
    p = prompt_lengths.long().view(-1, 1)
    r = response_lengths.long().view(-1, 1)
    if bool((p < 1).any()):
        raise ValueError("every sequence needs a prompt of at least one token")
    if bool((p + r > seq_len).any()):
        raise ValueError(f"prompt + response is longer than the sequence length {seq_len}")
    drop_stop = (~truncated.bool().view(-1, 1)).long() if mask_final_stop_token else 0
    end = p + r - 1 - drop_stop
    i = torch.arange(seq_len, device=p.device).view(1, -1)
    return (i >= p - 1) & (i < end)


def opd_loss_func(
    *,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    reward_cfg: RewardConfig,
    vocab_size: int,
    tp_group,
    teacher_logprobs: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    zscore_moments: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    chunk_size: Optional[int] = None,
    inplace_backward: bool = True,
) -> LossFunc:
    """The ``loss_func`` of one micro-batch.

    targets, loss_mask, teacher_logprobs: ``[b, s]``. teacher_logits: the teacher's logits shard
    ``[b, s, v/tp]``, required for ``full_vocab_kl`` (its sampled-token log-probs are then derived
    from it). ``inplace_backward`` lets the gradient of the student's logits reuse their buffer, as
    Megatron's cross-entropy does (the logits are the model's output and are read by nothing else).
    """
    reward_cfg.validate()
    kind = reward_cfg.kind
    if reward_cfg.needs_teacher_logits:
        if teacher_logits is None:
            raise ValueError("--opd-reward full_vocab_kl needs the teacher's logits")
    elif teacher_logprobs is None:
        raise ValueError(f"--opd-reward {kind} needs the teacher's sampled-token log-probs")
    if reward_cfg.needs_step_moments and zscore_moments is None:
        raise ValueError(
            "--opd-reward zscore needs the step's log-ratio moments (step_log_ratio_moments)"
        )
    mask = loss_mask.bool()

    def loss_func(output_tensor: torch.Tensor):
        terms = dict(
            vocab_size=vocab_size,
            zscore_moments=zscore_moments,
            seq_dim=1,
            chunk_size=chunk_size,
        )
        if reward_cfg.needs_teacher_logits:
            with torch.no_grad():
                lp_t = teacher_logprobs
                if lp_t is None:
                    lp_t = sampled_token_logprobs(
                        teacher_logits, targets, vocab_size, tp_group, chunk_size
                    )
                _, _, stats = opd_token_terms(
                    output_tensor.detach(), lp_t, targets, mask, reward_cfg, tp_group, **terms
                )
            kl = full_vocab_reverse_kl(
                output_tensor, teacher_logits, vocab_size, tp_group, chunk_size, inplace_backward
            )
            loss_sum = torch.where(mask, kl, 0.0).sum()
        else:
            reward, student_lp, stats = opd_token_terms(
                output_tensor,
                teacher_logprobs,
                targets,
                mask,
                reward_cfg,
                tp_group,
                inplace_backward=inplace_backward,
                **terms,
            )
            loss_sum = -torch.where(mask, reward * student_lp, 0.0).sum()
        stats["loss_sum"] = loss_sum.detach().double()
        # the student's entropy on its own samples: the early sign of a collapsing student
        entropy = vocab_parallel_entropy(output_tensor.detach(), vocab_size, tp_group, chunk_size)
        stats["entropy_sum"] = torch.where(mask, entropy, 0.0).sum().double()
        num_tokens = mask.sum().to(torch.int)
        return loss_sum, num_tokens, stats

    return loss_func


def step_log_ratio_moments(
    teacher_logprobs: list[torch.Tensor],
    student_logprobs: list[torch.Tensor],
    loss_masks: list[torch.Tensor],
    dp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population std) of lp_T - lp_S over every valid token of the step, all micro-batches
    of this rank and every rank of ``dp_group`` (None: this rank only), as fp32 scalars."""
    acc = torch.zeros(3, dtype=torch.float64, device=loss_masks[0].device)
    for lp_t, lp_s, m in zip(teacher_logprobs, student_logprobs, loss_masks, strict=True):
        m = m.bool()
        r = (lp_t.double() - lp_s.double())[m]
        acc += torch.stack([r.new_tensor(float(r.numel())), r.sum(), r @ r])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(acc, group=dp_group)
    n = acc[0].clamp(min=1)
    mean = acc[1] / n
    var = (acc[2] / n - mean * mean).clamp(min=0)
    return mean.float(), var.sqrt().float()


def reduce_reports(reports: list[dict[str, torch.Tensor]], dp_group=None) -> dict[str, float]:
    """Combine the reports of one step (every micro-batch of this rank, then every rank of
    ``dp_group``) into the logged numbers (``rewards.summarize_statistics``). Ranks that hold no
    report (not the last pipeline stage) return ``{}`` and take part in no collective."""
    if not reports:
        return {}
    merged = rewards.merge_statistics(reports)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        ops = {
            dist.ReduceOp.MIN: [k for k in merged if k in rewards.STAT_MIN_KEYS],
            dist.ReduceOp.MAX: [k for k in merged if k in rewards.STAT_MAX_KEYS],
        }
        special = set(ops[dist.ReduceOp.MIN]) | set(ops[dist.ReduceOp.MAX])
        ops[dist.ReduceOp.SUM] = [k for k in merged if k not in special]
        for op, keys in ops.items():
            if not keys:
                continue
            flat = torch.cat([merged[k].reshape(-1) for k in keys]).contiguous()
            dist.all_reduce(flat, op=op, group=dp_group)
            offset = 0
            for k in keys:
                n = merged[k].numel()
                merged[k] = flat[offset : offset + n].view_as(merged[k])
                offset += n
    out = rewards.summarize_statistics(merged)
    if "entropy_sum" in merged and out["num_tokens"] > 0:
        out["student_entropy"] = merged["entropy_sum"].item() / out["num_tokens"]
    return out
