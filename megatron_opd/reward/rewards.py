"""Per-token OPD rewards as pure tensor formulas, and their step statistics.

Every function takes the sampled token's log-probability under the teacher (``lp_t``) and the
student (``lp_s``), tensors of any shape (``[seq, batch]`` in the loss), and returns an fp32 tensor
of the same shape. Nothing here knows about process groups: the vocab-parallel op produces the
log-probs, and the loss module reduces the statistics across micro-batches and data-parallel ranks.

Kinds (PowerOPD, arXiv:2606.17199, and the baselines it compares against):

* ``power``      pi_T^a - pi_S^a                    PowerOPD, bounded in [-1, 1]
* ``boxcox``     (pi_T^a - pi_S^a) / a              -> log-ratio as a -> 0
* ``log_ratio``  lp_t - lp_s                        vanilla OPD
* ``clip``       clamp(log_ratio, min, max)
* ``tanh``       tanh(log_ratio / tau)
* ``zscore``     (log_ratio - mean) / std           mean and std over the whole optimizer step
* ``tropd``      log(a*pi_T/pi_S + 1 - a)           TOP-D / TROPD (arXiv:2607.04751; prime-rl
  PR #2966, NeMo-RL PR #4011): the log-ratio to the proximal teacher a*pi_T + (1-a)*pi_S, with
  0 < a <= 1 (``--opd-tropd-alpha``); floored at log(1 - a), a = 1 is the log-ratio
* ``sign``       sign(lp_t - lp_s)                  the sign-only reward (TV-OPD): its expected
  update descends the total variation between pi_S and pi_T
* ``full_vocab_kl``  exact reverse KL, differentiated through the student's whole distribution; it
  has no sampled-token reward, so :func:`compute_reward` returns the log-ratio for reporting only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RewardConfig:
    """The ``--opd-*`` reward flags."""

    kind: str = "power"
    alpha: float = 1.0
    clip_min: float = -1.0
    clip_max: float = 1.0
    tanh_temperature: float = 5.0
    tropd_alpha: float = 0.2

    @property
    def spec(self) -> RewardKind:
        """What the kind needs and descends (:data:`REWARDS`)."""
        self.validate()
        return REWARDS[self.kind]

    @property
    def needs_teacher_logits(self) -> bool:
        return self.spec.needs_teacher_logits

    @property
    def needs_step_moments(self) -> bool:
        return self.spec.needs_step_moments

    def validate(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise ValueError(
                f"--opd-reward must be one of {', '.join(REWARD_KINDS)}, got {self.kind!r}"
            )
        if not self.alpha > 0 or not math.isfinite(self.alpha):
            raise ValueError(f"--opd-alpha must be > 0, got {self.alpha:g}")
        if not self.clip_min < self.clip_max:
            raise ValueError(
                f"--opd-clip-min ({self.clip_min:g}) must be < --opd-clip-max ({self.clip_max:g})"
            )
        if not self.tanh_temperature > 0 or not math.isfinite(self.tanh_temperature):
            raise ValueError(f"--opd-tanh-temperature must be > 0, got {self.tanh_temperature:g}")
        if not 0 < self.tropd_alpha <= 1:
            raise ValueError(f"--opd-tropd-alpha must be in (0, 1], got {self.tropd_alpha:g}")


def log_ratio_reward(lp_t: torch.Tensor, lp_s: torch.Tensor) -> torch.Tensor:
    return lp_t.float() - lp_s.float()


def _power_difference_over_alpha(
    lp_t: torch.Tensor, lp_s: torch.Tensor, alpha: float
) -> torch.Tensor:
    """(exp(a*lp_t) - exp(a*lp_s)) / a without cancellation or overflow.

    Factor out the larger probability: with m = max(lp_t, lp_s) and d = lp_t - lp_s,
    pi_T^a - pi_S^a = sign(d) * exp(a*m) * (1 - exp(-a*|d|)) = -sign(d) * exp(a*m) * expm1(-a*|d|).
    expm1 keeps full relative precision when a*|d| is tiny (so the a -> 0 limit is exact), and its
    argument is never positive, so nothing overflows for large a.
    """
    lp_t, lp_s = lp_t.float(), lp_s.float()
    d = lp_t - lp_s
    m = torch.maximum(lp_t, lp_s)
    return -torch.sign(d) * torch.exp(alpha * m) * torch.expm1(-alpha * d.abs()) / alpha


def power_reward(lp_t: torch.Tensor, lp_s: torch.Tensor, alpha: float) -> torch.Tensor:
    """pi_T^alpha - pi_S^alpha (the paper's Eq. 4), in [-1, 1], zero iff lp_t == lp_s."""
    return _power_difference_over_alpha(lp_t, lp_s, alpha) * alpha


def boxcox_reward(lp_t: torch.Tensor, lp_s: torch.Tensor, alpha: float) -> torch.Tensor:
    """(pi_T^alpha - pi_S^alpha) / alpha, in [-1/alpha, 1/alpha]; the log-ratio as alpha -> 0."""
    return _power_difference_over_alpha(lp_t, lp_s, alpha)


def clip_reward(r: torch.Tensor, clip_min: float = -1.0, clip_max: float = 1.0) -> torch.Tensor:
    return r.float().clamp(clip_min, clip_max)


def tanh_reward(r: torch.Tensor, tau: float = 5.0) -> torch.Tensor:
    return torch.tanh(r.float() / tau)


def tropd_reward(lp_t: torch.Tensor, lp_s: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha * pi_T/pi_S + 1 - alpha) = log(alpha*pi_T + (1-alpha)*pi_S) - log pi_S, fp32.

    0 < alpha <= 1. Bounded below by log(1 - alpha) (a token the teacher rejects costs at most
    that), unbounded above like the log-ratio; the sign of the log-ratio, zero iff lp_t == lp_s.
    With d = lp_t - lp_s: log1p(alpha * expm1(d)) near d = 0, where the result is small and must
    keep its relative precision, and logaddexp(log alpha + d, log(1 - alpha)) elsewhere, which
    neither overflows for large d nor loses the floor for very negative d.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"--opd-tropd-alpha must be in (0, 1], got {alpha:g}")
    d = lp_t.float() - lp_s.float()
    if alpha == 1.0:
        return d
    near = torch.log1p(alpha * torch.expm1(d.clamp(-1.0, 1.0)))
    far = torch.logaddexp(d + math.log(alpha), torch.full_like(d, math.log1p(-alpha)))
    return torch.where(d.abs() < 1.0, near, far)


