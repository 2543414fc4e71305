"""Confidence intervals for a mean over seeds x held-out problems (the comparison's statistics).

Every number the comparison reports is the mean of a table ``y[s, i]``: one row per training seed,
one column per held-out problem (a run's Avg@k on problem ``i`` minus the start's, or minus the
same seed's baseline run for a paired difference). Seeds and problems are both random draws: a new
seed retrains differently, a new problem set samples the task differently. The model is the
two-way crossed random-effects model without replication,

    y[s, i] = mu + a[s] + b[i] + e[s, i],   Var a = s_a^2, Var b = s_b^2, Var e = s_e^2,

under which the grand mean has variance s_a^2 / S + s_b^2 / P + s_e^2 / (S P). The mean squares of
the two-way ANOVA estimate the components (method of moments; E MS_seed = P s_a^2 + s_e^2,
E MS_problem = S s_b^2 + s_e^2, E MS_residual = s_e^2), each clipped at 0, and the 95% interval is
mean +- t * sqrt(V) with Satterthwaite's degrees of freedom for V. With one seed the seed
component cannot be estimated: the interval then covers problems only and says so (``seeds=1``).

No scipy here: the t quantile bisects the t distribution function, written with the regularized
incomplete beta function (its continued fraction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass
class Interval:
    """The mean of a seeds x problems table and its confidence interval."""

    mean: float
    half_width: float
    df: float
    seeds: int
    problems: int
    sd_seed: float  # estimated standard deviations of the three components
    sd_problem: float
    sd_residual: float
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high}


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz), on the side of x where it converges fast."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x)
    log_front -= math.log(a) + math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


def _t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` > 0 degrees of freedom, x >= 0."""
    if math.isinf(df):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    return 1.0 - 0.5 * _betainc(df / 2, 0.5, df / (df + x * x))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def crossed_mean_interval(y: Sequence[Sequence[float]], level: float = 0.95) -> Interval:
    """The mean of ``y[seed][problem]`` with a ``level`` interval over seeds and problems."""
    s_n = len(y)
    p_n = len(y[0]) if s_n else 0
    if s_n == 0 or p_n < 2 or any(len(row) != p_n for row in y):
        raise ValueError("y must be a non-empty seeds x problems table with >= 2 problems")
    grand = sum(map(sum, y)) / (s_n * p_n)
    seed_means = [sum(row) / p_n for row in y]
    prob_means = [sum(row[i] for row in y) / s_n for i in range(p_n)]
    ss_problem = s_n * sum((m - grand) ** 2 for m in prob_means)
    ms_problem = ss_problem / (p_n - 1)
    if s_n == 1:
        # problems only: the seed's own variance is not in the interval
        var = ms_problem / p_n
        df = p_n - 1
        sd_seed, sd_problem, sd_res = math.nan, math.sqrt(ms_problem), math.nan
    else:
        ss_seed = p_n * sum((m - grand) ** 2 for m in seed_means)
        ss_res = sum(
            (y[s][i] - seed_means[s] - prob_means[i] + grand) ** 2
            for s in range(s_n)
            for i in range(p_n)
        )
        ms_seed = ss_seed / (s_n - 1)
        ms_res = ss_res / ((s_n - 1) * (p_n - 1))
        var_seed = max((ms_seed - ms_res) / p_n, 0.0)
        var_problem = max((ms_problem - ms_res) / s_n, 0.0)
        # V = var_seed / S + var_problem / P + ms_res / (S P) as a combination of mean squares
        # (a clipped component drops out), for Satterthwaite's degrees of freedom
        terms = [(ms_res / (s_n * p_n), (s_n - 1) * (p_n - 1))]
        if var_seed > 0:
            terms.append((ms_seed / (s_n * p_n), s_n - 1))
            terms[0] = (terms[0][0] - ms_res / (s_n * p_n), terms[0][1])
        if var_problem > 0:
            terms.append((ms_problem / (s_n * p_n), p_n - 1))
            terms[0] = (terms[0][0] - ms_res / (s_n * p_n), terms[0][1])
        var = sum(c for c, _ in terms)
        denom = sum(c * c / d for c, d in terms if c != 0)
        df = var * var / denom if denom > 0 else math.inf
        sd_seed, sd_problem, sd_res = map(math.sqrt, (var_seed, var_problem, ms_res))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(var) if var > 0 else 0.0
    return Interval(grand, half, df, s_n, p_n, sd_seed, sd_problem, sd_res, level)


def seeds_needed(
    sd_seed: float,
    sd_problem: float,
    problems: int,
    half_width: float,
    sd_residual: float = 0.0,
    level: float = 0.95,
    max_seeds: int = 1000,
) -> int | None:
    """The fewest seeds whose interval half-width, with these component sizes and ``problems``
    held-out problems, is at most ``half_width`` (None: not with ``max_seeds``; the problems'
    share alone can exceed it). Degrees of freedom: the seeds' (S - 1), the conservative side."""
    for s in range(2, max_seeds + 1):
        var = sd_seed**2 / s + sd_problem**2 / problems + sd_residual**2 / (s * problems)
        if t_quantile(0.5 + level / 2, s - 1) * math.sqrt(var) <= half_width:
            return s
    return None


# --------------------------------------------------------------------------------------------
# Many intervals at once: p-values from the intervals, Holm's step-down adjustment


def p_value(mean: float, half_width: float, df: float, level: float = 0.95) -> float:
    """The two-sided p-value of "the true mean is 0" that belongs to an interval mean ±
    half_width at ``level`` with ``df`` degrees of freedom: the standard error is half_width / t,
    and p = 2 P(T > |mean| / se). The interval excludes 0 exactly when p < 1 - level."""
    if half_width <= 0:
        return 0.0 if mean != 0 else 1.0
    se = half_width / t_quantile(0.5 + level / 2, df)
    return 2.0 * (1.0 - _t_cdf(abs(mean) / se, df))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: sorted ascending, the j-th
    (0-based) of m is multiplied by m - j, made non-decreasing, capped at 1. Rejecting where the
    adjusted p < 0.05 keeps the chance of any false call in the family at most 5%, whatever the
    dependence between the tests."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p_values[i]))
        adjusted[i] = running
    return adjusted


def difference_bound(a: dict, b: dict, level: float = 0.95) -> dict:
    """A conservative interval for mean_a - mean_b when only the two intervals are known, not
    the per-run tables (so not the covariance of the two estimates): the difference's standard
    error is at most se_a + se_b (Cauchy-Schwarz: correlation -1), and the degrees of freedom are
    the smaller of the two. Its coverage is at least ``level`` under the intervals' own model;
    the paired interval from the tables would be as wide or narrower."""
    t_a = t_quantile(0.5 + level / 2, a["df"])
    t_b = t_quantile(0.5 + level / 2, b["df"])
    se = a["half_width"] / t_a + b["half_width"] / t_b
    df = min(a["df"], b["df"])
    mean = a["mean"] - b["mean"]
    half = t_quantile(0.5 + level / 2, df) * se
    return {"mean": mean, "half_width": half, "df": df, "low": mean - half, "high": mean + half}
