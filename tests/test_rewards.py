"""Reward formulas: bounds, sign, limits, z-score moments, flag validation, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd import rewards
from megatron_opd.rewards import RewardConfig, compute_reward

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


@pytest.mark.parametrize("kind", ["power", "boxcox", "log_ratio", "clip", "tanh"])
@pytest.mark.parametrize("alpha", (0.1, 1.0, 5.0))
def test_sign_follows_log_ratio(kind, alpha):
    # |lp| <= 10 and alpha <= 5 keep pi^alpha >= e^-50 (no fp32 underflow to an exact 0)
    lp_t, lp_s = _logprobs(low=-10.0)
    cfg = RewardConfig(kind=kind, alpha=alpha)
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
