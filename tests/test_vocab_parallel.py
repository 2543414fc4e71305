"""The vocab-parallel ops against an unsharded float64 reference (plain log_softmax), forward and
gradients, at world size 1 in-process and at 2 and 4 gloo ranks, with a padded vocabulary.

Tolerances. fp32: 1e-5 absolute and relative. bf16 / fp16: the logits are exactly representable in
fp32 and the reference is computed from the same rounded values, and the op accumulates in fp32,
so the forward outputs (fp32) keep the fp32 tolerance. The gradient is returned in the input dtype:
each element is one rounding of an fp32 value, so it is within half an ulp, 2^-9 (bf16) / 2^-12
(fp16) relative; we allow one ulp (2^-8 / 2^-11) plus an absolute floor for fp16 subnormals (2^-24).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_opd.models.gpt import padded_vocab_size
from megatron_opd.reward.rewards import RewardConfig, compute_reward, power_reward
from megatron_opd.reward.vocab_parallel import (
    full_vocab_reverse_kl,
    opd_token_terms,
    sampled_token_logprobs,
)
from megatron_opd.runtime.spawn import run_distributed

VOCAB = 250  # Megatron pads it to 256 at TP1/TP2 and to 512 at TP4 (two ranks hold only padding)
SEQ, BATCH = 7, 3  # 21 tokens: chunk sizes 4 and 5 leave a ragged last chunk
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
GRAD_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-30, torch.float16: 2.0**-24}


def _inputs(padded: int, seed: int = 0):
    """Full logits [s, b, padded] in fp32 (huge values in the padded columns: they must be
    ignored), a second set for the teacher, targets and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(SEQ, BATCH, padded, generator=g) * 4
    teacher = torch.randn(SEQ, BATCH, padded, generator=g) * 4
    student[..., VOCAB:] = 80.0
    teacher[..., VOCAB:] = -80.0
    targets = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    targets[0, 0], targets[1, 0] = 0, VOCAB - 1  # first and last real column
    upstream = torch.randn(SEQ, BATCH, generator=g, dtype=torch.float64)
    return student, teacher, targets, upstream


def _reference_logprobs(student: torch.Tensor, targets: torch.Tensor, upstream: torch.Tensor):
    """log_softmax over the true vocabulary in float64: (log-probs, d sum(upstream*lp)/d logits)."""
    x = student[..., :VOCAB].double().requires_grad_()
    lp = torch.log_softmax(x, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (lp * upstream).sum().backward()
    grad = torch.zeros(student.shape, dtype=torch.float64)
    grad[..., :VOCAB] = x.grad
    return lp.detach(), grad


def _reference_kl(student: torch.Tensor, teacher: torch.Tensor, upstream: torch.Tensor):
    x = student[..., :VOCAB].double().requires_grad_()
    log_s = torch.log_softmax(x, dim=-1)
    log_t = torch.log_softmax(teacher[..., :VOCAB].double(), dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    (kl * upstream).sum().backward()
    grad = torch.zeros(student.shape, dtype=torch.float64)
    grad[..., :VOCAB] = x.grad
    return kl.detach(), grad


def _check_grad(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == dtype, what
    torch.testing.assert_close(
        got.double(), ref, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], msg=what
    )


def _check_ops(rank: int, world: int, group, dtypes, chunk_sizes=(4, 5, 64), seed: int = 0):
    """Run every op on this rank's shard and compare with the float64 reference."""
    padded = padded_vocab_size(VOCAB, 128, world)
    vp = padded // world
    cols = slice(rank * vp, (rank + 1) * vp)
    student, teacher, targets, upstream = _inputs(padded, seed)
    for dtype in dtypes:
        s_full, t_full = student.to(dtype), teacher.to(dtype)
        ref_lp, ref_grad = _reference_logprobs(s_full, targets, upstream)
        ref_kl, ref_kl_grad = _reference_kl(s_full, t_full, upstream)
        for chunk in chunk_sizes:
            for inplace in (False, True):
                what = f"{dtype} chunk={chunk} inplace={inplace} rank={rank}/{world}"
                leaf = s_full[..., cols].clone().requires_grad_()
                x = leaf * 1  # a non-leaf, like a model's output
                lp = sampled_token_logprobs(x, targets, VOCAB, group, chunk, inplace)
                assert lp.dtype == torch.float32 and lp.shape == (SEQ, BATCH)
                torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5, msg=what)
                (lp * upstream.float()).sum().backward()
                _check_grad(leaf.grad, ref_grad[..., cols], dtype, "logprob grad " + what)

                leaf = s_full[..., cols].clone().requires_grad_()
                teacher_shard = t_full[..., cols].clone().requires_grad_()
                kl = full_vocab_reverse_kl(
                    leaf * 1, teacher_shard, VOCAB, group, chunk, inplace_backward=inplace
                )
                torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-5, msg=what)
                (kl * upstream.float()).sum().backward()
                _check_grad(leaf.grad, ref_kl_grad[..., cols], dtype, "kl grad " + what)
                assert teacher_shard.grad is None, "the teacher must get no gradient"


