"""The distillation gap (megatron_opd/evaluation/gap.py): scripts/evaluate.py --teacher and
--eval-interval numbers equal an independent float64 recount by the Hugging Face models on the same
sampled tokens, at TP1 (in-process) and at TP2 and PP2 (torchrun); the vocab-parallel entropy; the
warning."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opd_setup import ROOT, load_script, make_pair, read_metrics, torchrun

from megatron_opd.evaluation import gap

GAP_ALPHAS = (0.5, 5.0)
EVAL = ["--data", "builtin:40", "--limit", "4", "--samples", "2", "--max-new-tokens", "10",
        "--gap-alpha", *map(str, GAP_ALPHAS)]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("gap"))


def _prompts(pair) -> list[list[int]]:
    from megatron_opd.evaluation import accuracy
    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.training import data

    (problems,) = accuracy.load_benchmarks(["builtin:40"], 4).values()
    return data.PromptSet.build(problems, load_tokenizer(pair["student"]), 2048).token_ids


def _hf_recount(pair, records: list[dict]) -> list[dict]:
    """Per record, in float64 by transformers: the sums of evaluate_gap's quantities."""
    from transformers import AutoModelForCausalLM

    root = Path(pair["student"]).parent
    student, teacher = (
        AutoModelForCausalLM.from_pretrained(str(root / name)).double().eval()
        for name in ("hf_student", "hf_teacher")
    )
    prompts = _prompts(pair)
    out = []
    with torch.no_grad():
        for r in records:
            prompt, response = prompts[r["index"]], r["response_ids"]
            seq = torch.tensor([prompt + response])
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            ls = torch.log_softmax(student(seq).logits[0, positions], -1)
            lt = torch.log_softmax(teacher(seq).logits[0, positions], -1)
            target = torch.tensor(response).unsqueeze(1)
            lp_s, lp_t = ls.gather(1, target)[:, 0], lt.gather(1, target)[:, 0]
            ps, pt = ls.exp(), lt.exp()
            ref = {
                "tokens": len(response),
                "kl_sum": (ps * (ls - lt)).sum().item(),
                "teacher_nll_sum": -lp_t.sum().item(),
                "log_ratio_sum": (lp_t - lp_s).sum().item(),
                "entropy_sum": -(ps * ls).sum().item(),
                "tv_sum": 0.5 * (ps - pt).abs().sum().item(),
            }
            for a in GAP_ALPHAS:
                terms = ps ** (1 + a) - (1 + a) * pt**a * ps + a * pt ** (1 + a)
                ref[gap.power_key(a) + "_sum"] = terms.sum().item()
            out.append(ref)
    return out


