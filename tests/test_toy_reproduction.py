"""examples/toy_reproduction: the miniature sweep end to end, every reported number recounted.

``run.py --quick`` trains a (tiny) teacher and student from scratch, runs vanilla and PowerOPD
(alpha 5) through ``scripts/pretrain_opd.py`` for a few steps, and writes the table, the claims and
the plots. The test recounts the table from each run's metrics file and the per-token dumps with
its own formulas, checks that the runs differ only in their reward flags, and that the models the
script saved are real Megatron checkpoints that ``--load`` reads.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "examples" / "toy_reproduction"
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import run as toy  # noqa: E402

# the example's own pipeline and statistics; pretrain_opd.py and evaluate.py, which it drives, are
# tested on both stacks elsewhere
pytestmark = pytest.mark.one_stack


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from megatron_opd.runtime.distributed import standalone_env

    out = tmp_path_factory.mktemp("toy")
    env = dict(standalone_env(), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(HERE / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _dumped_rewards(run_dir: Path, method: str) -> tuple[list[float], list[float]]:
    """|reward| of every token at response positions < 16 and >= 16, by this test's formulas."""
    early, late = [], []
    for path in sorted((run_dir / "tokens").glob("step*.pt")):
        for mb in torch.load(path)["micro_batches"]:
            lp_t, lp_s, mask = mb["lp_t"].double(), mb["lp_s"].double(), mb["mask"].bool()
            if method == "vanilla":
                r = lp_t - lp_s
            else:
                assert method == "power_5"
                r = torch.exp(5 * lp_t) - torch.exp(5 * lp_s)
            for row in range(mask.shape[0]):
                values = r[row][mask[row]].abs().tolist()
                early += values[:16]
                late += values[16:]
    return early, late


@pytest.mark.slow
def test_quick_sweep_numbers_recount(sweep):
    out, results, stdout = sweep
    cfg = toy.sweep_config(toy.parse_args(["--quick"]))
    assert set(results["methods"]) == {"vanilla", "power_5"}
    runs = {r["method"]: r for r in results["runs"]}
    assert all(r["returncode"] == 0 for r in runs.values()), runs

    # the runs share every flag but the reward's, which come last
    def shared(run: dict) -> list[str]:
        own = toy.METHODS[run["method"]]
        assert run["flags"][-len(own) :] == own
        return [f.replace(f"{run['method']}_seed", "RUN_seed") for f in run["flags"][: -len(own)]]

    assert shared(runs["vanilla"]) == shared(runs["power_5"])
    assert "--no-opd-mask-terminal-stop" in runs["vanilla"]["flags"]

    for method, entry in results["methods"].items():
        run_dir = out / "runs" / f"{method}_seed1"
        rows = _rows(run_dir)
        train = [r for r in rows if "grad_norm" in r]
        evals = [r for r in rows if "eval/mean/avg_at_k" in r]
        assert [r["step"] for r in train] == list(range(1, cfg.steps + 1))
        assert [r["step"] for r in evals] == list(range(2, cfg.steps + 1, 2))
        grad = [r["grad_norm"] for r in train]
        assert entry["grad_norm_max"] == pytest.approx(max(grad), rel=1e-12)
        assert entry["grad_norm_median"] == pytest.approx(statistics.median(grad), rel=1e-12)
        assert entry["avg_at_k"] == pytest.approx(evals[-1]["eval/mean/avg_at_k"])
        assert entry["pass_at_k"] == pytest.approx(evals[-1]["eval/mean/pass_at_k"])
        assert entry["seconds_per_step"] == pytest.approx(
            statistics.fmean(r["time/step"] for r in train[1:])
        )
        assert entry["peak_memory_gib"] == max(r["memory/peak_gib"] for r in train) > 0.1
        # Avg@2 of 8 problems: a multiple of 100 / 16
        assert (entry["avg_at_k"] * 16 / 100) == pytest.approx(round(entry["avg_at_k"] * 0.16))

        early, late = _dumped_rewards(run_dir, method)
        assert len(early) + len(late) == sum(r["reward/num_tokens"] for r in train)
        assert entry["abs_reward_first16"] == pytest.approx(statistics.fmean(early), rel=1e-6)
        if late:
            assert entry["abs_reward_rest"] == pytest.approx(statistics.fmean(late), rel=1e-6)
    # PowerOPD's reward is bounded by 1; the log-ratio's is not
    assert results["methods"]["power_5"]["abs_reward_first16"] <= 1.0

    claims = {c["claim"][:2]: c for c in results["claims"]}
    assert set(claims) == {"1.", "2."}  # the others need methods the miniature does not run
    v, p = results["methods"]["vanilla"], results["methods"]["power_5"]
    ratio = claims["1."]["measured"]["max_ratio"]["power_5"]
    assert ratio == pytest.approx(v["grad_norm_max"] / p["grad_norm_max"])
    assert claims["1."]["verdict"] == (
        "reproduced" if ratio >= 100 else "partly" if ratio >= 10 else "not reproduced"
    )
    early_more = v["abs_reward_first16"] > v["abs_reward_rest"]
    assert claims["2."]["verdict"] == ("reproduced" if early_more else "not reproduced")

    md = (out / "results.md").read_text()
    assert "| vanilla |" in md and "| power_5 |" in md and "## Claims" in md
    for name in ("grad_norm", "accuracy", "reward_by_position", "length_vs_alpha"):
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    assert "vanilla_seed1: ok" in stdout


