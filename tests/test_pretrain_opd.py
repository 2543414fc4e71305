"""scripts/pretrain_opd.py end to end under torchrun: layouts, resume, reward kinds, learning,
bad input. Tiny Qwen3 models and a tiny BPE tokenizer are built by the tests
(tests/opd_setup.py)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from opd_setup import ROOT, load_script, make_pair, read_metrics, torchrun

from megatron_opd.runtime.spawn import run_distributed

COMMON = [
    "--global-batch-size", "4",
    "--micro-batch-size", "2",
    "--lr", "1e-3",
    "--lr-warmup-fraction", "0",
    "--rollout-max-new-tokens", "12",
    "--max-prompt-length", "160",
    "--prompt-data", "builtin:64",
    "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("opd"))


def _flags(pair, *extra: str) -> list[str]:
    return [
        "--load", str(pair["student"]),
        "--opd-teacher-load", str(pair["teacher"]),
        "--opd-alpha", "0.5",
        *COMMON,
        *extra,
    ]  # fmt: skip


def _assert_same_steps(a: list[dict], b: list[dict], steps, what: str, rel=1e-4):
    for s in steps:
        x, y = a[s - 1], b[s - 1]
        assert x["step"] == y["step"] == s
        for key in ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean"):
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-6), (what, s, key)


@pytest.mark.slow
def test_layouts_and_resume_agree(pair, tmp_path):
    """TP1, TP2 and PP2 give the same losses and grad norms; 2 steps + exit + resume 2 steps
    equals 4 steps straight, number for number."""
    straight = tmp_path / "tp1.jsonl"
    torchrun(1, _flags(pair, "--train-iters", "4", "--metrics-file", str(straight)))
    ref = read_metrics(straight)
    assert len(ref) == 4 and all(math.isfinite(r["loss"]) for r in ref)
    assert len({round(r["loss"], 6) for r in ref}) == 4  # fresh rollouts every step

    for tp, pp in [(2, 1), (1, 2)]:
        out = tmp_path / f"tp{tp}pp{pp}.jsonl"
        torchrun(
            2,
            _flags(
                pair,
                "--train-iters", "3",
                "--tensor-model-parallel-size", str(tp),
                "--pipeline-model-parallel-size", str(pp),
                "--metrics-file", str(out),
            ),
        )  # fmt: skip
        _assert_same_steps(ref, read_metrics(out), [1, 2, 3], f"tp{tp} pp{pp}")

    save = tmp_path / "ckpt"
    resumed = tmp_path / "resumed.jsonl"
    resume_flags = ["--train-iters", "4", "--save", str(save), "--save-interval", "2"]
    torchrun(1, _flags(pair, *resume_flags, "--exit-interval", "2", "--metrics-file", str(resumed)))
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not list(save.glob("*.tmp"))
    torchrun(1, _flags(pair, *resume_flags, "--metrics-file", str(resumed)))
    got = read_metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    _assert_same_steps(ref, got, [1, 2, 3, 4], "resume", rel=1e-6)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    meta = json.loads((save / "iter_0000004" / "megatron_opd.json").read_text())
    assert meta["iteration"] == 4 and (save / "iter_0000004" / "tokenizer").is_dir()


# ---------------------------------------------------------------------------------------------
# Every reward kind: the logged loss equals the formula recomputed from the dumped tokens


def _run_kinds(flags_by_kind: dict[str, list[str]]) -> None:
    module = load_script("pretrain_opd")
    for flags in flags_by_kind.values():
        module.main(flags)


def _reference_reward(kind: str, lp_t, lp_s, mask, alpha=0.5, lo=-1.0, hi=1.0, tau=5.0):
    lp_t, lp_s = lp_t.double(), lp_s.double()
    ratio = lp_t - lp_s
    if kind == "power":
        return lp_t.exp() ** alpha - lp_s.exp() ** alpha
    if kind == "boxcox":
        return (lp_t.exp() ** alpha - lp_s.exp() ** alpha) / alpha
    if kind == "log_ratio":
        return ratio
    if kind == "clip":
        return ratio.clamp(lo, hi)
    if kind == "tanh":
        return torch.tanh(ratio / tau)
    if kind == "zscore":
        valid = ratio[mask]
        return (ratio - valid.mean()) / valid.std(unbiased=False)
    raise AssertionError(kind)


KINDS = ("power", "boxcox", "log_ratio", "clip", "tanh", "zscore", "full_vocab_kl")


@pytest.mark.slow
def test_every_reward_kind_logs_the_formula(pair, tmp_path):
    runs = {
        kind: _flags(
            pair,
            "--opd-reward",
            kind,
            "--train-iters",
            "1",
            "--metrics-file",
            str(tmp_path / f"{kind}.jsonl"),
            "--opd-dump-tokens",
            str(tmp_path / kind),
        )  # fmt: skip
        for kind in KINDS
    }
    # bf16 student and teacher (fp32 main weights), saved and resumed once
    runs["power_bf16"] = _flags(
        pair,
        "--train-iters", "1",
        "--bf16", "--opd-teacher-bf16",
        "--save", str(tmp_path / "bf16_ckpt"),
        "--metrics-file", str(tmp_path / "power_bf16.jsonl"),
    )  # fmt: skip
    runs["power_bf16_resumed"] = runs["power_bf16"][:]
    runs["power_bf16_resumed"][runs["power_bf16"].index("--train-iters") + 1] = "2"
    run_distributed(_run_kinds, 1, runs, timeout=600)
    bf16 = read_metrics(tmp_path / "power_bf16.jsonl")
    fp32 = read_metrics(tmp_path / "power.jsonl")[0]
    assert [r["step"] for r in bf16] == [1, 2]  # the second run resumed from iteration 1
    # same rollouts (the bf16 sampler sees slightly different logits, so allow a few percent)
    assert bf16[0]["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    for kind in KINDS:
        logged = read_metrics(tmp_path / f"{kind}.jsonl")[0]
        dump = torch.load(tmp_path / kind / "step0000001_dp0.pt")
        mbs = dump["micro_batches"]
        lp_t = torch.cat([m["lp_t"] for m in mbs])
        lp_s = torch.cat([m["lp_s"] for m in mbs])
        mask = torch.cat([m["mask"] for m in mbs]).bool()
        n = mask.sum()
        # the final stop token is masked only for responses that ended with one
        expected_tokens = int(dump["response_lengths"].sum() - (~dump["truncated"]).sum())
        assert n == expected_tokens
        if kind == "full_vocab_kl":
            kl = torch.cat([m["kl"] for m in mbs]).double()
            assert (kl[mask] >= -1e-6).all()
            expected = kl[mask].sum() / n
        else:
            r = _reference_reward(kind, lp_t, lp_s, mask)
            expected = -(r * lp_s.double())[mask].sum() / n
        assert logged["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7), kind
        ratio = (lp_t.double() - lp_s.double())[mask]
        assert logged["reward/log_ratio_mean"] == pytest.approx(ratio.mean().item(), abs=1e-5)
        if kind == "power":
            assert -1 <= logged["reward/min"] <= logged["reward/max"] <= 1


# ---------------------------------------------------------------------------------------------
# Learning: the student moves toward the teacher


@pytest.fixture(scope="module")
def copy_pair(tmp_path_factory):
    # a peaked teacher (large weights) and a student close to it: OPD has a signal to follow
    root = tmp_path_factory.mktemp("copy")
    return make_pair(root, student_layers=2, perturbed_copy=True, scale=0.6, noise=0.15)


def _teacher_logprob_by_step(dump_dir: Path) -> list[float]:
    out = []
    for f in sorted(dump_dir.glob("step*_dp0.pt")):
        mbs = torch.load(f)["micro_batches"]
        lp_t = torch.cat([m["lp_t"] for m in mbs])
        mask = torch.cat([m["mask"] for m in mbs]).bool()
        out.append(lp_t[mask].mean().item())
    return out


@pytest.mark.slow
def test_poweropd_moves_the_student_toward_the_teacher(copy_pair, tmp_path):
    """The teacher's mean log-prob of fresh student samples rises over 30 steps.

    Teacher and student share one tokenizer, so the stop token is trained too
    (--no-opd-mask-terminal-stop): with it masked, a student that only ever hears negative rewards
    learns to stop at once, since the one token never pushed down is the stop token."""
    gains = {}
    for kind in ("power", "log_ratio"):
        torchrun(
            1,
            [
                "--load", str(copy_pair["student"]),
                "--opd-teacher-load", str(copy_pair["teacher"]),
                "--opd-reward", kind,
                "--opd-alpha", "0.5",
                *COMMON,
                "--global-batch-size", "32",
                "--micro-batch-size", "16",
                "--lr", "3e-3",
                "--train-iters", "30",
                "--no-opd-mask-terminal-stop",
                "--opd-dump-tokens", str(tmp_path / kind),
            ],
        )  # fmt: skip
        lp = _teacher_logprob_by_step(tmp_path / kind)
        assert len(lp) == 30
        gains[kind] = sum(lp[-10:]) / 10 - sum(lp[:3]) / 3
    print("teacher log-prob gain over 30 steps (last 10 vs first 3):", gains)
    # measured: power +1.3, log_ratio +2.2 nats per token (seed 7)
    assert gains["power"] > 0.5, gains
    assert gains["log_ratio"] > 0.5, gains  # vanilla OPD, run beside it


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, before any model is built


def _error(pair, monkeypatch, capsys, *extra, world: int = 1) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    module = load_script("pretrain_opd")
    with pytest.raises(SystemExit) as exc:
        module.main(_flags(pair, *extra))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_bad_input_messages(pair, tmp_path, monkeypatch, capsys):
    def err(*extra, world=1):
        return _error(pair, monkeypatch, capsys, *extra, world=world)

    assert "--opd-alpha must be > 0, got 0" in err("--opd-alpha", "0")
    assert "argument --opd-reward: invalid choice: 'kl'" in err("--opd-reward", "kl")
    assert "--tensor-model-parallel-size 3 does not divide num_attention_heads 4" in err(
        "--tensor-model-parallel-size", "3", world=3
    )
    assert "--global-batch-size 4 is not divisible by --micro-batch-size 2 x data-parallel " in (
        err("--global-batch-size", "4", "--micro-batch-size", "2", world=4)
    )
    assert "--opd-teacher-load" in err("--opd-teacher-load", str(tmp_path / "missing"))
    assert "--load" in err("--load", str(tmp_path / "missing"))
    assert "exceeds the models' context of 512" in err(
        "--max-prompt-length", "500", "--rollout-max-new-tokens", "100"
    )
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    assert f"{bad}:2: malformed JSON" in err("--prompt-data", str(bad))
    assert "prompt file" in err("--prompt-data", str(tmp_path / "none.jsonl"))

    other = tmp_path / "teacher_other_vocab"
    shutil.copytree(pair["teacher"], other)
    meta = json.loads((other / "megatron_opd.json").read_text())
    meta["arch"]["vocab_size"] += 64
    (other / "megatron_opd.json").write_text(json.dumps(meta))
    assert "the teacher's vocabulary" in err("--opd-teacher-load", str(other))


# ---------------------------------------------------------------------------------------------
# scripts/make_student.py: a layer subset of the teacher, checked against transformers


def _megatron_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_opd.models import convert, gpt
    from megatron_opd.runtime import distributed

    grid = distributed.initialize().grid
    chunks, arch = convert.load_checkpoint_model(ckpt, grid)
    with torch.no_grad():
        out = chunks[0](tokens, gpt.position_ids(*tokens.shape), gpt.causal_mask(tokens.shape[1]))
    return out[..., : arch.vocab_size]


@pytest.mark.slow
def test_make_student_keeps_the_chosen_layers(pair, tmp_path):
    import subprocess

    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_student.py"), "--load", str(pair["teacher"]),
         "--save", str(out), "--layers", "0,3"],
        check=True, capture_output=True,
    )  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(str(pair["teacher"].parent / "hf_teacher")).eval()
    hf.model.layers = torch.nn.ModuleList([hf.model.layers[0], hf.model.layers[3]])
    hf.config.num_hidden_layers = 2
    hf.config.layer_types = hf.config.layer_types[:2]
    tokens = torch.randint(
        0, pair["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits
    got = run_distributed(_megatron_logits, 1, out, tokens)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    meta = json.loads((out / "megatron_opd.json").read_text())
    assert meta["arch"]["num_hidden_layers"] == 2 and (out / "tokenizer").is_dir()


@pytest.mark.slow
def test_exit_signal_saves_and_stops(pair, tmp_path):
    """SIGTERM to torchrun (as Slurm sends on preemption): the step in flight finishes, a
    checkpoint of it is written, and the run stops."""
    import os
    import signal
    import subprocess
    import time

    from megatron_opd.runtime.spawn import free_port

    metrics, save = tmp_path / "m.jsonl", tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
        f"--master-port={free_port()}", str(ROOT / "scripts/pretrain_opd.py"),
        *_flags(pair, "--train-iters", "1000", "--save", str(save)),
        "--metrics-file", str(metrics), "--exit-signal-handler",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, "no step logged"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        proc.kill()
    steps = read_metrics(metrics)
    assert "exit signal: saved iteration" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(steps[-1]["step"])
    assert steps[-1]["step"] < 1000


# ---------------------------------------------------------------------------------------------
# Evaluation: scripts/evaluate.py end to end, and --eval-interval inside training


@pytest.mark.slow
def test_evaluate_script_numbers_equal_a_recount(pair, tmp_path):
    import subprocess

    from megatron_opd.evaluation import accuracy

    data = ROOT.parent / "shared" / "data" / "eval" / "gsm8k.jsonl"
    spec = str(data) if data.exists() else "builtin:50"
    out = tmp_path / "eval"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/evaluate.py"), "--load", str(pair["student"]),
         "--data", spec, "--limit", "5", "--samples", "3", "--max-new-tokens", "8",
         "--output", str(out), "--no-progress"],
        check=True, capture_output=True,
    )  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 3
    assert {(r["index"], r["sample"]) for r in records} == {
        (i, j) for i in range(5) for j in range(3)
    }
    (name,) = result["benchmarks"]
    recount = accuracy.scores_from_records(records, k=3)[0].as_dict()
    for key in ("avg_at_k", "pass_at_k", "mean_response_tokens", "truncation_rate", "problems"):
        assert result["benchmarks"][name][key] == pytest.approx(recount[key]), key
    assert all(r["response_tokens"] <= 8 for r in records)
    assert "| **mean** |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_eval_interval_logs_scores(pair, tmp_path):
    metrics = tmp_path / "m.jsonl"
    torchrun(
        1,
        _flags(
            pair,
            "--train-iters", "2",
            "--eval-interval", "2",
            "--eval-data", "builtin:20",
            "--eval-limit", "3",
            "--eval-samples", "2",
            "--eval-max-new-tokens", "6",
            "--metrics-file", str(metrics),
            "--tensorboard-dir", str(tmp_path / "tb"),
        ),
    )  # fmt: skip
    rows = read_metrics(metrics)
    evals = [r for r in rows if "eval/mean/avg_at_k" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert 0.0 <= evals[0]["eval/builtin_20/pass_at_2"] <= 100.0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