def _assert_equal_to_recount(pair, out_dir: Path) -> dict:
    result = json.loads((out_dir / "results.json").read_text())
    records = [json.loads(line) for line in (out_dir / "gap.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 2
    recount = _hf_recount(pair, records)
    for r, ref in zip(records, recount, strict=True):
        assert r["tokens"] == ref["tokens"] >= 1
        assert set(gap.sum_keys(GAP_ALPHAS)) <= set(r)
        for key in gap.sum_keys(GAP_ALPHAS):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (r["index"], key)
    expected = gap.summarize([{**r, **ref} for r, ref in zip(records, recount, strict=True)])
    for key, value in expected.items():
        assert result["gap"]["mean"][key] == pytest.approx(value, rel=1e-4), key
    assert result["gap"]["mean"]["kl_per_token"] > 0.05  # a real gap, not a trivially equal pair
    assert 0.01 < result["gap"]["mean"]["tv_per_token"] < 1
    return result


def test_evaluate_teacher_gap_equals_hf_float64_recount_tp1(pair, tmp_path):
    """At temperature 1 the gap is measured on the Avg@k samples themselves."""
    out = tmp_path / "eval"
    load_script("evaluate").main(
        ["--load", str(pair["student"]), "--teacher", str(pair["teacher"]), *EVAL,
         "--temperature", "1.0", "--micro-batch-size", "3", "--output", str(out), "--no-progress",
         "--metrics-file", str(tmp_path / "m.jsonl"), "--tensorboard-dir", str(tmp_path / "tb")]
    )  # fmt: skip
    result = _assert_equal_to_recount(pair, out)
    (logged,) = read_metrics(tmp_path / "m.jsonl")
    assert logged["step"] == 0  # a converted checkpoint: iteration 0
    assert logged["gap/mean/kl_per_token"] == result["gap"]["mean"]["kl_per_token"]
    assert logged["eval/mean/avg_at_k"] == result["mean"]["avg_at_k"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    completions = [
        json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()
    ]
    gap_rows = [json.loads(line) for line in (out / "gap.jsonl").read_text().splitlines()]
    assert [c["response_tokens"] for c in completions] == [g["tokens"] for g in gap_rows]
    md = (out / "results.md").read_text()
    assert "KL(π_S‖π_T)" in md and "TV / token" in md and "D_α=0.5 / token" in md


def _evaluate_torchrun(pair, out: Path, *layout: str) -> None:
    from megatron_opd.runtime.distributed import standalone_env
    from megatron_opd.runtime.spawn import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", str(ROOT / "scripts/evaluate.py"),
           "--load", str(pair["student"]), "--teacher", str(pair["teacher"]), *EVAL,
           "--output", str(out), "--no-progress", *layout]  # fmt: skip
    env = dict(standalone_env(), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_evaluate_teacher_gap_equals_hf_float64_recount_tp2_and_pp2(pair, tmp_path):
    """At temperature 0.6 (the default) the gap draws its own temperature-1 samples; TP2 shards
    the vocabulary, PP2 puts the numbers on the last stage and rank 0 writes them."""
    tp2 = _assert_equal_to_recount(pair, _evaluate_torchrun_dir(pair, tmp_path / "tp2", "tp"))
    pp2 = _assert_equal_to_recount(pair, _evaluate_torchrun_dir(pair, tmp_path / "pp2", "pp"))
    # rollouts do not depend on the layout, so neither does the gap
    for key, value in tp2["gap"]["mean"].items():
        assert pp2["gap"]["mean"][key] == pytest.approx(value, rel=1e-4), key


def _evaluate_torchrun_dir(pair, out: Path, kind: str) -> Path:
    flag = "--tensor-model-parallel-size" if kind == "tp" else "--pipeline-model-parallel-size"
    _evaluate_torchrun(pair, out, flag, "2")
    return out


def test_evaluate_teacher_errors(pair, tmp_path, capsys):
    script = load_script("evaluate")
    args = ["--load", str(pair["student"]), *EVAL, "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        script.main([*args, "--teacher", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error: --teacher") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        script.main([*args, "--teacher", str(pair["teacher"]), "--gap-alpha", "5", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "evaluate.py: error: --gap-alpha must be > 0 and finite, got 0"


@pytest.mark.slow
def test_eval_interval_gap_equals_evaluate_script(pair, tmp_path):
    """--eval-interval logs the gap (teacher: the run's own) with the same numbers as
    evaluate.py --teacher on the same student, prompts and seed; the student's entropy is logged."""
    metrics = tmp_path / "m.jsonl"
    torchrun(
        1,
        ["--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]),
         "--global-batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-3",
         "--rollout-max-new-tokens", "8", "--max-prompt-length", "160",
         "--prompt-data", "builtin:64", "--seed", "7", "--train-iters", "1",
         "--eval-interval", "1", "--eval-at-start", "--eval-data", "builtin:40",
         "--eval-limit", "4", "--eval-samples", "2", "--eval-max-new-tokens", "10",
         "--eval-temperature", "1.0", "--metrics-file", str(metrics),
         "--tensorboard-dir", str(tmp_path / "tb")],
    )  # fmt: skip
    rows = read_metrics(metrics)
    evals = [r for r in rows if "gap/mean/kl_per_token" in r]
    assert [r["step"] for r in evals] == [0, 1]
    (step,) = [r for r in rows if "loss" in r]
    assert 0 < step["student/entropy"] < math.log(pair["vocab_size"])

    out = tmp_path / "eval"
    load_script("evaluate").main(
        ["--load", str(pair["student"]), "--teacher", str(pair["teacher"]), *EVAL,
         "--temperature", "1.0", "--seed", "7", "--output", str(out), "--no-progress"]
    )  # fmt: skip
    reference = json.loads((out / "results.json").read_text())["gap"]["mean"]
    # the training run's power divergence is at its own --opd-alpha (5, the default)
    for key in ("kl_per_token", "teacher_nll_per_token", "log_ratio_mean", "student_entropy",
                "tv_per_token", "power_div_5_per_token"):  # fmt: skip
        assert evals[0][f"gap/mean/{key}"] == pytest.approx(reference[key], rel=1e-5), key
    assert evals[1]["gap/mean/kl_per_token"] != evals[0]["gap/mean/kl_per_token"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# pieces


def test_vocab_parallel_entropy_matches_float64_and_ignores_padding():
    from megatron_opd.reward.entropy import vocab_parallel_entropy

    g = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(3, 5, 64, generator=g) * 8
    logits[..., vocab:] = 1e4  # padded columns: must not count
    ref_lp = torch.log_softmax(logits[..., :vocab].double(), -1)
    ref = -(ref_lp.exp() * ref_lp).sum(-1)
    got = vocab_parallel_entropy(logits, vocab, None, chunk_size=4)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def _entropy_worker(logits: torch.Tensor, vocab: int):
    from megatron.core import parallel_state as ps

    from megatron_opd.reward.entropy import vocab_parallel_entropy
    from megatron_opd.runtime import distributed

    distributed.initialize(distributed.ParallelConfig(2, 1))
    rank = ps.get_tensor_model_parallel_rank()
    shard = logits.chunk(2, dim=-1)[rank].contiguous()
    return vocab_parallel_entropy(shard, vocab, ps.get_tensor_model_parallel_group())


@pytest.mark.slow
def test_vocab_parallel_entropy_tp2():
    from megatron_opd.runtime.spawn import run_distributed

    g = torch.Generator().manual_seed(1)
    vocab = 40  # the second shard holds 8 true columns and 24 padded ones
    logits = torch.randn(4, 3, 64, generator=g) * 20
    ref_lp = torch.log_softmax(logits[..., :vocab].double(), -1)
    ref = -(ref_lp.exp() * ref_lp).sum(-1)
    for got in run_distributed(_entropy_worker, 2, logits, vocab, timeout=200):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def _divergences_float64(student: torch.Tensor, teacher: torch.Tensor, vocab: int, alphas):
    ls = torch.log_softmax(student[..., :vocab].double(), -1)
    lt = torch.log_softmax(teacher[..., :vocab].double(), -1)
    ps, pt = ls.exp(), lt.exp()
    tv = 0.5 * (ps - pt).abs().sum(-1)
    power = [(ps ** (1 + a) - (1 + a) * pt**a * ps + a * pt ** (1 + a)).sum(-1) for a in alphas]
    kl = (ps * (ls - lt)).sum(-1)
    return tv, torch.stack(power), kl, ((ps - pt) ** 2).sum(-1)


DIV_ALPHAS = (1e-4, 0.5, 1.0, 5.0, 50.0)


def test_divergences_match_float64_and_ignore_padding():
    from megatron_opd.reward.divergences import vocab_parallel_divergences

    g = torch.Generator().manual_seed(4)
    vocab = 50
    student = torch.randn(3, 5, 64, generator=g) * 6
    teacher = student + torch.randn(3, 5, 64, generator=g) * 3
    teacher[0, 0] = student[0, 0]  # identical rows: every divergence is 0
    student[..., vocab:] = 1e4  # padded columns: must not count
    teacher[..., vocab:] = -1e4
    tv, power = vocab_parallel_divergences(student, teacher, vocab, None, DIV_ALPHAS, chunk_size=4)
    ref_tv, ref_power, kl, l2 = _divergences_float64(student, teacher, vocab, DIV_ALPHAS)
    assert tv.shape == (3, 5) and power.shape == (len(DIV_ALPHAS), 3, 5)
    torch.testing.assert_close(tv, ref_tv, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(power, ref_power, rtol=1e-6, atol=1e-12)
    assert tv[0, 0] == 0 and (power[:, 0, 0].abs() < 1e-15).all()
    assert (power >= -1e-15).all() and (tv <= 1).all()
    # alpha = 1: the squared L2 distance; alpha -> 0: D / alpha -> KL(pi_S || pi_T)
    torch.testing.assert_close(power[2], l2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(power[0] / 1e-4, kl, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="alphas must be > 0"):
        vocab_parallel_divergences(student, teacher, vocab, None, (0.0,))


def _divergences_worker(student: torch.Tensor, teacher: torch.Tensor, vocab: int, tp: int):
    from megatron.core import parallel_state as ps

    from megatron_opd.reward.divergences import vocab_parallel_divergences
    from megatron_opd.runtime import distributed

    distributed.initialize(distributed.ParallelConfig(tp, 1))
    rank = ps.get_tensor_model_parallel_rank()
    s = student.chunk(tp, dim=-1)[rank].contiguous()
    t = teacher.chunk(tp, dim=-1)[rank].contiguous()
    return vocab_parallel_divergences(
        s, t, vocab, ps.get_tensor_model_parallel_group(), DIV_ALPHAS, chunk_size=3
    )


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_divergences_tp(tp):
    """Real gloo groups: at TP4 with vocab 40 of 64 columns the last shard holds only padding."""
    from megatron_opd.runtime.spawn import run_distributed

    g = torch.Generator().manual_seed(2)
    vocab = 40
    student = torch.randn(4, 3, 64, generator=g) * 10
    teacher = student * 0.5 + torch.randn(4, 3, 64, generator=g) * 4
    ref_tv, ref_power, _, _ = _divergences_float64(student, teacher, vocab, DIV_ALPHAS)
    for tv, power in run_distributed(
        _divergences_worker, tp, student, teacher, vocab, tp, timeout=300
    ):
        torch.testing.assert_close(tv, ref_tv, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(power, ref_power, rtol=1e-6, atol=1e-12)


def test_gap_watch_warns_once_on_a_rising_gap(capsys):
    watch = gap.GapWatch("kl", patience=3)
    assert not any(watch.update(v, i) for i, v in enumerate([1.0, 0.9, 0.95, 0.93, 0.92]))
    warned = [watch.update(v, 10 + i) for i, v in enumerate([1.1, 1.3, 1.5, 1.7, 1.9])]
    assert warned == [False, False, True, False, False]
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "iteration 12" in err and "kl grew 3 times" in err


def test_gap_watch_windows_and_noise():
    # per-step values rising by 1% a window: below min_growth, no warning
    flat = gap.GapWatch("x", patience=3, window=2, enabled=False)
    assert not any(flat.update(1.0 + 0.01 * (i // 2), i) for i in range(20))
    rising = gap.GapWatch("x", patience=3, window=2, enabled=False)
    fired = [i for i in range(20) if rising.update(1.0 + 0.2 * (i // 2), i)]
    assert fired == [7]  # the 4th window (steps 6, 7) is the 3rd rise in a row
    assert not gap.GapWatch("x").update(float("nan"), 0)


def test_training_report_has_the_students_entropy_on_the_loss_tokens():
    """opd_loss_func's report: student_entropy = mean entropy over the masked tokens (float64
    reference), for a sampled-token reward and for full-vocab KL."""
    from megatron_opd.reward.loss import opd_loss_func, reduce_reports
    from megatron_opd.reward.rewards import RewardConfig

    g = torch.Generator().manual_seed(3)
    vocab, b, s = 40, 2, 6
    logits = torch.randn(b, s, 48, generator=g) * 4
    targets = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    lp = torch.log_softmax(logits[..., :vocab].double(), -1)
    expected = (-(lp.exp() * lp).sum(-1))[mask].mean().item()
    teacher_logits = torch.randn(b, s, 48, generator=g)
    for kind in ("power", "full_vocab_kl"):
        loss_func = opd_loss_func(
            targets=targets,
            loss_mask=mask,
            reward_cfg=RewardConfig(kind=kind, alpha=1.0),
            vocab_size=vocab,
            tp_group=None,
            teacher_logprobs=torch.log_softmax(teacher_logits[..., :vocab], -1)
            .gather(-1, targets.unsqueeze(-1))
            .squeeze(-1),
            teacher_logits=teacher_logits,
            inplace_backward=False,
        )
        _, _, stats = loss_func(logits.clone().requires_grad_())
        report = reduce_reports([stats])
        assert report["student_entropy"] == pytest.approx(expected, rel=1e-5), kind


def test_trainer_watch_warns_on_the_measured_drifting_run(capsys):
    """The trainer's held-out watch on the numbers of a real drifting run (docs/demo.md, PowerOPD
    seed 2): it warns at the third rise; the full-vocab KL run's falling gap never warns."""
    drifting = gap.TrainingGapWatch(None, micro_batch_size=1, power_alpha=1.0)
    series = zip((0, 4, 8, 12), (1.671, 1.732, 1.735, 1.761), strict=True)
    fired = [drifting.held_out.update(v, s) for s, v in series]
    assert fired == [False, False, False, True]
    assert "iteration 12" in capsys.readouterr().err
    closing = gap.TrainingGapWatch(None, micro_batch_size=1, power_alpha=1.0)
    assert not any(
        closing.held_out.update(v, s) for s, v in enumerate((1.667, 1.570, 1.525, 1.508))
    )
    for step, log_ratio in enumerate([-1.5] * 5 + [-1.7] * 5 + [-1.9] * 5 + [-2.1] * 5):
        drifting.step(step, {"reward/log_ratio_mean": log_ratio})
    assert drifting.sampled.warned