@pytest.mark.slow
def test_quick_sweep_models_are_megatron_checkpoints(sweep):
    out, results, _ = sweep
    from megatron_opd.models import convert

    start = results["start"]
    t_arch, t_meta = convert.read_checkpoint(out / "models" / "teacher")
    s_arch, _ = convert.read_checkpoint(out / "models" / "student")
    assert (t_arch.num_hidden_layers, s_arch.num_hidden_layers) == (3, 2)
    assert t_arch.hidden_size > s_arch.hidden_size
    assert start["teacher"]["params"] > 4 * start["student"]["params"]
    assert t_arch.vocab_size == s_arch.vocab_size == t_meta["hf_config"]["vocab_size"]
    assert start["gap_avg_at_k"] == pytest.approx(
        start["teacher"]["avg_at_k"] - start["student"]["avg_at_k"]
    )
    # train and held-out problems are disjoint
    train = {json.loads(x)["problem"] for x in (out / "models" / "train.jsonl").open()}
    held = {json.loads(x)["problem"] for x in (out / "models" / "heldout.jsonl").open()}
    assert len(held) == 8 and not train & held


def test_claims_follow_the_numbers():
    def entry(**kw):
        base = {key: float("nan") for key, _, _ in report.COLUMNS}
        out = {**base, "seeds": [1, 2], "failed": [], **kw}
        for key, _, _ in report.COLUMNS:  # two seeds, 1 apart unless given
            out.setdefault(key + "_per_seed", [out[key] - 0.5, out[key] + 0.5])
        return out

    table = {
        "vanilla": entry(grad_norm_max=1000.0, grad_norm_median=50.0, avg_at_k=10.0,
                         abs_reward_first16=3.0, abs_reward_rest=1.0, eval_response_len=40.0,
                         rollout_response_len=40.0, seconds_per_step=1.0, peak_memory_gib=1.0),
        "clip": entry(grad_norm_max=20.0, avg_at_k=20.0, seconds_per_step=1.0,
                      peak_memory_gib=1.0),
        "full_vocab_kl": entry(seconds_per_step=2.0, peak_memory_gib=1.5),
        "power_5": entry(grad_norm_max=1.0, grad_norm_median=0.5, avg_at_k=30.0,
                         eval_response_len=30.0, rollout_response_len=31.0,
                         seconds_per_step=1.0, peak_memory_gib=1.0),
        "power_0.1": entry(grad_norm_max=5.0, grad_norm_median=1.0, avg_at_k=15.0,
                           eval_response_len=35.0, rollout_response_len=36.0,
                           seconds_per_step=1.0, peak_memory_gib=1.0),
    }  # fmt: skip

    def verdicts():
        claims = {c["claim"][:2]: c for c in report.check_claims(table)}
        return claims, [claims[k]["verdict"] for k in ("1.", "2.", "3.", "4.", "5.")]

    claims, got = verdicts()
    assert got == ["reproduced"] * 5
    assert claims["1."]["measured"]["max_ratio"] == {"power_0.1": 200.0, "power_5": 1000.0}
    assert claims["3."]["measured"]["alphas_above_both"] == ["power_5"]
    assert claims["3."]["measured"]["margin_over_best_baseline"] == 10.0
    assert claims["4."]["measured"]["alphas"] == [0.1, 5.0]
    assert claims["4."]["measured"]["spearman_eval"] == pytest.approx(-1.0)
    assert claims["5."]["measured"]["time_ratio_sampled_over_full"] == pytest.approx(0.5)

    table["power_5"]["grad_norm_max"] = 50.0  # 20x below vanilla: one order of magnitude
    table["power_5"]["avg_at_k_per_seed"] = [10.0, 50.0]  # a margin of 10 within 20 + 0.5
    table["power_5"]["eval_response_len"] = 34.0  # falls, but by < 5%
    table["full_vocab_kl"]["peak_memory_gib"] = 0.5
    claims, got = verdicts()
    assert got == ["partly", "reproduced", "partly", "partly", "partly"]

    table["power_5"]["grad_norm_max"] = 500.0
    table["vanilla"]["abs_reward_rest"] = 4.0
    table["power_5"]["avg_at_k"] = 5.0
    table["power_0.1"]["avg_at_k"] = 5.0
    table["power_5"]["eval_response_len"] = 50.0
    table["power_5"]["rollout_response_len"] = 50.0
    table["full_vocab_kl"]["seconds_per_step"] = 0.5
    claims, got = verdicts()
    assert got == ["not reproduced"] * 5
    assert math.isclose(claims["2."]["measured"]["ratio"], 0.75)


