"""Rollouts on their own layout (``megatron_opd.rollout.refit``): the refitted copy against the
checkpoint loaded directly at the rollout layout, and its greedy rollouts against transformers.

Two processes, every pair of training and rollout layouts among TP2, PP2 and TP1 x DP2, on the
tiny Qwen3 (untied, tied) and Llama (tied) models of ``test_convert``."""

from __future__ import annotations

import pytest
import torch
from test_convert import NEW_TOKENS, TINY_PROMPTS, tiny  # noqa: F401  (tiny: the fixture)

from megatron_opd.runtime.spawn import run_distributed

LAYOUTS = [  # (training TP, PP) -> (rollout TP, PP)
    ((2, 1), (1, 1)),
    ((1, 2), (1, 1)),
    ((1, 2), (2, 1)),
    ((1, 1), (1, 2)),
    ((2, 1), (1, 2)),
]


def _refit_worker(cases: list[dict]) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_opd.evaluation import accuracy
    from megatron_opd.models import convert
    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import refit
    from megatron_opd.runtime import distributed
    from megatron_opd.training import teacher

    results = {}
    for train, roll in LAYOUTS:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        grid = distributed.initialize(distributed.ParallelConfig(*train)).grid
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        bounds = [len(TINY_PROMPTS) * r // dp for r in range(dp + 1)]
        mine = list(range(bounds[dp_rank], bounds[dp_rank + 1]))  # this DP rank's prompts
        for case in cases:
            directory = case["megatron_dir"]
            chunks, _ = convert.load_checkpoint_model(directory, grid)
            arch, meta = convert.read_checkpoint(directory)
            divisor = meta.get("make_vocab_size_divisible_by", 128)
            model = refit.RolloutModel(chunks, grid, arch, divisor, *roll)
            (reference,) = teacher.load_on_grid(directory, model.grid)
            reference = dict(reference.named_parameters())

            model.refit(chunks)
            gens = model.generate(
                load_tokenizer(directory), [TINY_PROMPTS[i] for i in mine], seed=0,
                max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[],
            )  # fmt: skip
            equal = all(torch.equal(p, reference[n]) for n, p in model.chunk.named_parameters())
            # evaluation's batches through the copy, uneven across data-parallel ranks (DP rank
            # 0: 3 jobs in 2 batches, DP rank 1: 1 job), each rank's jobs its own greedy tokens
            jobs = [(0, 0), (1, 0), (2, 0)] if dp_rank == 0 else [(2, 0)]
            cfg = accuracy.EvalConfig(samples=1, max_new_tokens=NEW_TOKENS, batch_size=2)
            evals = accuracy.sample_jobs(
                model, load_tokenizer(directory), TINY_PROMPTS, jobs, cfg, 0, grid, greedy=True,
                stop_token_ids=[],
            )  # fmt: skip
            evals = ([i for i, _ in jobs], [g.tokens for g in evals])

            # the training weights move; a second refit carries the new values
            with torch.no_grad():
                for p in refit.global_parameters(chunks).values():
                    p.mul_(1.5)
            model.refit(chunks)
            moved = [
                n for n, p in model.chunk.named_parameters()
                if not torch.equal(p, reference[n] * 1.5)
            ]  # fmt: skip
            results[(train, roll, case["name"])] = (
                mine, [g.tokens for g in gens], equal, moved, evals
            )  # fmt: skip
    return results


@pytest.mark.slow
def test_rollout_layout_refits_and_samples_like_hf(tiny):  # noqa: F811
    cases = [dict(name=c.name, megatron_dir=str(c.megatron_dir)) for c in tiny.values()]
    per_rank = run_distributed(_refit_worker, 2, cases, timeout=600)
    for key in per_rank[0]:
        for rank, r in enumerate(per_rank):
            mine, tokens, equal, moved, (jobs, evals) = r[key]
            assert equal, (key, rank, "refit differs from the checkpoint at the rollout layout")
            assert moved == [], (key, rank, moved)
            assert tokens == [tiny[key[2]].greedy[i] for i in mine], (key, rank)
            assert evals == [tiny[key[2]].greedy[i] for i in jobs], (key, rank)


@pytest.mark.slow
def test_pp2_training_with_tp1_rollouts_equals_dp2_training(tmp_path):
    """PP2 training sampling from a TP1 x DP2 copy draws the rollouts of a TP1 x DP2 run (the
    same prompt shares, seeds and weights), so every step's lengths are equal and its loss,
    rewards and gradient norm equal up to the order of the sums: step 2 and 3 only match when
    each refit carried the previous update."""
    from opd_setup import SHORT_RUN, make_pair, read_metrics, torchrun

    pair = make_pair(tmp_path / "models")
    flags = ["--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]), *SHORT_RUN]
    flags += ["--prompt-data", "builtin:64", "--train-iters", "3"]
    # greedy evaluation at the start and after step 3 (the copy refitted after the last update),
    # and the held-out gap, whose temperature-1 samples come from the copy too
    flags += ["--eval-interval", "3", "--eval-at-start", "--eval-data", "builtin:40",
              "--eval-limit", "3", "--eval-samples", "1", "--eval-temperature", "0",
              "--eval-max-new-tokens", "8"]  # fmt: skip
    ref, got = tmp_path / "dp2.jsonl", tmp_path / "pp2.jsonl"
    torchrun(2, [*flags, "--metrics-file", str(ref)])
    pp2 = ["--pipeline-model-parallel-size", "2", "--rollout-pipeline-model-parallel-size", "1"]
    torchrun(2, [*flags, *pp2, "--metrics-file", str(got)])
    a, b = read_metrics(ref), read_metrics(got)
    evals = [[r for r in rows if "eval/mean/mean_response_tokens" in r] for rows in (a, b)]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [0, 3]
    for x, y in zip(*evals, strict=True):
        assert "gap/mean/kl_per_token" in y
        assert {k: v for k, v in y.items() if k.startswith("eval/")} == {
            k: v for k, v in x.items() if k.startswith("eval/")
        }, x["step"]
    a, b = [r for r in a if "loss" in r], [r for r in b if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert len({round(r["loss"], 6) for r in a}) == 3  # fresh rollouts, a moving student
    for x, y in zip(a, b, strict=True):
        assert "time/refit" in y and "time/refit" not in x
        for key in ("response/mean_len", "response/max_len", "response/truncated_frac"):
            assert y[key] == x[key], (x["step"], key)
        for key in ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean", "reward/std"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
