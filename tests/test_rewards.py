"""Reward formulas: bounds, sign, limits, z-score moments, flag validation, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.reward import rewards
from megatron_opd.reward.rewards import RewardConfig, compute_reward

ALPHAS = (0.1, 0.5, 1.0, 5.0, 50.0, 500.0)


def _logprobs(n: int = 4096, low: float = -30.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp_t = torch.rand(n, generator=g) * low
    lp_s = torch.rand(n, generator=g) * low
    lp_s[:64] = lp_t[:64]  # some ties
    return lp_t, lp_s


@pytest.mark.parametrize("alpha", ALPHAS)
def test_power_bounded_and_matches_formula(alpha):
    lp_t, lp_s = _logprobs()
    lp_t[0], lp_s[0] = 0.0, -1e4  # extremes: pi_T = 1, pi_S ~ 0
    r = rewards.power_reward(lp_t, lp_s, alpha)
    assert r.dtype == torch.float32
    assert torch.isfinite(r).all()
    assert (r >= -1).all() and (r <= 1).all()
    direct = torch.exp(alpha * lp_t.double()) - torch.exp(alpha * lp_s.double())
    torch.testing.assert_close(r.double(), direct, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["power", "boxcox", "log_ratio", "clip", "tanh", "tropd", "sign"])
@pytest.mark.parametrize("alpha", (0.1, 1.0, 5.0))
def test_sign_follows_log_ratio(kind, alpha):
    # |lp| <= 10 and alpha <= 5 keep pi^alpha >= e^-50 (no fp32 underflow to an exact 0)
    lp_t, lp_s = _logprobs(low=-10.0)
    cfg = RewardConfig(kind=kind, alpha=alpha, tropd_alpha=min(alpha, 1.0))
    r = compute_reward(cfg, lp_t, lp_s, torch.ones_like(lp_t, dtype=torch.bool))
    assert torch.equal(torch.sign(r), torch.sign(lp_t - lp_s))
    assert (r[:64] == 0).all()


def test_boxcox_meets_log_ratio_for_small_alpha():
    # the O(alpha) term is alpha * (lp_t^2 - lp_s^2) / 2 <= 1e-6 * 100 / 2 for |lp| <= 10
    lp_t, lp_s = _logprobs(low=-10.0)
    r = rewards.boxcox_reward(lp_t, lp_s, 1e-6)
    assert (r - (lp_t - lp_s)).abs().max() < 1e-4
    assert torch.equal(
        rewards.boxcox_reward(lp_t, lp_s, 2.0) * 2.0, rewards.power_reward(lp_t, lp_s, 2.0)
    )


def test_large_alpha_does_not_overflow():
    lp_t = torch.tensor([-0.1, -10.0, -1e4, 0.0])
    lp_s = torch.tensor([-10.0, -0.1, 0.0, -1e4])
    for alpha in (500.0, 1e4):
        r = rewards.boxcox_reward(lp_t, lp_s, alpha)
        assert torch.isfinite(r).all()
        assert torch.equal(torch.sign(r[2:]), torch.tensor([-1.0, 1.0]))


def test_clip_and_tanh():
    r = torch.tensor([-50.0, -0.5, 0.0, 0.5, 50.0])
    assert torch.equal(rewards.clip_reward(r, -1, 1), torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    torch.testing.assert_close(rewards.tanh_reward(r, 5.0), torch.tanh(r / 5.0))
    cfg = RewardConfig(kind="clip", clip_min=-2.0, clip_max=0.25)
    got = compute_reward(cfg, r, torch.zeros_like(r), torch.ones(5, dtype=torch.bool))
    assert torch.equal(got, torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.25]))


def test_zscore_mean_zero_std_one_over_mask():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(8, 64, generator=g) * 7 + 3
    mask = torch.rand(8, 64, generator=g) > 0.3
    r[~mask] = 1e6  # must not leak into the moments
    z = rewards.zscore_reward(r, mask)
    zm = z[mask].double()
    assert abs(zm.mean().item()) < 1e-5
    assert abs(zm.std(unbiased=False).item() - 1.0) < 1e-5


def test_zscore_uses_step_moments_when_given():
    r = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.ones(3, dtype=torch.bool)
    z = rewards.zscore_reward(r, mask, torch.tensor(2.0), torch.tensor(0.5))
    assert torch.equal(z, torch.tensor([-2.0, 0.0, 2.0]))
    cfg = RewardConfig(kind="zscore")
    got = compute_reward(
        cfg, r, torch.zeros(3), mask, zscore_moments=(torch.tensor(2.0), torch.tensor(0.5))
    )
    assert torch.equal(got, z)


def test_reward_is_zero_and_finite_outside_mask():
    lp_t = torch.tensor([-1.0, float("-inf"), float("nan")])
    lp_s = torch.tensor([-2.0, -1.0, -1.0])
    mask = torch.tensor([True, False, False])
    for kind in rewards.REWARD_KINDS:
        r = compute_reward(RewardConfig(kind=kind), lp_t, lp_s, mask)
        assert r[1:].eq(0).all() and torch.isfinite(r).all(), kind


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(alpha=-1.0), "--opd-alpha must be > 0, got -1"),
        (dict(alpha=0.0), "--opd-alpha must be > 0, got 0"),
        (dict(alpha=float("nan")), "--opd-alpha must be > 0"),
        (dict(clip_min=1.0, clip_max=1.0), r"--opd-clip-min \(1\) must be < --opd-clip-max \(1\)"),
        (dict(clip_min=2.0, clip_max=-2.0), "--opd-clip-min"),
        (dict(tanh_temperature=0.0), "--opd-tanh-temperature must be > 0, got 0"),
        (dict(tropd_alpha=0.0), r"--opd-tropd-alpha must be in \(0, 1\], got 0"),
        (dict(tropd_alpha=float("nan")), "--opd-tropd-alpha must be in"),
        (dict(kind="ppo"), "--opd-reward must be one of power, boxcox, .*got 'ppo'"),
    ],
)
def test_invalid_flags_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**fields).validate()


def test_valid_defaults():
    RewardConfig().validate()
    for kind in rewards.REWARD_KINDS:
        RewardConfig(kind=kind).validate()


# ---------------------------------------------------------------------------------------------
# Statistics


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, s = 6, 300
    lp_t = -torch.rand(b, s, generator=g) * 12
    lp_s = -torch.rand(b, s, generator=g) * 12
    lengths = torch.randint(1, s, (b,), generator=g)
    mask = torch.arange(s).view(1, -1) < lengths.view(-1, 1)
    return lp_t, lp_s, mask


def test_statistics_match_direct_computation():
    lp_t, lp_s, mask = _batch()
    r = compute_reward(RewardConfig(kind="log_ratio"), lp_t, lp_s, mask)
    pos = rewards.response_positions(mask, dim=1)
    stats = rewards.reward_statistics(r, lp_t - lp_s, mask, pos)
    out = rewards.summarize_statistics(stats)
    valid = r[mask].double()
    assert out["num_tokens"] == mask.sum().item()
    assert out["reward_mean"] == pytest.approx(valid.mean().item(), rel=1e-9)
    assert out["reward_std"] == pytest.approx(valid.std(unbiased=False).item(), rel=1e-9)
    assert out["reward_min"] == valid.min().item() and out["reward_max"] == valid.max().item()
    assert out["reward_frac_abs_gt_0_01"] == pytest.approx((valid.abs() > 0.01).double().mean())
    assert out["log_ratio_mean"] == pytest.approx((lp_t - lp_s)[mask].double().mean().item())
    ordered = valid.sort().values
    for q in rewards.PERCENTILES:
        exact = ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1].item()
        # a histogram bin spans a factor 10^(1/32): the centre is within 3.7% of any member
        assert out[f"reward_p{q}"] == pytest.approx(exact, rel=0.037, abs=1e-6), q
    positions = pos[mask]
    bucket_names = ["0_15", "16_63", "64_255", "256_plus"]
    for (lo, hi), name in zip(rewards.POSITION_BUCKETS, bucket_names, strict=True):
        sel = (positions >= lo) & (positions < (hi or 10**9))
        assert out[f"abs_reward_pos_{name}"] == pytest.approx(valid[sel].abs().mean().item())


def test_statistics_merge_equals_whole_batch():
    lp_t, lp_s, mask = _batch(1)
    r = compute_reward(RewardConfig(kind="power", alpha=0.5), lp_t, lp_s, mask)
    pos = rewards.response_positions(mask, dim=1)
    whole = rewards.reward_statistics(r, lp_t - lp_s, mask, pos)
    parts = [
        rewards.reward_statistics(
            r[i : i + 2], (lp_t - lp_s)[i : i + 2], mask[i : i + 2], pos[i : i + 2]
        )
        for i in range(0, 6, 2)
    ]
    merged = rewards.merge_statistics(parts)
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key], rtol=1e-12, atol=1e-12)


def test_statistics_of_empty_mask():
    z = torch.zeros(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    stats = rewards.reward_statistics(z, z, mask, rewards.response_positions(mask))
    out = rewards.summarize_statistics(stats)
    assert out["num_tokens"] == 0 and math.isnan(out["reward_mean"])


# ---------------------------------------------------------------------------------------------
# TROPD and the sign-only reward (issue 22)

TROPD_ALPHAS = (0.01, 0.2, 0.5, 0.9, 0.999, 1.0)


def _tropd_float64(lp_t: torch.Tensor, lp_s: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha * pi_T / pi_S + 1 - alpha), literally, in float64 (mpmath-free: the arguments
    here keep exp(lp_t - lp_s) inside float64's range)."""
    ratio = torch.exp(lp_t.double() - lp_s.double())
    return torch.log(alpha * ratio + (1 - alpha))