# ---------------------------------------------------------------------------------------------
# compare.py: the comparison with intervals, in miniature


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from megatron_opd.runtime.distributed import standalone_env

    out = tmp_path_factory.mktemp("compare")
    env = dict(standalone_env(), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(HERE / "compare.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def _accuracy_by_problem(eval_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (eval_dir / "completions.jsonl").read_text().splitlines() if x]
    n = 1 + max(r["index"] for r in rows)
    return [
        statistics.fmean(float(r["correct"]) for r in rows if r["index"] == i) for i in range(n)
    ]


def _kl_by_problem(eval_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (eval_dir / "gap.jsonl").read_text().splitlines() if x]
    n = 1 + max(r["index"] for r in rows)
    return [
        sum(r["kl_sum"] for r in rows if r["index"] == i)
        / sum(r["tokens"] for r in rows if r["index"] == i)
        for i in range(n)
    ]


@pytest.mark.slow
def test_quick_comparison_recounts(comparison):
    """Every interval's centre recounted from the evaluation files the runs wrote (completions
    and gap samples), the pairing by seed, and the interval maths applied to those tables."""
    import compare
    import stats

    out, results, stdout = comparison
    methods = results["methods"]
    assert set(methods) == {"vanilla", "full_vocab_kl"}
    heldout = results["heldout"]
    start_acc = _accuracy_by_problem(out / "start_8")
    assert len(start_acc) == heldout == 8
    start_kl = _kl_by_problem(out / "start_8")
    for method, entry in methods.items():
        assert entry["seeds"] == [1, 2] and entry["failed"] == []
        acc = {s: _accuracy_by_problem(out / "runs" / f"{method}_seed{s}" / "eval") for s in (1, 2)}
        kl = {s: _kl_by_problem(out / "runs" / f"{method}_seed{s}" / "eval") for s in (1, 2)}
        change = [[100 * (a - b) for a, b in zip(acc[s], start_acc, strict=True)] for s in (1, 2)]
        expected = stats.crossed_mean_interval(change)
        got = entry["accuracy"]["change"]
        assert got["mean"] == pytest.approx(expected.mean, abs=1e-9)
        assert got["half_width"] == pytest.approx(expected.half_width, abs=1e-9)
        # Avg@2 over 8 problems: the change is a multiple of 100 / 16 points
        assert (got["mean"] * 16 / 100) == pytest.approx(round(got["mean"] * 0.16), abs=1e-9)
        kl_change = statistics.fmean(
            a - b for s in (1, 2) for a, b in zip(kl[s], start_kl, strict=True)
        )
        assert entry["kl"]["change"]["mean"] == pytest.approx(kl_change, rel=1e-9)
        for key in ("tv", "power_div_1", "power_div_5", "power_div_50"):
            assert key in entry and math.isfinite(entry[key]["change"]["mean"])
        if method != "vanilla":  # the pairing: the same seed's vanilla run
            base = {
                s: _accuracy_by_problem(out / "runs" / f"vanilla_seed{s}" / "eval") for s in (1, 2)
            }
            paired = [[100 * (a - b) for a, b in zip(acc[s], base[s], strict=True)] for s in (1, 2)]
            iv = stats.crossed_mean_interval(paired)
            assert entry["accuracy"]["vs_vanilla"]["mean"] == pytest.approx(iv.mean, abs=1e-9)
            assert entry["accuracy"]["vs_vanilla"]["half_width"] == pytest.approx(
                iv.half_width, abs=1e-9
            )
        else:
            assert "vs_vanilla" not in entry["accuracy"]
    # the runs share every flag but the reward's, and train without in-run evaluation
    runs = {
        m: json.loads((out / "runs" / f"{m}_seed1" / "result.json").read_text()) for m in methods
    }
    for m, r in runs.items():
        own = compare.METHODS[m]
        assert r["flags"][-len(own) :] == own
        assert "--eval-interval" not in r["flags"] and "--save" in r["flags"]
    shared = {
        m: [f.replace(f"{m}_seed", "RUN_seed") for f in r["flags"][: -len(compare.METHODS[m])]]
        for m, r in runs.items()
    }
    assert shared["vanilla"] == shared["full_vocab_kl"]
    md = (out / "results.md").read_text()
    assert "| full_vocab_kl |" in md and "95%" in md
    png = (out / "plots" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full_vocab_kl_seed2: ok" in stdout
    # every run's per-problem numbers are kept, and every interval recounts from them alone
    kept = compare.load_runs(out / "runs.json.gz")
    assert sorted((r["method"], r["seed"]) for r in kept["runs"]) == sorted(
        (m, s) for m in methods for s in (1, 2)
    )
    assert kept["start"]["accuracy"] == pytest.approx(start_acc)
    assert json.loads(json.dumps(compare.recount(out / "runs.json.gz")["methods"])) == methods
    assert "accuracy vs vanilla" in results["multiplicity"] and "Holm" in md


def test_compare_verdicts_follow_the_intervals():
    import compare

    assert compare.verdict({"mean": 2.0, "low": 0.5, "high": 3.5}, True) == "better"
    assert compare.verdict({"mean": 2.0, "low": -0.5, "high": 4.5}, True) == "not resolved"
    assert compare.verdict({"mean": -2.0, "low": -3.0, "high": -1.0}, True) == "worse"
    # a divergence: lower is better
    assert compare.verdict({"mean": -0.2, "low": -0.3, "high": -0.1}, False) == "better"


def test_compare_flag_errors(capsys):
    import compare

    for argv, message in (
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--heldout", "1"], "--heldout must be >= 2, got 1"),
    ):
        with pytest.raises(SystemExit) as e:
            compare.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def _fake_runs(methods, seeds, problems, rng):
    """Results as run_one returns them: per-problem accuracy (k = 8 samples) and divergences."""
    import compare

    runs = []
    for m in methods:
        for seed in seeds:
            pp = {"accuracy": [rng.randrange(9) / 8 for _ in range(problems)]}
            for key in compare.YARDSTICKS:
                if key != "accuracy":
                    pp[key] = [rng.random() for _ in range(problems)]
            runs.append({"method": m, "seed": seed, "returncode": 0, "per_problem": pp,
                         "grad_norm_median": 1.0})  # fmt: skip
    return runs


def test_compare_keeps_every_run_and_recounts_from_them(tmp_path):
    """runs.json.gz round trip: the tables and the head-to-head pairs recomputed from the kept
    file equal the ones computed from the runs; a head-to-head pair recounted by hand."""
    import random

    import compare
    import stats

    rng = random.Random(5)
    methods = ("vanilla", "full_vocab_kl", "power_1", "sign", "clip")
    runs = _fake_runs(methods, (1, 2, 3), 6, rng)
    start = _fake_runs(("vanilla",), (0,), 6, rng)[0]["per_problem"]
    compare.save_runs(tmp_path / "runs.json.gz", runs, start, methods)
    first = (tmp_path / "runs.json.gz").read_bytes()
    compare.save_runs(tmp_path / "runs.json.gz", runs, start, methods)
    assert (tmp_path / "runs.json.gz").read_bytes() == first  # byte-stable
    got = compare.recount(tmp_path / "runs.json.gz")
    assert got["methods"] == compare.compare(runs, start, methods)
    pairs = got["head_to_head"]["accuracy"]
    assert list(pairs) == ["power_1 - sign", "power_1 - clip", "sign - clip"]
    by = {(r["method"], r["seed"]): r["per_problem"]["accuracy"] for r in runs}
    table = [
        [100 * (a - b) for a, b in zip(by["power_1", s], by["sign", s], strict=True)]
        for s in (1, 2, 3)
    ]
    want = stats.crossed_mean_interval(table)
    assert pairs["power_1 - sign"]["mean"] == pytest.approx(want.mean)
    assert pairs["power_1 - sign"]["half_width"] == pytest.approx(want.half_width)
    # the conclusions use the paired intervals when the results have them
    import multiplicity

    results = {"methods": got["methods"], "head_to_head": got["head_to_head"]}
    h2h = multiplicity.conclusions(results)["accuracy head to head (bounded rewards)"]
    assert {e["source"] for e in h2h.values()} == {"paired over seeds and problems"}
    assert h2h["sign - clip"]["mean"] == pytest.approx(pairs["sign - clip"]["mean"])


def test_compare_refuses_a_run_made_with_other_flags(tmp_path, capsys):
    """A finished run is reused only with the flags it was made with (issue 30: a rerun with
    another --steps silently mixed runs)."""
    import compare

    args = compare.parse_args(["--quick", "--out", str(tmp_path)])
    cfg, _ = compare.config(args)
    models = tmp_path / "models"
    run_dir = tmp_path / "runs" / "vanilla_seed1"
    run_dir.mkdir(parents=True)
    flags = compare._drop(cfg.flags(models, run_dir, 1), compare._IN_RUN_ONLY)
    flags += ["--save", str(run_dir / "ckpt"), "--save-interval", str(cfg.steps)]
    flags += compare.METHODS["vanilla"]
    evaluate = compare.evaluate_cmd(cfg, models, run_dir / "ckpt", run_dir / "eval", 8)[1:]
    cached = {"method": "vanilla", "seed": 1, "flags": flags, "evaluate": evaluate,
              "returncode": 0}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(cached))
    assert compare.run_one(cfg, models, tmp_path, "vanilla", 1, 1, 8) == cached  # reused
    other = compare.parse_args(["--quick", "--out", str(tmp_path), "--steps", "3"])
    cfg3, _ = compare.config(other)
    with pytest.raises(SystemExit) as e:
        compare.run_one(cfg3, models, tmp_path, "vanilla", 1, 1, 8)
    message = str(e.value)
    assert "was made with other flags" in message and str(run_dir) in message
    assert "--train-iters 4 vs 3" in message
    with pytest.raises(SystemExit) as e:  # another --heldout: the evaluation differs
        compare.run_one(cfg, models, tmp_path, "vanilla", 1, 1, 16)
    assert "evaluate differ" in str(e.value)
    del cached["evaluate"]  # a result from before issue 30 records no evaluation flags
    (run_dir / "result.json").write_text(json.dumps(cached))
    with pytest.raises(SystemExit) as e:
        compare.run_one(cfg, models, tmp_path, "vanilla", 1, 1, 8)
    assert "records no evaluate" in str(e.value)