def sign_reward(lp_t: torch.Tensor, lp_s: torch.Tensor) -> torch.Tensor:
    """sign(lp_t - lp_s) in {-1, 0, 1}: E_{v~pi_S}[sign(pi_T(v) - pi_S(v)) grad log pi_S(v)]
    = -2 grad TV(pi_S, pi_T), so the REINFORCE update descends the total variation."""
    return torch.sign(lp_t.float() - lp_s.float())


def masked_moments(r: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population std) of ``r`` over ``mask`` as fp32 scalars."""
    mask = mask.bool()
    n = mask.sum().clamp(min=1).double()
    x = torch.where(mask, r.double(), 0.0)
    mean = x.sum() / n
    var = (torch.where(mask, r.double() - mean, 0.0) ** 2).sum() / n
    return mean.float(), var.sqrt().float()


def zscore_reward(
    r: torch.Tensor,
    mask: torch.Tensor,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(r - mean) / std. Without ``mean``/``std`` they are taken over ``mask`` (population std);
    in training pass the moments of the whole optimizer step (``loss.step_log_ratio_moments``)."""
    if (mean is None) != (std is None):
        raise ValueError("zscore_reward needs both mean and std, or neither")
    if mean is None:
        mean, std = masked_moments(r, mask)
    return (r.float() - mean) / torch.as_tensor(std).float().clamp(min=eps)


@dataclass(frozen=True)
class RewardKind:
    """One ``--opd-reward`` kind. ``reward(cfg, lp_t, lp_s, mask, moments)``: the per-token
    reward (before masking). ``needs_teacher_logits``: the loss reads the teacher's
    vocab-sharded logits, not only its sampled-token log-probs. ``needs_step_moments``: the
    reward standardises by the log-ratio's mean and std over the whole optimizer step (a
    forward-only pass of the student first). ``divergence``: what its expected update descends,
    for the gap report (``kl``, ``tv``, ``power`` at the run's alpha, or ``none`` where no
    divergence is known)."""

    reward: Callable[..., torch.Tensor]
    divergence: str
    needs_teacher_logits: bool = False
    needs_step_moments: bool = False


