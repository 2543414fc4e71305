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


# --------------------------------------------------------------------------------------------
# Many intervals: p-values, Holm, and the committed 18-seed comparison (issue 30)

COMPARE18 = Path(__file__).resolve().parents[1] / "docs" / "reproduction" / "compare18"


def test_p_value_belongs_to_the_interval():
    # an interval whose edge touches 0 has p = 0.05 exactly; half as wide a margin, t = 2 t_q
    df = 12.0
    t = stats.t_quantile(0.975, df)
    assert stats.p_value(2.0, 2.0, df) == pytest.approx(0.05, abs=1e-9)
    assert stats.p_value(-2.0, 2.0, df) == pytest.approx(0.05, abs=1e-9)
    assert stats.p_value(2.0, 1.0, df) == pytest.approx(2 * (1 - stats._t_cdf(2 * t, df)))
    assert stats.p_value(0.0, 1.0, df) == pytest.approx(1.0)
    # two-sided 1% point of t with 8 df is 3.3554: p of t = 3.3554 is 0.01
    se = 1.0 / stats.t_quantile(0.975, 8)
    assert stats.p_value(3.3554 * se, 1.0, 8) == pytest.approx(0.01, abs=2e-5)


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06 (monotone), 0.06
    assert stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_difference_bound():
    a = {"mean": 4.0, "half_width": 2.0, "df": 30.0}
    b = {"mean": 1.0, "half_width": 3.0, "df": 10.0}
    got = stats.difference_bound(a, b)
    se = 2.0 / stats.t_quantile(0.975, 30) + 3.0 / stats.t_quantile(0.975, 10)
    assert got["mean"] == 3.0 and got["df"] == 10.0
    assert got["half_width"] == pytest.approx(stats.t_quantile(0.975, 10) * se)
    # never narrower than either interval alone
    assert got["half_width"] > 3.0


def _recomputed(iv: dict) -> tuple[float, float]:
    """Satterthwaite's df and the half-width, from the components an interval records."""
    s_n, p_n = iv["seeds"], iv["problems"]
    ms_res = iv["sd_residual"] ** 2
    ms_seed = p_n * iv["sd_seed"] ** 2 + ms_res
    ms_problem = s_n * iv["sd_problem"] ** 2 + ms_res
    terms = [(ms_seed / (s_n * p_n), s_n - 1), (ms_problem / (s_n * p_n), p_n - 1)]
    terms.append((-ms_res / (s_n * p_n), (s_n - 1) * (p_n - 1)))
    var = sum(c for c, _ in terms)
    df = var * var / sum(c * c / d for c, d in terms)
    return df, stats.t_quantile(0.975, df) * math.sqrt(var)


def test_the_published_tropd_interval_recounts_from_the_committed_file():
    """docs/reproduction.md: TROPD against vanilla, Avg@8, +2.7 ± 2.3 over 18 seeds x 256
    problems. The committed results.json keeps each interval's variance components (not the
    per-run tables: the 2026-12-05 runs are gone); the half-width and the degrees of freedom
    follow from them, and Holm's adjustment over the 7 comparisons against vanilla keeps it
    (p_Holm 0.044) where Bonferroni (x7: 0.15) would not."""
    import json

    import multiplicity

    results = json.loads((COMPARE18 / "results.json").read_text())
    iv = results["methods"]["tropd"]["accuracy"]["vs_vanilla"]
    assert (iv["seeds"], iv["problems"]) == (18, 256)
    df, half = _recomputed(iv)
    assert df == pytest.approx(iv["df"], rel=1e-9)
    assert half == pytest.approx(iv["half_width"], rel=1e-9)
    assert f"{iv['mean']:+.1f} ± {half:.1f}" == "+2.7 ± 2.3"
    assert iv["mean"] - half == pytest.approx(0.428, abs=1e-3)
    doc = (COMPARE18.parents[1] / "reproduction.md").read_text()
    assert "| TROPD (α=0.2) | −4.9 ± 2.5 ↓ | **+2.7 ± 2.3 ↑** |" in doc
    families = multiplicity.conclusions(results)
    vs_vanilla = families["accuracy vs vanilla"]
    assert len(vs_vanilla) == 7
    p = stats.p_value(iv["mean"], iv["half_width"], iv["df"])
    assert 0.02 < p < 0.025 and 7 * p > 0.05
    ranks = sorted(e["p"] for e in vs_vanilla.values())
    assert ranks.index(p) == 5  # second largest: multiplied by 2
    assert vs_vanilla["tropd"]["p_holm"] == pytest.approx(2 * p)
    assert vs_vanilla["tropd"]["verdict_holm"] == "better"
    assert vs_vanilla["clip"]["verdict"] == vs_vanilla["clip"]["verdict_holm"] == "not resolved"
    # every other interval of the run with both components above 0 recounts from them too
    recounted = 0
    for entry in results["methods"].values():
        for yard in entry.values():
            if not isinstance(yard, dict) or "change" not in yard:
                continue
            for got in yard.values():
                if isinstance(got, dict) and min(got["sd_seed"], got["sd_problem"]) > 0:
                    assert _recomputed(got)[1] == pytest.approx(got["half_width"], rel=1e-9)
                    recounted += 1
    assert recounted >= 80


