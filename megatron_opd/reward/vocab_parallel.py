"""Per-token quantities from vocab-sharded logits; the only module that knows logits are sharded.

With tensor parallelism rank ``k`` of the TP group holds the logits of vocabulary entries
``[k * v/tp, (k + 1) * v/tp)`` (Megatron's ``[seq, batch, vocab/tp]`` layout; any leading dims
work). The output layer is padded past the true vocabulary (``models.padded_vocab_size``):
columns whose global index is ``>= vocab_size`` are treated as -inf, so they get no probability
and no gradient.

No rank ever holds more than its own shard. Reductions over the vocabulary are two all-reduces per
call whatever the number of tokens: each rank computes, per token, its local max and its sum of
exp(x - local max) over a chunk of tokens (small enough that the second sweep reads it from cache),
then MAX of the maxima and SUM of the rescaled sums across ``group``. The extra memory is one fp32
buffer of ``chunk_size x vocab/tp`` plus a few ``[tokens]`` vectors: no fp32 copy of the shard, no
saved softmax. The backward recomputes the softmax of each chunk over this shard and scales it by
the shard's share of the probability mass, a saved ``[tokens]`` vector.

Precision at large logits: logits of magnitude 30-100 have an fp32 spacing of ~1e-5, as large as a
confident token's whole log-prob. So no large number is subtracted from another after the
reductions: every logit is taken relative to the (local, then global) max before anything is
summed or all-reduced, which is exact near the max; the target's own term is left out of the sum
so that a likely token's log-prob is ``-log1p(rest / exp(target - max))`` (full relative precision,
where ``log(1 + tiny)`` would round to 0). The owner of the target subtracts the global max from it
before the SUM, so this costs no extra collective.

``group`` is the TP process group, passed explicitly; ``None`` means the logits are not sharded
(no torch.distributed needed). Inputs may be fp32, bf16 or fp16; accumulation is fp32 and the
outputs are fp32.

``inplace_backward=True`` writes the gradient into the logits' own buffer, as Megatron-Core's
``vocab_parallel_cross_entropy`` does: it saves a shard-sized allocation (and its page faults) per
step. Only use it when nothing else reads those logits after the backward; an op that saved them for
its own backward fails loudly (autograd's version check) rather than computing a wrong gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.reward.rewards import (
    RewardConfig,
    compute_reward,
    log_ratio_reward,
    response_positions,
    reward_statistics,
)

# Tokens per chunk: 16 x 151,936 fp32 = 9.7 MB of scratch, which stays in a 32 MB L3 between the
# sweeps over the same chunk; 8 to 16 were equally fast, fewer tokens per chunk mean more (and more
# contention-prone) parallel regions. See docs/benchmarks.md ("Reward op").
DEFAULT_CHUNK_SIZE = 16
# On a GPU the same op at 16 tokens a chunk is launch-bound: 8,192 tokens x 151,936 took 116.6 ms
# forward + backward on an H200 at 16 and 24.2 ms at 1024 (docs/benchmarks.md, the GPU check's
# (b)); a chunk of 1024 x 151,936 fp32 is 622 MB of scratch, small beside the logits themselves.
CUDA_CHUNK_SIZE = 1024


def default_chunk_size(device: torch.device) -> int:
    """Tokens per chunk of the vocabulary ops on ``device`` (``chunk_size=None`` everywhere)."""
    return CUDA_CHUNK_SIZE if torch.device(device).type == "cuda" else DEFAULT_CHUNK_SIZE


ProcessGroup = Optional["dist.ProcessGroup"]


def _group_size(group: ProcessGroup) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _group_rank(group: ProcessGroup) -> int:
    return 0 if _group_size(group) == 1 else dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op, group: ProcessGroup) -> torch.Tensor:
    if _group_size(group) == 1:
        return t
    t = t.contiguous()  # gloo sends wrong data from non-contiguous views
    dist.all_reduce(t, op=op, group=group)
    return t


def _shard(logits: torch.Tensor, vocab_size: int, group: ProcessGroup) -> tuple[int, int]:
    """(first global vocabulary index of this shard, number of its columns below vocab_size)."""
    vp = logits.shape[-1]
    world = _group_size(group)
    if vp * world < vocab_size:
        raise ValueError(
            f"logits hold {vp} x {world} = {vp * world} vocabulary columns, fewer than "
            f"vocab_size {vocab_size}"
        )
    start = _group_rank(group) * vp
    return start, min(max(vocab_size - start, 0), vp)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def _local_target(targets: torch.Tensor, start: int, n_valid: int):
    """(this rank owns the target, the target's column in this shard clamped into range)."""
    t = targets.reshape(-1).long()
    owned = (t >= start) & (t < start + n_valid)
    col = (t - start).clamp(0, max(n_valid - 1, 0))
    return owned, col


def _local_logsumexp_terms(
    x: torch.Tensor,
    n_valid: int,
    chunk: int,
    buf: torch.Tensor,
    owned: torch.Tensor,
    col: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (max over this shard's valid columns, sum of exp(x - that max) over them), fp32.

    The sum leaves out the target's own term on the rank that owns it: the caller adds it back
    from the target logit, so that for a likely target log p = -log1p(rest / exp(target - max))
    keeps full relative precision, where log(sum) would round 1 + tiny to 1.
    """
    n = x.shape[0]
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    s = torch.zeros(n, dtype=torch.float32, device=x.device)
    if n_valid == 0:
        return m, s
    for i in range(0, n, chunk):
        xc = x[i : i + chunk, :n_valid]
        e = buf[: xc.shape[0]]
        mc = xc.amax(dim=1).float()
        torch.sub(xc, mc.unsqueeze(1), out=e)
        e.exp_()
        c = col[i : i + chunk].unsqueeze(1)
        e.scatter_(1, c, torch.where(owned[i : i + chunk].unsqueeze(1), 0.0, e.gather(1, c)))
        m[i : i + chunk] = mc
        torch.sum(e, dim=1, out=s[i : i + chunk])
    return m, s


def _softmax_rows(x: torch.Tensor, out: torch.Tensor) -> None:
    """softmax over the last dim of fp32 rows into ``out`` (which may be ``x`` itself).

    ATen's fused CPU kernel (max, exp and sum in one sweep per row, a faster exp) is about 1.5x
    quicker than sub + exp_ + mul as separate passes; its relative error (~1e-5 at V = 152k) is
    fine for a gradient, so only the backward uses it: the forward's log-probs come from the
    separate, more accurate passes (cascade summation).
    """
    torch._softmax(x, -1, False, out=out)


class _SampledTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_size, group, chunk_size, inplace_backward):
        start, n_valid = _shard(logits, vocab_size, group)
        x = _rows(logits)
        owned, col = _local_target(targets, start, n_valid)
        chunk = max(1, min(chunk_size or default_chunk_size(x.device), x.shape[0]))
        buf = torch.empty(chunk, n_valid, dtype=torch.float32, device=x.device)
        m, rest = _local_logsumexp_terms(x, n_valid, chunk, buf, owned, col)
        target_logit = x.gather(1, col.unsqueeze(1)).squeeze(1).float()
        # One MAX, then one SUM of (rescaled sum-exp without the target, target logit minus the
        # global max: nonzero on its owner only). The owner subtracts the max before the SUM
        # rather than after the log: at logits of 30-100 the difference of two such fp32
        # numbers loses ~1e-5 absolute, all of a confident token's log-prob, while x - max is
        # exact for the argmax (0) and for any logit within a factor 2 of it.
        gmax = _all_reduce(m.clone(), dist.ReduceOp.MAX, group)
        local_rest = rest * torch.exp(m - gmax)
        target_rel = torch.where(owned, target_logit - gmax, 0.0)
        summed = _all_reduce(torch.stack([local_rest, target_rel]), dist.ReduceOp.SUM, group)
        rest_all, target_rel = summed[0], summed[1]
        target_exp = target_rel.exp()
        total = rest_all + target_exp
        # log p = target_rel - log(total) = -log1p(rest / target_exp). The second form keeps full
        # relative precision when p >= 1/2 (where the ratio is <= 1, so it cannot overflow); the
        # first is as precise when p < 1/2, where |log p| > 0.69.
        logprob = torch.where(
            target_exp >= rest_all,
            -torch.log1p(rest_all / target_exp),
            target_rel - total.log(),
        )
        # this shard's share of the probability mass: softmax = local softmax x share
        share = (local_rest + torch.where(owned, target_exp, 0.0)) / total
        ctx.save_for_backward(logits, targets, share)
        ctx.shard = (start, n_valid, chunk)
        ctx.inplace_backward = inplace_backward
        return logprob.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, share = ctx.saved_tensors
        start, n_valid, chunk = ctx.shard
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        inplace = ctx.inplace_backward and logits.is_contiguous()
        x = _rows(logits)
        grad = x if inplace else torch.empty_like(x)
        g = grad_output.reshape(-1).float()
        owned, col = _local_target(targets, start, n_valid)
        owned_g = torch.where(owned, g, 0.0).unsqueeze(1)
        col = col.unsqueeze(1)
        coef = (-g * share).unsqueeze(1)
        direct = x.dtype == torch.float32 and n_valid == x.shape[1]
        buf = None if direct else torch.empty(chunk, n_valid, dtype=torch.float32, device=x.device)
        if n_valid > 0:
            for i in range(0, x.shape[0], chunk):
                j = min(i + chunk, x.shape[0])
                if direct:
                    out = grad[i:j]
                    _softmax_rows(x[i:j], out)
                else:
                    out = buf[: j - i]
                    out.copy_(x[i:j, :n_valid])
                    _softmax_rows(out, out)
                # d log p(t) / d x_v = onehot(t)_v - softmax(x)_v, times the upstream gradient
                out.mul_(coef[i:j])
                out.scatter_add_(1, col[i:j], owned_g[i:j])
                if not direct:
                    grad[i:j, :n_valid].copy_(out)
        if n_valid < x.shape[1]:
            grad[:, n_valid:].zero_()
        return grad.view(logits.shape), None, None, None, None, None


def sampled_token_logprobs(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    group: ProcessGroup = None,
    chunk_size: Optional[int] = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """log softmax(logits)[target] over the whole (unpadded) vocabulary, fp32 ``[s, b]``.

    logits_shard: ``[s, b, v/tp]`` (fp32 / bf16 / fp16), this rank's slice of the vocabulary.
    targets: ``[s, b]`` global token ids. A target outside ``[0, vocab_size)`` gives a finite but
    meaningless value and no one-hot gradient: mask such positions.
    """
    if targets.shape != logits_shard.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match logits {tuple(logits_shard.shape)}"
        )
    return _SampledTokenLogprobs.apply(
        logits_shard, targets, vocab_size, group, chunk_size, inplace_backward
    )


class _FullVocabReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, vocab_size, group, chunk_size, inplace_backward):
        if student.shape != teacher.shape:
            raise ValueError(
                f"student logits {tuple(student.shape)} and teacher logits "
                f"{tuple(teacher.shape)} differ in shape"
            )
        start, n_valid = _shard(student, vocab_size, group)
        xs, xt = _rows(student), _rows(teacher)
        n = xs.shape[0]
        chunk = max(1, min(chunk_size or default_chunk_size(xs.device), n))
        ms = torch.full((n,), float("-inf"), dtype=torch.float32, device=xs.device)
        mt = ms.clone()
        ss, st, w = (torch.zeros(n, dtype=torch.float32, device=xs.device) for _ in range(3))
        if n_valid > 0:
            es = torch.empty(chunk, n_valid, dtype=torch.float32, device=xs.device)
            et = torch.empty_like(es)
            for i in range(0, n, chunk):
                j = min(i + chunk, n)
                a, b = xs[i:j, :n_valid], xt[i:j, :n_valid]
                ea, eb = es[: j - i], et[: j - i]
                ms[i:j] = a.amax(dim=1).float()
                mt[i:j] = b.amax(dim=1).float()
                torch.sub(b, mt[i:j].unsqueeze(1), out=eb)
                eb.exp_()
                torch.sum(eb, dim=1, out=st[i:j])
                # sum_v exp(x_s - m_s) ((x_s - m_s) - (x_t - m_t)): the student-weighted logit
                # gap with each logit taken relative to its row's max first, which is exact near
                # the max, where the weight is; (x_s - x_t) - (m_s - m_t) would cancel two large
                # rounded numbers
                torch.sub(b, mt[i:j].unsqueeze(1), out=eb)
                torch.sub(a, ms[i:j].unsqueeze(1), out=ea)
                torch.sub(ea, eb, out=eb)
                ea.exp_()
                torch.sum(ea, dim=1, out=ss[i:j])
                eb.mul_(ea)
                torch.sum(eb, dim=1, out=w[i:j])
        # a rank without valid columns has m = -inf and sums 0: exp(m - gmax) = 0 keeps them 0
        gmax = _all_reduce(torch.stack([ms, mt]), dist.ReduceOp.MAX, group)
        scale_s, scale_t = torch.exp(ms - gmax[0]), torch.exp(mt - gmax[1])
        local_s = ss * scale_s
        # the gap relative to the global maxima: 0 on the rank that holds both
        shift_gap = (ms - gmax[0]) - (mt - gmax[1]) if n_valid > 0 else torch.zeros_like(ms)
        summed = _all_reduce(
            torch.stack([local_s, st * scale_t, (w + ss * shift_gap) * scale_s]),
            dist.ReduceOp.SUM,
            group,
        )
        # KL = E_S[log pi_S - log pi_T] = E_S[(x_s - gmax_s) - (x_t - gmax_t)] - log(sum_s / sum_t)
        log_ratio_sums = summed[0].log() - summed[1].log()
        kl = summed[2] / summed[0] - log_ratio_sums
        # log pi_S - log pi_T - KL = (x_s - gmax_s) - (x_t - gmax_t) - shift;
        # pi_S = local softmax x share
        shift = log_ratio_sums + kl
        ctx.save_for_backward(student, teacher, local_s / summed[0], gmax, shift)
        ctx.shard = (n_valid, chunk)
        ctx.inplace_backward = inplace_backward
        return kl.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, share, gmax, shift = ctx.saved_tensors
        n_valid, chunk = ctx.shard
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        inplace = ctx.inplace_backward and student.is_contiguous()
        xs, xt = _rows(student), _rows(teacher)
        grad = xs if inplace else torch.empty_like(xs)
        g = grad_output.reshape(-1).float()
        n = xs.shape[0]
        direct = xs.dtype == torch.float32 and n_valid == xs.shape[1]
        gmax_s, gmax_t = gmax[0].unsqueeze(1), gmax[1].unsqueeze(1)
        coef = (g * share).unsqueeze(1)
        offset = -(shift.unsqueeze(1) * coef)
        if n_valid > 0:
            gap = torch.empty(chunk, n_valid, dtype=torch.float32, device=xs.device)
            buf = None if direct else torch.empty_like(gap)
            for i in range(0, n, chunk):
                j = min(i + chunk, n)
                a, b = xs[i:j, :n_valid], xt[i:j, :n_valid]
                d = gap[: j - i]
                out = grad[i:j] if direct else buf[: j - i]
                # ((x_s - gmax_s) - (x_t - gmax_t) - shift) * g * share: as in the forward, each
                # logit relative to its max first (in fp32, whatever the input dtype); ``out``
                # may be ``a`` itself, which is then no longer needed: softmax(x_s - gmax_s) is
                # softmax(x_s)
                torch.sub(b, gmax_t[i:j], out=d)
                torch.sub(a, gmax_s[i:j], out=out)
                torch.sub(out, d, out=d)
                torch.addcmul(offset[i:j], d, coef[i:j], out=d)
                _softmax_rows(out, out)
                out.mul_(d)
                if not direct:
                    grad[i:j, :n_valid].copy_(out)
        if n_valid < xs.shape[1]:
            grad[:, n_valid:].zero_()
        return grad.view(student.shape), None, None, None, None, None


def full_vocab_reverse_kl(
    student_shard: torch.Tensor,
    teacher_shard: torch.Tensor,
    vocab_size: int,
    group: ProcessGroup = None,
    chunk_size: Optional[int] = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Per-position KL(pi_S || pi_T) over the whole vocabulary, fp32 ``[s, b]``.

    Both shards are ``[s, b, v/tp]``. The gradient flows into the student's logits only:
    d KL / d x_S(v) = pi_S(v) (log pi_S(v) - log pi_T(v) - KL); the teacher gets none.
    """
    return _FullVocabReverseKL.apply(
        student_shard, teacher_shard, vocab_size, group, chunk_size, inplace_backward
    )


def opd_token_terms(
    student_logits_shard: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    reward_cfg: RewardConfig,
    group: ProcessGroup,
    *,
    vocab_size: int,
    zscore_moments: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    positions: Optional[torch.Tensor] = None,
    seq_dim: int = 0,
    chunk_size: Optional[int] = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The student's sampled-token log-probs and the reward, from the student's logits shard.

    teacher_logprobs: ``[s, b]``, from :func:`sampled_token_logprobs` on the teacher's shard (no
    grad). Returns ``(reward, student_logprobs, stats)``: the reward ``[s, b]`` fp32, detached, zero
    outside ``loss_mask``; the student's log-probs ``[s, b]`` with grad; and the micro-batch's
    additive statistics (``rewards.reward_statistics``). ``positions`` (index within the response)
    default to the count of earlier valid tokens along ``seq_dim``. For ``zscore`` pass the step's
    ``zscore_moments``; for ``full_vocab_kl`` the reward is the log-ratio, for reporting.
    """
    mask = loss_mask.bool()
    student_lp = sampled_token_logprobs(
        student_logits_shard, targets, vocab_size, group, chunk_size, inplace_backward
    )
    lp_s = student_lp.detach()
    reward = compute_reward(reward_cfg, teacher_logprobs, lp_s, mask, zscore_moments)
    if positions is None:
        positions = response_positions(mask, dim=seq_dim)
    stats = reward_statistics(reward, log_ratio_reward(teacher_logprobs, lp_s), mask, positions)
    return reward, student_lp, stats