def _zscore(cfg, lp_t, lp_s, mask, moments):
    mean, std = moments if moments is not None else (None, None)
    return zscore_reward(log_ratio_reward(lp_t, lp_s), mask, mean, std)


REWARDS: dict[str, RewardKind] = {
    "power": RewardKind(lambda c, t, s, m, z: power_reward(t, s, c.alpha), "power"),
    "boxcox": RewardKind(lambda c, t, s, m, z: boxcox_reward(t, s, c.alpha), "power"),
    "log_ratio": RewardKind(lambda c, t, s, m, z: log_ratio_reward(t, s), "kl"),
    "clip": RewardKind(
        lambda c, t, s, m, z: clip_reward(log_ratio_reward(t, s), c.clip_min, c.clip_max), "none"
    ),
    "tanh": RewardKind(
        lambda c, t, s, m, z: tanh_reward(log_ratio_reward(t, s), c.tanh_temperature), "none"
    ),
    "zscore": RewardKind(_zscore, "none", needs_step_moments=True),
    "tropd": RewardKind(lambda c, t, s, m, z: tropd_reward(t, s, c.tropd_alpha), "none"),
    "sign": RewardKind(lambda c, t, s, m, z: sign_reward(t, s), "tv"),
    # exact reverse KL through the whole distribution; its "reward" is the log-ratio, reported
    "full_vocab_kl": RewardKind(
        lambda c, t, s, m, z: log_ratio_reward(t, s), "kl", needs_teacher_logits=True
    ),
}
REWARD_KINDS = tuple(REWARDS)


