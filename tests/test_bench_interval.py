"""scripts/bench_e2e.py's interval on the median of per-round step-time ratios, with numbers: the
order statistics against hand counts and a printed table, its coverage in simulation, and the
verdicts on the published run 6b and the audit's rerun (no timing here)."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_e2e", Path(__file__).resolve().parents[1] / "scripts" / "bench_e2e.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_order_statistics_by_hand():
    # n = 6: [x_(1), x_(6)] covers with 1 - 2/64 = 0.969; n = 5: 1 - 2/32 = 0.9375 < 0.95
    assert bench.median_interval([0.9, 1.2, 1.0, 1.1, 0.8]) is None
    assert bench.median_interval([6.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == (1.0, 6.0)
    # n = 9: k = 2 covers 1 - 2 (1 + 9) / 512 = 0.961; k = 3: 1 - 2 (1 + 9 + 36) / 512 = 0.820
    assert bench.median_interval([float(x) for x in range(9, 0, -1)]) == (2.0, 8.0)
    # n = 12: k = 3 covers 1 - 2 (1 + 12 + 66) / 4096 = 0.961
    assert bench.median_interval([float(x) for x in range(1, 13)]) == (3.0, 10.0)
    # at 90% n = 5 suffices: 1 - 2/32 = 0.9375
    assert bench.median_interval([5.0, 1.0, 3.0, 2.0, 4.0], level=0.90) == (1.0, 5.0)
    with pytest.raises(ValueError):
        bench.median_interval([1.0] * 9, level=1.5)


@pytest.mark.parametrize("n,k", [(10, 2), (15, 4), (20, 6), (30, 10), (50, 18)])
def test_ranks_match_the_printed_table(n, k):
    """The 95% ranks of the sign-test interval for a median (e.g. Conover, Practical
    Nonparametric Statistics, table A3): x_(k) to x_(n+1-k)."""
    xs = [float(i) for i in range(1, n + 1)]
    assert bench.median_interval(xs) == (float(k), float(n + 1 - k))
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
    assert coverage >= 0.95
    assert 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n < 0.95


def test_interval_covers_the_median_at_least_95_percent_of_the_time():
    """Ratios drawn from a skewed distribution whose median is 1.05: 9 rounds, 2000 draws;
    the exact coverage is 0.961 (binomial sd of the estimate 0.4%)."""
    rng = random.Random(2026)
    covered = 0
    for _ in range(2000):
        ratios = [1.05 * math.exp(rng.gauss(0, 0.08)) ** 3 for _ in range(9)]
        low, high = bench.median_interval(ratios)
        covered += low <= 1.05 <= high
    assert 0.948 <= covered / 2000 <= 0.975, covered


def test_verdicts():
    # run 6b as published: three rounds, every ratio below 1 -- too few rounds for an interval
    assert bench.verdict([0.834, 0.858, 0.903]).startswith("not resolved (3 rounds")
    # nine rounds all below 1: the interval [x_(2), x_(8)] is below 1
    faster = [0.84, 0.86, 0.85, 0.90, 0.88, 0.83, 0.87, 0.95, 0.89]
    assert bench.verdict(faster) == "faster"
    assert bench.verdict([2 - x for x in faster]) == "slower"
    # one round on each side of 1 still fits within [x_(2), x_(8)]; two do not
    assert bench.verdict([0.99, *faster[1:]]) == "faster"
    assert bench.verdict([1.01, 1.02, *faster[2:]]) == "not resolved"
    assert bench.ratio_cell(faster) == "0.870 [0.840, 0.900]"
    assert bench.ratio_cell([0.834, 0.858, 0.903]) == "0.858 (min-max 0.834-0.903)"


def test_ratio_summary_pairs_rounds():
    rounds = [
        {"(a) transformers": {"time/step": 10.0}, "(b) TP1": {"time/step": 9.0 + r / 10}}
        for r in range(6)
    ]
    got = bench.ratio_summary(["(a) transformers", "(b) TP1"], rounds)
    entry = got["(b) TP1 / (a) transformers"]
    assert entry["ratios"] == pytest.approx([0.9, 0.91, 0.92, 0.93, 0.94, 0.95])
    assert entry["interval_95"] == pytest.approx([0.9, 0.95]) and entry["verdict"] == "faster"
    # the table's second ratio column: every contender against (b), (a) included
    back = got["(a) transformers / (b) TP1"]
    assert back["ratios"] == pytest.approx([1 / x for x in entry["ratios"]])
    assert back["verdict"] == "slower" and len(got) == 2


def test_the_table_prints_the_interval_and_the_verdict(capsys):
    """print_table on made-up rounds: the ratio column is the median with its 95% interval,
    and the verdicts follow it (the rest of the table is unchanged by issue 30)."""
    import argparse

    names = ["(b) TP1", "(c) 1 training + 1 rollout rank, lag 1, 2 procs"]
    phases = {"time/rollout": 1.0, "time/teacher": 1.0, "time/train": 1.0}
    extra = {"response/mean_len": 128.0, "batch/padding_frac": 0.07, "memory/peak_gib": 2.0}
    lag1 = [0.99, 1.02, 0.95, 1.08, 0.91, 1.11, 1.01, 0.97, 1.04]  # straddles 1, like the rerun
    rounds = [
        {
            names[0]: {**phases, **extra, "time/step": 10.0},
            names[1]: {**phases, **extra, "time/step": 10.0 * r},
        }
        for r in lag1
    ]
    fwd = {"tokens": 1024, "forward": 1.0, "teacher_forward": 1.0, "train_pass": 1.0}
    args = argparse.Namespace(student_layers=4, batch=8, new_tokens=128, steps=4)
    bench.print_table(names, rounds, fwd, args, mean_prompt=100.0)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(f"| {names[1]}"))
    assert "1.010 [0.950, 1.080]x | not resolved |" in row
    assert "median [95% CI]" in out
