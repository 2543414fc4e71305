"""examples/toy_reproduction/stats.py: the t quantile against printed tables, the crossed-design
interval against a hand computation, and its coverage in simulation."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "toy_reproduction"))

import stats  # noqa: E402


@pytest.mark.parametrize(
    "df,expected",
    # two-sided 95% points of Student's t, from any printed table
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281), (30, 2.0423),
     (120, 1.9799), (math.inf, 1.95996)],
)  # fmt: skip
def test_t_quantile_matches_tables(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_other_levels():
    assert stats.t_quantile(0.95, 4) == pytest.approx(2.1318, abs=2e-4)
    assert stats.t_quantile(0.995, 8) == pytest.approx(3.3554, abs=2e-4)
    with pytest.raises(ValueError):
        stats.t_quantile(0.4, 3)


def test_crossed_interval_by_hand():
    # seeds x problems; worked through by hand:
    # grand 3.5; seed means 2, 5; problem means 2, 3, 5.5
    # MS_seed = 3 * (1.5^2 + 1.5^2) / 1 = 13.5; MS_problem = 2 * (2.25 + 0.25 + 4) / 2 = 6.5
    # residuals +-0.5, +-0.5, -+1: MS_res = 3 / 2 = 1.5
    # V = (13.5 + 6.5 - 1.5) / 6 = 3.08333; Satterthwaite df = V^2 / ((13.5/6)^2 / 1
    #     + (6.5/6)^2 / 2 + (1.5/6)^2 / 2) = 1.67362
    y = [[1.0, 2.0, 3.0], [3.0, 4.0, 8.0]]
    iv = stats.crossed_mean_interval(y)
    assert iv.mean == 3.5 and (iv.seeds, iv.problems) == (2, 3)
    v = 18.5 / 6
    df = v * v / ((13.5 / 6) ** 2 + (6.5 / 6) ** 2 / 2 + (1.5 / 6) ** 2 / 2)
    assert iv.df == pytest.approx(df, rel=1e-12)
    assert iv.half_width == pytest.approx(stats.t_quantile(0.975, df) * math.sqrt(v), rel=1e-12)
    assert iv.sd_seed == pytest.approx(math.sqrt((13.5 - 1.5) / 3))
    assert iv.sd_problem == pytest.approx(math.sqrt((6.5 - 1.5) / 2))
    assert iv.sd_residual == pytest.approx(math.sqrt(1.5))
    assert iv.low < 0 < iv.high and not iv.excludes_zero()


def test_crossed_interval_special_cases():
    # no seed effect beyond the residual: the seed component is clipped at 0, V = MS_problem/(SP)
    y = [[0.0, 1.0, 5.0], [1.0, 0.0, 5.0]]
    iv = stats.crossed_mean_interval(y)
    ms_problem = 2 * ((0.5 - 2) ** 2 * 2 + (5 - 2) ** 2) / 2  # problem means 0.5, 0.5, 5
    assert iv.sd_seed == 0
    assert iv.half_width == pytest.approx(stats.t_quantile(0.975, 2) * math.sqrt(ms_problem / 6))
    # one seed: problems only, seed variance unknown
    one = stats.crossed_mean_interval([[1.0, 2.0, 4.0]])
    assert math.isnan(one.sd_seed) and one.df == 2
    var = statistics_var([1.0, 2.0, 4.0]) / 3
    assert one.half_width == pytest.approx(stats.t_quantile(0.975, 2) * math.sqrt(var))
    # a constant shift: zero width, excludes 0
    flat = stats.crossed_mean_interval([[2.0, 2.0], [2.0, 2.0]])
    assert flat.half_width == 0 and flat.excludes_zero()
    with pytest.raises(ValueError):
        stats.crossed_mean_interval([[1.0], [2.0]])


def statistics_var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def test_crossed_interval_covers_the_true_mean_95_percent_of_the_time():
    """Simulated from the model it assumes, with a seed, a problem and a residual part: the
    interval covers the true mean in 95% of 600 draws (binomial sd 0.9%), and the variance
    estimate is unbiased for the mean's actual variance."""
    rng = random.Random(12345)
    mu, sd_a, sd_b, sd_e = 3.0, 2.0, 6.0, 4.0
    seeds, problems = 5, 30
    covered, means, widths = 0, [], []
    for _ in range(600):
        a = [rng.gauss(0, sd_a) for _ in range(seeds)]
        b = [rng.gauss(0, sd_b) for _ in range(problems)]
        y = [[mu + a[s] + b[i] + rng.gauss(0, sd_e) for i in range(problems)] for s in range(seeds)]
        iv = stats.crossed_mean_interval(y)
        covered += iv.low <= mu <= iv.high
        means.append(iv.mean)
        widths.append(iv.half_width)
    assert 0.925 <= covered / 600 <= 0.975, covered
    true_sd = math.sqrt(sd_a**2 / seeds + sd_b**2 / problems + sd_e**2 / (seeds * problems))
    empirical = math.sqrt(statistics_var(means))
    assert empirical == pytest.approx(true_sd, rel=0.1)


def test_seeds_needed():
    # sd 4 between seeds, problems negligible: 2.262 * 4 / sqrt(10) = 2.86 <= 3; 9 seeds: 3.07
    assert stats.seeds_needed(4.0, 0.0, 256, 3.0) == 10
    # the problems' share alone exceeds the target: no number of seeds reaches it
    assert stats.seeds_needed(4.0, 30.0, 64, 3.0) is None
    got = stats.seeds_needed(4.0, 10.0, 256, 3.0)
    var = 16 / got + 100 / 256
    assert stats.t_quantile(0.975, got - 1) * math.sqrt(var) <= 3.0
    var = 16 / (got - 1) + 100 / 256
    assert stats.t_quantile(0.975, got - 2) * math.sqrt(var) > 3.0


def test_existing_seeds_table_recounts():
    """docs/reproduction.md's table over the earlier sweeps' four seeds: two rows by hand."""
    import existing_seeds

    t3 = 3.1824  # two-sided 95% point of t with 3 degrees of freedom
    # full-vocab KL's change: 38.5 - 33, 47.3 - 33, 42.4 - 29.3, 41.0 - 29.3
    xs = [5.5, 14.3, 13.1, 11.7]
    m = sum(xs) / 4
    half = t3 * math.sqrt(statistics_var(xs) / 4)
    got = existing_seeds.table()["full_vocab_kl"]["accuracy"]["change"]
    assert got["mean"] == pytest.approx(m) and got["half_width"] == pytest.approx(half, rel=1e-4)
    assert got["low"] > 0  # the only method whose gain excludes 0
    # PowerOPD alpha 5 minus vanilla, same seed and stream: 16.2, 16.6, 3.1, 6.6
    xs = [16.2, 16.6, 3.1, 6.6]
    got = existing_seeds.table()["power_5"]["accuracy"]["vs_vanilla"]
    assert got["mean"] == pytest.approx(sum(xs) / 4)
    assert got["half_width"] == pytest.approx(t3 * math.sqrt(statistics_var(xs) / 4), rel=1e-4)
    assert got["low"] < 0 < got["high"]  # not resolved
    sd, pairs = existing_seeds.pooled_seed_sd()
    assert pairs == 18 and sd == pytest.approx(4.1507, abs=1e-4)