def compute_reward(
    cfg: RewardConfig,
    lp_t: torch.Tensor,
    lp_s: torch.Tensor,
    mask: torch.Tensor,
    zscore_moments: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """The reward of ``cfg.kind`` in fp32, zero where ``mask`` is false; never has a gradient."""
    mask = mask.bool()
    r = cfg.spec.reward(cfg, lp_t.detach(), lp_s.detach(), mask, zscore_moments)
    # where(): padding positions may hold anything, and 0 * inf would be nan
    return torch.where(mask, r, 0.0)


# ---------------------------------------------------------------------------------------------
# Statistics that add up across micro-batches and data-parallel ranks
# ---------------------------------------------------------------------------------------------

POSITION_BUCKETS = ((0, 16), (16, 64), (64, 256), (256, None))
PERCENTILES = (1, 5, 50, 95, 99)
ABS_REWARD_THRESHOLD = 0.01

# Percentiles come from a fixed histogram so that micro-batches and ranks merge by summation:
# |r| is binned logarithmically over [1e-6, 1e3] at 32 bins per decade (each bin spans a factor
# of 10^(1/32) = 1.075, so a percentile is off by at most 3.7% of its value), mirrored for r < 0;
# |r| < 1e-6 counts as 0 and |r| > 1e3 lands in the outermost bin (reports clamp to min / max).
_HIST_LOG10_MIN, _HIST_LOG10_MAX, _HIST_BINS_PER_DECADE = -6, 3, 32
_HIST_SIDE = (_HIST_LOG10_MAX - _HIST_LOG10_MIN) * _HIST_BINS_PER_DECADE
HISTOGRAM_BINS = 2 * _HIST_SIDE + 1

# how each statistic merges across micro-batches and ranks; everything else is summed
STAT_MIN_KEYS = ("reward_min",)
STAT_MAX_KEYS = ("reward_max",)


def _histogram_bin(r: torch.Tensor) -> torch.Tensor:
    r = torch.nan_to_num(r.double(), nan=0.0)  # a non-finite reward already shows in the sums
    a = r.abs()
    side = ((a.log10() - _HIST_LOG10_MIN) * _HIST_BINS_PER_DECADE).floor().clamp(0, _HIST_SIDE - 1)
    side = torch.where(a < 10.0**_HIST_LOG10_MIN, -1, side.long())
    # bin _HIST_SIDE is zero; _HIST_SIDE + 1 + k is the k-th positive bin, mirrored below zero
    return torch.where(r >= 0, _HIST_SIDE + 1 + side, _HIST_SIDE - 1 - side)


def _histogram_bin_value(index: int) -> float:
    """The signed geometric centre of a histogram bin."""
    if index == _HIST_SIDE:
        return 0.0
    k = index - _HIST_SIDE - 1 if index > _HIST_SIDE else _HIST_SIDE - 1 - index
    value = 10.0 ** (_HIST_LOG10_MIN + (k + 0.5) / _HIST_BINS_PER_DECADE)
    return value if index > _HIST_SIDE else -value


def response_positions(mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Index of each valid token among the valid tokens of its sequence along ``dim``."""
    m = mask.long()
    return m.cumsum(dim) - m


def reward_statistics(
    reward: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Additive statistics of one micro-batch; merge with sum (min/max for STAT_MIN/MAX_KEYS),
    then :func:`summarize_statistics`. All tensors are float64 (exact token counts, stable sums)."""
    mask = mask.bool()
    r = reward.detach()[mask].double()
    lr = log_ratio.detach()[mask].double()
    pos = positions[mask]
    inf = torch.tensor(math.inf, dtype=torch.float64, device=r.device)
    stats = {
        "num_tokens": torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
        "reward_sum": r.sum(),
        "reward_sq_sum": (r * r).sum(),
        "reward_min": r.min() if r.numel() else inf,
        "reward_max": r.max() if r.numel() else -inf,
        "reward_abs_gt_threshold": (r.abs() > ABS_REWARD_THRESHOLD).sum().double(),
        "log_ratio_sum": lr.sum(),
    }
    abs_sum, count = [], []
    for lo, hi in POSITION_BUCKETS:
        sel = (pos >= lo) if hi is None else (pos >= lo) & (pos < hi)
        abs_sum.append(r[sel].abs().sum())
        count.append(sel.sum().double())
    stats["abs_reward_by_position_sum"] = torch.stack(abs_sum)
    stats["tokens_by_position"] = torch.stack(count)
    stats["reward_histogram"] = torch.bincount(_histogram_bin(r), minlength=HISTOGRAM_BINS).double()
    return stats


def merge_statistics(stats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge the statistics of several micro-batches (same rank)."""
    out = {}
    for key in stats[0]:
        values = torch.stack([s[key] for s in stats])
        if key in STAT_MIN_KEYS:
            out[key] = values.min(0).values
        elif key in STAT_MAX_KEYS:
            out[key] = values.max(0).values
        else:
            out[key] = values.sum(0)
    return out


def _bucket_name(lo: int, hi: Optional[int]) -> str:
    return f"{lo}_plus" if hi is None else f"{lo}_{hi - 1}"


def summarize_statistics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged numbers: reward mean/std/min/max/percentiles, fraction |r| > 0.01, mean
    log-ratio, mean |reward| per response-position bucket, and the number of valid tokens."""
    n = stats["num_tokens"].item()
    nan = float("nan")
    out: dict[str, float] = {"num_tokens": n}
    if n > 0:
        mean = stats["reward_sum"].item() / n
        var = max(stats["reward_sq_sum"].item() / n - mean * mean, 0.0)
        out.update(
            reward_mean=mean,
            reward_std=math.sqrt(var),
            reward_min=stats["reward_min"].item(),
            reward_max=stats["reward_max"].item(),
            reward_frac_abs_gt_0_01=stats["reward_abs_gt_threshold"].item() / n,
            log_ratio_mean=stats["log_ratio_sum"].item() / n,
        )
        cum = stats["reward_histogram"].cumsum(0)
        for q in PERCENTILES:
            # nearest rank: the smallest value with at least q% of the tokens at or below it
            rank = max(math.ceil(q / 100.0 * n), 1)
            key = torch.tensor(float(rank), dtype=cum.dtype, device=cum.device)
            index = int(torch.searchsorted(cum, key))
            value = _histogram_bin_value(index)
            out[f"reward_p{q}"] = min(max(value, out["reward_min"]), out["reward_max"])
    else:
        for key in ("reward_mean", "reward_std", "reward_min", "reward_max"):
            out[key] = nan
        out.update(reward_frac_abs_gt_0_01=nan, log_ratio_mean=nan)
        out.update({f"reward_p{q}": nan for q in PERCENTILES})
    for i, (lo, hi) in enumerate(POSITION_BUCKETS):
        count = stats["tokens_by_position"][i].item()
        total = stats["abs_reward_by_position_sum"][i].item()
        out[f"abs_reward_pos_{_bucket_name(lo, hi)}"] = total / count if count else nan
    if "loss_sum" in stats:
        out["loss"] = stats["loss_sum"].item() / n if n > 0 else nan
    return out