@pytest.mark.parametrize("alpha", TROPD_ALPHAS)
def test_tropd_matches_float64_formula_and_floor(alpha):
    lp_t, lp_s = _logprobs()  # |lp_t - lp_s| up to 30, ties in the first 64
    # near-ties, where the reward is tiny and must keep its relative precision
    lp_s[64:128] = lp_t[64:128] + torch.linspace(-1e-3, 1e-3, 64)
    r = rewards.tropd_reward(lp_t, lp_s, alpha)
    assert r.dtype == torch.float32 and torch.isfinite(r).all()
    ref = _tropd_float64(lp_t, lp_s, alpha)
    # the inputs are fp32: the reference sees the same d = lp_t - lp_s that fp32 forms
    d = lp_t - lp_s
    ref_same_d = torch.log(alpha * torch.exp(d.double()) + (1 - alpha))
    torch.testing.assert_close(r.double(), ref_same_d, rtol=2e-6, atol=1e-7)
    assert (r[:64] == 0).all()
    assert torch.equal(torch.sign(r), torch.sign(d))
    if alpha < 1:
        assert (r.double() >= math.log1p(-alpha) - 1e-6).all()
        assert (r.double() - ref).abs().max() < 1e-4  # fp32 rounding of d itself
    else:
        assert torch.equal(r, d)