# ---------------------------------------------------------------------------------------------
# World size 1, in-process (group=None: unsharded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ops_match_reference_unsharded(dtype):
    _check_ops(0, 1, None, [dtype])


def test_large_logits_are_stable():
    student, teacher, targets, upstream = _inputs(256, seed=1)
    student, teacher = (
        student * 200,
        teacher * 200,
    )  # logit gaps of thousands: exp overflows naively
    student[..., VOCAB:] = 0.0
    ref_lp, _ = _reference_logprobs(student, targets, upstream)
    lp = sampled_token_logprobs(student, targets, VOCAB)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-3)
    kl = full_vocab_reverse_kl(student, teacher, VOCAB)
    assert torch.isfinite(kl).all() and (kl >= -1e-3).all()


def test_real_vocabulary_accuracy():
    """At Qwen3's 151,936 entries: the forward keeps the fp32 tolerance (fp32 terms, cascade sums),
    and the gradients, which use ATen's fused softmax kernel, are no less accurate than PyTorch's
    own fp32 autograd through log_softmax."""
    v = 151_936
    g = torch.Generator().manual_seed(5)
    student = torch.randn(6, 1, v, generator=g) * 4
    teacher = torch.randn(6, 1, v, generator=g) * 4
    targets = torch.randint(0, v, (6, 1), generator=g)
    upstream = torch.randn(6, 1, generator=g, dtype=torch.float64)

    def autograd(x, dtype):
        x = x.detach().to(dtype).requires_grad_()
        log_s = torch.log_softmax(x, dim=-1)
        lp = log_s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        kl = (log_s.exp() * (log_s - torch.log_softmax(teacher.to(dtype), dim=-1))).sum(-1)
        (grad_lp,) = torch.autograd.grad((lp * upstream.to(dtype)).sum(), x, retain_graph=True)
        (grad_kl,) = torch.autograd.grad((kl * upstream.to(dtype)).sum(), x)
        return lp.detach().double(), kl.detach().double(), grad_lp.double(), grad_kl.double()

    ref_lp, ref_kl, ref_grad_lp, ref_grad_kl = autograd(student, torch.float64)
    _, _, fp32_grad_lp, fp32_grad_kl = autograd(student, torch.float32)
    x = student.clone().requires_grad_()
    lp = sampled_token_logprobs(x, targets, v)
    (lp * upstream.float()).sum().backward()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    err = (x.grad.double() - ref_grad_lp).abs().max()
    assert err <= 1.5 * (fp32_grad_lp - ref_grad_lp).abs().max() + 1e-7
    x = student.clone().requires_grad_()
    kl = full_vocab_reverse_kl(x, teacher, v)
    (kl * upstream.float()).sum().backward()
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
    err = (x.grad.double() - ref_grad_kl).abs().max()
    assert err <= 1.5 * (fp32_grad_kl - ref_grad_kl).abs().max() + 1e-7