def test_committed_multiplicity_tables_follow_the_committed_results():
    """compare18/multiplicity.{json,md} are what multiplicity.py computes from results.json."""
    import json

    import multiplicity

    results = json.loads((COMPARE18 / "results.json").read_text())
    families = multiplicity.conclusions(results)
    committed = json.loads((COMPARE18 / "multiplicity.json").read_text())
    assert committed == json.loads(json.dumps(families))
    assert (COMPARE18 / "multiplicity.md").read_text() == multiplicity.markdown(families)
    h2h = families["accuracy head to head (bounded rewards)"]
    assert len(h2h) == 15 and all(e["verdict_holm"] == "not resolved" for e in h2h.values())
    # the centre is exact: a difference of two paired means over the same seeds and problems
    m = results["methods"]
    got = h2h["power_1 - clip"]
    want = (
        m["power_1"]["accuracy"]["vs_vanilla"]["mean"] - m["clip"]["accuracy"]["vs_vanilla"]["mean"]
    )
    assert got["mean"] == pytest.approx(want)
    change = m["power_1"]["accuracy"]["change"]["mean"] - m["clip"]["accuracy"]["change"]["mean"]
    assert got["mean"] == pytest.approx(change, abs=1e-9)


LOWER_RATES = sorted((COMPARE18.parent).glob("lr*/runs.json.gz"))


@pytest.mark.parametrize("runs_file", LOWER_RATES, ids=lambda p: p.parent.name)
def test_the_lower_rate_comparison_recounts_from_its_committed_runs(runs_file):
    """docs/reproduction/lr*/ (issue 30 item 5): every interval of results.json, the head-to-head
    pairs and the Holm tables recomputed from the committed per-run, per-problem numbers alone;
    and the rows the page quotes, rebuilt from the recount."""
    import json

    import compare
    import multiplicity

    out = runs_file.parent
    results = json.loads((out / "results.json").read_text())
    got = json.loads(json.dumps(compare.recount(runs_file)))
    # equal to the last bit where the file was made (Python 3.11); Python 3.12's sum() of floats
    # is compensated, which moves the last bits of a mean
    assert _same(got["methods"], results["methods"])
    assert _same(got["head_to_head"], results["head_to_head"])
    families = multiplicity.conclusions({**results, **got})
    assert _same(json.loads(json.dumps(families)), results["multiplicity"])
    kept = compare.load_runs(runs_file)
    assert all(r["returncode"] == 0 for r in kept["runs"])  # no run failed, none dropped
    lr = f"{results['config']['lr']:g}"
    assert all(f"--lr {lr}" in " ".join(r["flags"]) for r in kept["runs"])
    doc = (COMPARE18.parents[1] / "reproduction.md").read_text()
    for row in lower_rate_rows(results) + lower_rate_holm_rows(results):
        assert row in doc, row


def lower_rate_rows(results: dict) -> list[str]:
    """The rows of docs/reproduction.md's lower-rate table, from a results.json."""
    import compare

    lr = f"{results['config']['lr']:g}"
    rows = []
    for method, entry in results["methods"].items():
        acc = entry["accuracy"]
        cells = [str(acc["change"]["seeds"]), compare._fmt(acc["change"], 1)]
        cells += [compare._fmt(acc[k], 1) if k in acc else "—" for k in BASELINE_KEYS]
        rows.append(f"| {lr} | {method} | " + " | ".join(cells) + " |")
    return rows


BASELINE_KEYS = ("vs_vanilla", "vs_full_vocab_kl")


def _same(a, b) -> bool:
    """Equal, floats within 1e-12 relative (rounding of a sum, nothing else)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return b == pytest.approx(a, rel=1e-12, abs=1e-15)
    return a == b


def lower_rate_holm_rows(results: dict) -> list[str]:
    """The rows of the page's Holm table on accuracy, from a results.json."""

    def p(x: float) -> str:
        return "< 1e-6" if x < 1e-6 else f"{x:.2g}"

    lr = f"{results['config']['lr']:.0e}".replace("e-0", "e-")
    rows = []
    for family, label in (("vanilla", "vs vanilla"), ("full_vocab_kl", "vs full-vocab KL")):
        for name, e in results["multiplicity"][f"accuracy vs {family}"].items():
            rows.append(
                f"| {lr} | {name} {label} | {e['mean']:+.1f} ± {e['half_width']:.1f} | {p(e['p'])} "
                f"| {p(e['p_holm'])} | {e['verdict']} | {e['verdict_holm']} |"
            )
    return rows