def test_tropd_extremes_and_limits():
    lp_t = torch.tensor([0.0, -1e4, -200.0, 0.0])
    lp_s = torch.tensor([-1e4, 0.0, 0.0, -200.0])
    r = rewards.tropd_reward(lp_t, lp_s, 0.2)
    assert torch.isfinite(r).all()
    # a token the teacher rejects costs log(0.8); one it wants gains about log(0.2) + d
    torch.testing.assert_close(
        r[1:3].double(), torch.full((2,), math.log(0.8), dtype=torch.float64)
    )
    assert r[0].item() == pytest.approx(math.log(0.2) + 1e4, rel=1e-6)
    assert r[3].item() == pytest.approx(math.log(0.2) + 200.0, rel=1e-6)
    # alpha -> 0: the reward vanishes like alpha * (pi_T/pi_S - 1)
    lp_t, lp_s = torch.tensor([-1.0]), torch.tensor([-2.0])
    small = rewards.tropd_reward(lp_t, lp_s, 1e-6).item()
    assert small == pytest.approx(1e-6 * (math.e - 1), rel=1e-5)
    with pytest.raises(ValueError, match=r"--opd-tropd-alpha must be in \(0, 1\], got 1.5"):
        rewards.tropd_reward(lp_t, lp_s, 1.5)