class _LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_is_one_chunk_not_one_shard(dtype):
    """With the in-place backward no op allocates more than chunk x vocab elements: no fp32 copy
    of the shard, no saved softmax, no separately allocated gradient."""
    tokens, chunk = 64, 4
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, 1, 256, generator=g)).to(dtype).requires_grad_()
    teacher = torch.randn(tokens, 1, 256, generator=g).to(dtype)
    targets = torch.randint(0, VOCAB, (tokens, 1), generator=g)
    for op in ("logprobs", "kl"):
        x = logits.detach().clone().requires_grad_()
        mode = _LargestAllocation()
        mode.inputs = {x.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
        with mode:
            if op == "logprobs":
                out = sampled_token_logprobs(x, targets, VOCAB, None, chunk, True)
            else:
                out = full_vocab_reverse_kl(x, teacher, VOCAB, None, chunk, True)
            out.sum().backward()
        assert x.grad is not None
        assert 0 < mode.largest <= chunk * 256, (op, mode.largest)


def test_opd_token_terms():
    student, teacher, targets, _ = _inputs(256, seed=2)
    mask = torch.ones(SEQ, BATCH, dtype=torch.bool)
    mask[-2:, 1] = False
    ref_s, _ = _reference_logprobs(student, targets, torch.zeros(SEQ, BATCH, dtype=torch.float64))
    ref_t, _ = _reference_logprobs(teacher, targets, torch.zeros(SEQ, BATCH, dtype=torch.float64))
    teacher_lp = sampled_token_logprobs(teacher, targets, VOCAB)
    cfg = RewardConfig(kind="power", alpha=0.5)
    x = student.clone().requires_grad_()
    reward, student_lp, stats = opd_token_terms(
        x, teacher_lp, targets, mask, cfg, None, vocab_size=VOCAB
    )
    assert not reward.requires_grad and student_lp.requires_grad
    expected = compute_reward(cfg, ref_t.float(), ref_s.float(), mask)
    torch.testing.assert_close(reward, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student_lp.double(), ref_s, rtol=1e-5, atol=1e-5)
    assert stats["num_tokens"].item() == mask.sum().item()
    assert stats["reward_sum"].item() == pytest.approx(
        expected[mask].double().sum().item(), rel=1e-5
    )
    # positions count along seq (dim 0 in Megatron's [s, b] layout): column 1 has 5 valid tokens
    assert stats["tokens_by_position"][0].item() == mask.sum().item()


def test_shape_errors():
    x = torch.zeros(4, 2, 100)
    with pytest.raises(ValueError, match="fewer than vocab_size 250"):
        sampled_token_logprobs(x, torch.zeros(4, 2, dtype=torch.long), VOCAB)
    with pytest.raises(ValueError, match="do not match"):
        sampled_token_logprobs(torch.zeros(4, 2, 256), torch.zeros(2, 4, dtype=torch.long), VOCAB)


# ---------------------------------------------------------------------------------------------
# 2 and 4 gloo ranks: the shard of each rank, all-reduces over an explicitly passed group


def _sharded_rank(dtypes):
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        _check_ops(rank, world, dist.group.WORLD, dtypes, chunk_sizes=(5,))
        if world == 4:
            # two TP groups of two, each with its own data: the op must reduce over its group only
            groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            _check_ops(rank % 2, 2, groups[rank // 2], [torch.float32], (4,), seed=10 + rank // 2)
        dist.barrier()
        return rank
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ops_match_reference_sharded(world):
    dtypes = [torch.float32, torch.bfloat16] if world == 2 else [torch.float32]
    assert run_distributed(_sharded_rank, world, dtypes, timeout=240) == list(range(world))


# ---------------------------------------------------------------------------------------------
# Precision at large logits (issue 11): logits of magnitude 30-100, where a confident token's
# log-prob (~ -1e-5) is far below the rounding of the logits themselves (ulp(64) = 7.6e-6). The
# yardstick is the fp32 formulation a user would write, torch.log_softmax then gather; the ops
# must be no worse than 2x its error against float64, in the log-probs, the power reward at
# alpha = 5 and 500, the full-vocab KL and the gradients.

LARGE_ROWS = 32  # [s, b] = [8, 4]; the first half of the rows confident, the second not


def _large_logit_inputs(padded: int, seed: int):
    """(student, teacher, targets, upstream): fp32 logits ``[8, 4, padded]`` of magnitude
    30-100 (either sign). Confident rows: one top logit, shared by student and teacher and used as
    the target, 8-20 nats above the rest (log p from about -1e-7 to -1e-2). Unconfident rows:
    logits spread by 3 nats around the magnitude, a random target."""
    g = torch.Generator().manual_seed(seed)
    n, half = LARGE_ROWS, LARGE_ROWS // 2
    targets = torch.randint(0, VOCAB, (n,), generator=g)

    def logits():
        level = (30 + 70 * torch.rand(n, 1, generator=g)) * torch.where(
            torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0
        )
        x = torch.empty(n, padded)
        margin = 8 + 12 * torch.rand(half, 1, generator=g)
        x[:half] = level[:half] - margin - 2 * torch.rand(half, padded, generator=g)
        x[:half].scatter_(1, targets[:half, None], level[:half])
        x[half:] = level[half:] + 3 * torch.randn(half, padded, generator=g)
        x[:, VOCAB:] = 100.0  # padding: must be ignored
        return x.view(8, 4, padded)

    student, teacher = logits(), logits()
    upstream = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return student, teacher, targets.view(8, 4), upstream


def _errors_against_float64(lp, kl, grad_lp, grad_kl, ref):
    """Max absolute errors per quantity, confident and unconfident rows apart."""
    conf = torch.arange(LARGE_ROWS).view(8, 4) < LARGE_ROWS // 2
    lp_s, lp_t = lp
    out = {}
    for rows, name in ((conf, "confident"), (~conf, "unconfident")):
        out[f"logprob {name}"] = max(
            (lp_s.double() - ref["lp_s"])[rows].abs().max().item(),
            (lp_t.double() - ref["lp_t"])[rows].abs().max().item(),
        )
        for alpha in (5.0, 500.0):
            r = power_reward(lp_t, lp_s, alpha).double()
            out[f"power a={alpha:g} {name}"] = (r - ref[alpha])[rows].abs().max().item()
        out[f"kl {name}"] = (kl.double() - ref["kl"])[rows].abs().max().item()
        out[f"logprob grad {name}"] = (grad_lp.double() - ref["grad_lp"])[rows].abs().max().item()
        out[f"kl grad {name}"] = (grad_kl.double() - ref["grad_kl"])[rows].abs().max().item()
    return out


def _log_softmax_terms(student, teacher, targets, upstream, dtype):
    """log_softmax then gather, the KL from two log_softmax, and their gradients, in ``dtype``,
    over the true vocabulary: the float64 reference, or the fp32 yardstick."""
    x = student[..., :VOCAB].to(dtype).requires_grad_()
    log_s = torch.log_softmax(x, dim=-1)
    log_t = torch.log_softmax(teacher[..., :VOCAB].to(dtype), dim=-1)
    lp_s = log_s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp_t = log_t.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    (grad_lp,) = torch.autograd.grad((lp_s * upstream.to(dtype)).sum(), x, retain_graph=True)
    (grad_kl,) = torch.autograd.grad((kl * upstream.to(dtype)).sum(), x)
    return (lp_s.detach(), lp_t.detach()), kl.detach(), grad_lp, grad_kl


def _check_large_logits(rank: int, world: int, group, seed: int = 3) -> dict:
    """The ops on this rank's shard and the fp32 yardstick, both against float64; returns
    {quantity: (op error, yardstick error)}."""
    padded = padded_vocab_size(VOCAB, 128, world)
    vp = padded // world
    cols = slice(rank * vp, (rank + 1) * vp)
    student, teacher, targets, upstream = _large_logit_inputs(padded, seed)
    lp64, kl64, grad_lp64, grad_kl64 = _log_softmax_terms(
        student, teacher, targets, upstream, torch.float64
    )
    ref = {"lp_s": lp64[0], "lp_t": lp64[1], "kl": kl64, "grad_lp": grad_lp64}
    ref["grad_kl"] = grad_kl64
    for alpha in (5.0, 500.0):
        ref[alpha] = torch.exp(alpha * lp64[1]) - torch.exp(alpha * lp64[0])
    fp32 = _errors_against_float64(
        *_log_softmax_terms(student, teacher, targets, upstream, torch.float32), ref
    )

    x = student[..., cols].clone().requires_grad_()
    lp_s = sampled_token_logprobs(x, targets, VOCAB, group, chunk_size=5)
    (lp_s * upstream.float()).sum().backward()
    lp_t = sampled_token_logprobs(teacher[..., cols], targets, VOCAB, group, chunk_size=5)
    y = student[..., cols].clone().requires_grad_()
    kl = full_vocab_reverse_kl(y, teacher[..., cols], VOCAB, group, chunk_size=5)
    (kl * upstream.float()).sum().backward()
    # gradients: this rank's columns of the true vocabulary
    own = slice(rank * vp, min((rank + 1) * vp, VOCAB))
    n_own = own.stop - own.start
    ops = _errors_against_float64(
        (lp_s.detach(), lp_t),
        kl.detach(),
        x.grad[..., :n_own],
        y.grad[..., :n_own],
        dict(ref, grad_lp=ref["grad_lp"][..., own], grad_kl=ref["grad_kl"][..., own]),
    )
    return {k: (ops[k], fp32[k]) for k in ops}


def _assert_no_worse_than_fp32_log_softmax(errors: dict) -> None:
    worse = {k: v for k, v in errors.items() if not v[0] <= 2 * v[1]}
    assert not worse, "op error above 2x the fp32 log_softmax error: " + ", ".join(
        f"{k}: {op:.3g} vs {ref:.3g}" for k, (op, ref) in worse.items()
    )


def test_large_logit_precision_unsharded():
    errors = _check_large_logits(0, 1, None)
    _assert_no_worse_than_fp32_log_softmax(errors)


def _large_logit_rank():
    dist.init_process_group("gloo")
    try:
        return _check_large_logits(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_large_logit_precision_sharded():
    for errors in run_distributed(_large_logit_rank, 2, timeout=120):
        _assert_no_worse_than_fp32_log_softmax(errors)


def test_the_chunk_follows_the_device():
    """16 tokens a chunk on CPU (cache-sized scratch), 1024 on CUDA (16 was launch-bound there:
    116.6 ms against 24.2 ms for 8,192 x 151,936 forward + backward on an H200); ``None`` picks
    the device's, and the result does not depend on the chunk."""
    from megatron_opd.reward.vocab_parallel import default_chunk_size, sampled_token_logprobs

    assert default_chunk_size(torch.device("cpu")) == 16
    assert default_chunk_size(torch.device("cuda", 0)) == 1024
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, 50, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (40, 3), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    for chunk in (None, 16, 1024):
        got = sampled_token_logprobs(logits, targets, 50, None, chunk)
        torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)