def test_sign_reward_is_the_sign_of_the_log_ratio():
    lp_t, lp_s = _logprobs()
    r = rewards.sign_reward(lp_t, lp_s)
    assert r.dtype == torch.float32
    assert torch.equal(r.double(), torch.sign(lp_t.double() - lp_s.double()))
    assert set(r.unique().tolist()) == {-1.0, 0.0, 1.0}


def test_sign_reward_descends_total_variation_in_expectation():
    """sum_v pi_S(v) sign(pi_T - pi_S)(v) grad_z log pi_S(v) = -2 grad_z TV(pi_S, pi_T), in
    float64."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    lt = torch.log_softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    ls = torch.log_softmax(z, 0)
    tv = 0.5 * (ls.exp() - lt.exp()).abs().sum()
    (grad_tv,) = torch.autograd.grad(tv, z, retain_graph=True)
    r = rewards.sign_reward(lt, ls.detach()).double()
    surrogate = (ls.exp().detach() * r * ls).sum()  # E_{v ~ pi_S}[r(v) log pi_S(v)]
    (grad_surrogate,) = torch.autograd.grad(surrogate, z)
    torch.testing.assert_close(grad_surrogate, -2 * grad_tv)


def test_power_reward_descends_the_power_bregman_divergence_in_expectation():
    """sum_v pi_S(v) (pi_T^a - pi_S^a)(v) grad_z log pi_S(v) = -grad_z D_a / (1 + a) with
    D_a = sum_v pi_S^(1+a) - (1+a) pi_T^a pi_S + a pi_T^(1+a) (float64; reward held constant)."""
    g = torch.Generator().manual_seed(6)
    lt = torch.log_softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    for alpha in (0.5, 1.0, 5.0):
        z = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
        ls = torch.log_softmax(z, 0)
        ps, pt = ls.exp(), lt.exp()
        d = (ps ** (1 + alpha) - (1 + alpha) * pt**alpha * ps + alpha * pt ** (1 + alpha)).sum()
        (grad_d,) = torch.autograd.grad(d, z, retain_graph=True)
        r = (pt**alpha - ps**alpha).detach()
        (grad_surrogate,) = torch.autograd.grad((ps.detach() * r * ls).sum(), z)
        torch.testing.assert_close(grad_surrogate, -grad_d / (1 + alpha))


SIGN_KINDS = list(rewards.REWARD_KINDS)


@pytest.mark.parametrize("kind", SIGN_KINDS)
@pytest.mark.parametrize("teacher_prefers", [True, False])
def test_sign_convention_every_kind(kind, teacher_prefers):
    """A sampled token the teacher likes more than the student gets a positive reward, and one
    step down the real loss (opd_loss_func, float64 reference gradient) raises its probability;
    the opposite token gets a negative reward and loses probability. (A third-party PowerOPD port
    had the sign flipped: its loss would fail this test.)"""
    from megatron_opd.reward.loss import opd_loss_func

    vocab, target = 8, 3
    g = torch.Generator().manual_seed(11)
    student = torch.randn(1, 1, vocab, generator=g)
    # the teacher: the student's distribution with the target's logit moved by +-1.5, so that
    # for the full-vocab KL too only the target's odds against the rest change
    teacher = student.clone()
    teacher[..., target] += 1.5 if teacher_prefers else -1.5
    targets = torch.tensor([[target]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    lp_t = torch.log_softmax(teacher, -1)[..., target]
    lp_s = torch.log_softmax(student, -1)[..., target]
    cfg = RewardConfig(kind=kind, alpha=1.0)
    # z-score centres on the step's mean log-ratio: centre it on 0 with unit spread, as a step
    # with other tokens would; the sign it then gives is this token's
    moments = (torch.tensor(0.0), torch.tensor(1.0)) if kind == "zscore" else None
    r = compute_reward(cfg, lp_t, lp_s, mask, moments)
    assert (r > 0).item() == teacher_prefers and r.item() != 0, (kind, r)

    loss_func = opd_loss_func(
        targets=targets,
        loss_mask=mask,
        reward_cfg=cfg,
        vocab_size=vocab,
        tp_group=None,
        teacher_logprobs=lp_t,
        teacher_logits=teacher,
        zscore_moments=moments,
        inplace_backward=False,
    )
    logits = student.clone().requires_grad_()
    loss_sum, num_tokens, stats = loss_func(logits)
    loss_sum.backward()
    # float64 reference gradient of the loss sum
    z = student.double().requires_grad_()
    ls = torch.log_softmax(z, -1)
    if kind == "full_vocab_kl":
        lt = torch.log_softmax(teacher.double(), -1)
        ref_loss = (ls.exp() * (ls - lt)).sum()
    else:
        ref_loss = -(r.double() * ls[..., target]).sum()
    ref_loss.backward()
    torch.testing.assert_close(logits.grad.double(), z.grad, rtol=1e-5, atol=1e-7)
    stepped = student - 0.1 * logits.grad
    after = torch.log_softmax(stepped, -1)[..., target]
    assert (after > lp_s).item() == teacher_prefers, (kind, after, lp_s)
    # its statistics are logged like every other kind's
    from megatron_opd.reward.loss import reduce_reports

    report = reduce_reports([stats])
    assert report["num_tokens"] == 1
    assert report["reward_mean"] == pytest.approx(r.item(), rel=1e-6)
    assert report["log_ratio_mean"] == pytest.approx((lp_t - lp_s).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["tropd", "sign"])
def test_new_kinds_statistics_match_float64(kind):
    lp_t, lp_s, mask = _batch(2)
    cfg = RewardConfig(kind=kind, tropd_alpha=0.3)
    r = compute_reward(cfg, lp_t, lp_s, mask)
    d = (lp_t - lp_s).double()
    ref = torch.log(0.3 * d.exp() + 0.7) if kind == "tropd" else torch.sign(d)
    torch.testing.assert_close(r[mask].double(), ref[mask], rtol=1e-5, atol=1e-6)
    assert (r[~mask] == 0).all()
    stats = rewards.reward_statistics(r, lp_t - lp_s, mask, rewards.response_positions(mask))
    out = rewards.summarize_statistics(stats)
    assert out["reward_mean"] == pytest.approx(ref[mask].mean().item(), rel=1e-5)
    assert out["reward_std"] == pytest.approx(ref[mask].std(unbiased=False).item(), rel=1e-4)


def test_reward_kinds_are_declared_in_one_registry():
    """Each kind declares what the step must give it and what it descends; no module outside
    rewards.py compares reward-kind strings (a new kind is one registry entry)."""
    import re
    from pathlib import Path

    from megatron_opd.reward.rewards import REWARD_KINDS, REWARDS, RewardConfig

    assert REWARD_KINDS == tuple(REWARDS)
    needs_logits = {k for k, v in REWARDS.items() if v.needs_teacher_logits}
    needs_moments = {k for k, v in REWARDS.items() if v.needs_step_moments}
    assert (needs_logits, needs_moments) == ({"full_vocab_kl"}, {"zscore"})
    assert REWARDS["sign"].divergence == "tv" and REWARDS["power"].divergence == "power"
    assert REWARDS["log_ratio"].divergence == REWARDS["full_vocab_kl"].divergence == "kl"
    assert RewardConfig(kind="zscore").needs_step_moments
    kinds = "|".join(REWARD_KINDS)
    compared = re.compile(rf'(==|!=)\s*"({kinds})"|"({kinds})"\s*(==|!=)')
    package = Path(__file__).resolve().parents[1] / "megatron_opd"
    offenders = [
        f"{path.relative_to(package)}:{n}"
        for path in package.rglob("*.py")
        if path.name != "rewards.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if compared.search(line)
    ]
    assert offenders == []
