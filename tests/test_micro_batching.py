"""Token-budget micro-batches (``--max-tokens-per-micro-batch``): the grouping itself, and whole
OPD steps through scripts/pretrain_opd.py whose losses, rewards and gradient norms equal the
padded path's from the same weights, at TP1 (in-process) and at PP2 and DP2 (2 gloo processes)."""

from __future__ import annotations

import shutil

import pytest
import torch
from opd_setup import load_script, make_pair, read_metrics, torchrun

from megatron_opd.runtime.spawn import run_distributed
from megatron_opd.training import opd
from megatron_opd.training.batching import token_budget_groups

COMMON = [
    "--global-batch-size", "8",
    "--micro-batch-size", "4",
    "--lr", "1e-3",
    "--lr-warmup-fraction", "0",
    "--rollout-max-new-tokens", "12",
    "--max-prompt-length", "160",
    "--prompt-data", "builtin:64",
    "--seed", "7",
    "--opd-alpha", "0.5",
]  # fmt: skip
COMPARED = ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean", "reward/std")


def _rollout_batch() -> opd.RolloutBatch:
    """12 sequences of ragged prompts and responses (some truncated), right-padded with 0."""
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, 20, (12,), generator=g)
    responses = torch.randint(1, 30, (12,), generator=g)
    lengths = prompts + responses
    tokens = torch.zeros(12, int(lengths.max()) + 1, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        tokens[row, :n] = torch.randint(1, 100, (n,), generator=g)
    return opd.RolloutBatch(tokens, prompts, responses, torch.rand(12, generator=g) < 0.3)


def test_groups_respect_the_budget_and_keep_every_row():
    batch = _rollout_batch()
    lengths = batch.prompt_lengths + batch.response_lengths
    budget = 90
    items = opd.micro_batches(batch, 4, True, 0, max_tokens=budget)
    rows = torch.cat([mb.rows for mb in items])
    assert sorted(rows.tolist()) == list(range(12))
    padded = opd.micro_batches(batch, 12, True, 0)[0]
    for mb in items:
        b, s = mb.tokens.shape
        assert s == int(lengths[mb.rows].max())  # padded only to its own longest
        assert b * s <= budget or b == 1
        # the same inputs, targets and loss mask as the padded path's rows, cut to the width
        assert torch.equal(mb.tokens, padded.tokens[mb.rows, :s])
        assert torch.equal(mb.targets, padded.targets[mb.rows, :s])
        assert torch.equal(mb.loss_mask, padded.loss_mask[mb.rows, :s])
        assert not padded.loss_mask[mb.rows, s:].any()
    pad, total = opd.padding_fraction(batch, items)
    pad_full, total_full = opd.padding_fraction(batch, [padded])
    assert total - pad == total_full - pad_full == int(lengths.sum())
    assert pad / total < pad_full / total_full
    # greedy by length: a group never leaves room for the next (shorter) row
    for a in items[:-1]:
        assert (a.tokens.shape[0] + 1) * a.tokens.shape[1] > budget


def test_groups_edge_cases():
    lengths = torch.tensor([5, 50, 5, 5, 7])
    groups = token_budget_groups(lengths, 20)  # 50 is over the budget: a micro-batch of its own
    assert [g.tolist() for g in groups] == [[1], [4, 0], [2, 3]]
    assert [g.tolist() for g in token_budget_groups(lengths, 1000)] == [[1, 4, 0, 2, 3]]
    with pytest.raises(ValueError, match="--max-tokens-per-micro-batch"):
        token_budget_groups(lengths, 0)


def test_dump_is_in_rollout_order():
    batch = _rollout_batch()
    items = opd.micro_batches(batch, 4, True, 0, max_tokens=90)
    dump = [{"mask": mb.loss_mask, "lp": mb.targets.double()} for mb in items]
    (entry,) = opd.dump_in_rollout_order(dump, items, batch)
    padded = opd.micro_batches(batch, 12, True, 0)[0]
    assert torch.equal(entry["mask"], padded.loss_mask)
    assert torch.equal(entry["lp"][padded.loss_mask], padded.targets[padded.loss_mask].double())


# ---------------------------------------------------------------------------------------------
# Whole steps: the same numbers as the padded path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("mb"))


def _main_many(runs: list[list[str]]) -> None:
    module = load_script("pretrain_opd")
    for flags in runs:
        module.main(flags)


def _runs(pair, tmp_path, layout: list[str], name: str) -> tuple[list[list[str]], tuple]:
    """Three runs: padded, 2 steps (saving after each); token budget, step 1; token budget,
    step 2 resumed from the padded run's step-1 checkpoint. Each step is compared from the same
    weights: two runs that both update diverge at rounding level (Adam's first step is
    scale-free, so a coordinate whose gradient is fp32 noise moves by a good part of the lr),
    whatever the micro-batching."""
    base = [
        "--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]),
        *COMMON, *layout,
    ]  # fmt: skip
    files = tuple(tmp_path / f"{name}_{run}.jsonl" for run in ("padded", "budget1", "budget2"))
    saved, resumed = tmp_path / f"{name}_padded_ckpt", tmp_path / f"{name}_budget_ckpt"
    budget = ["--max-tokens-per-micro-batch", "150"]
    padded = [*base, "--train-iters", "2", "--save", str(saved), "--save-interval", "1"]
    step1 = [*base, *budget, "--train-iters", "1"]
    step2 = [*base, *budget, "--train-iters", "2", "--save", str(resumed), "--save-interval", "9"]
    runs = [
        [*padded, "--metrics-file", str(files[0])],
        [*step1, "--metrics-file", str(files[1])],
        [*step2, "--metrics-file", str(files[2])],
    ]
    return runs, files


def _resume_from_step_1(tmp_path, name: str) -> None:
    saved, resumed = tmp_path / f"{name}_padded_ckpt", tmp_path / f"{name}_budget_ckpt"
    shutil.copytree(saved / "iter_0000001", resumed / "iter_0000001")
    (resumed / "latest_checkpointed_iteration.txt").write_text("1")


def _run_all(runs, tmp_path, name: str, launch) -> None:
    launch(runs[:2])
    _resume_from_step_1(tmp_path, name)
    launch(runs[2:])


def _assert_equal_steps(files, what: str) -> None:
    padded, budget1, budget2 = (read_metrics(f) for f in files)
    assert [r["step"] for r in padded] == [1, 2]
    assert [r["step"] for r in budget1 + budget2] == [1, 2]
    for x, y in zip(padded, budget1 + budget2, strict=True):
        assert x["response/mean_len"] == y["response/mean_len"]  # the same rollouts
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (what, x["step"], key)
        # less padding with token budgets, and padding really was there to remove
        assert y["batch/padding_frac"] < x["batch/padding_frac"]
    assert max(r["batch/padding_frac"] for r in padded) > 0.05


def test_token_budget_step_equals_padded_step_tp1(pair, tmp_path):
    runs, files = _runs(pair, tmp_path, [], "tp1")
    _run_all(runs, tmp_path, "tp1", lambda r: run_distributed(_main_many, 1, r, timeout=600))
    _assert_equal_steps(files, "tp1")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_token_budget_step_equals_padded_step_on_2_processes(pair, tmp_path, layout):
    # one torchrun per run: re-initializing world-2 process groups in one process hangs
    flags = ["--pipeline-model-parallel-size", "2"] if layout == "pp2" else []
    runs, files = _runs(pair, tmp_path, flags, layout)
    _run_all(runs, tmp_path, layout, lambda r: [torchrun(2, run) for run in r])
    _assert_equal_steps(files, layout)


# ---------------------------------------------------------------------------------------------
# Flags


def test_flag_errors(tmp_path):
    from megatron_opd import compat
    from megatron_opd.training import arguments

    def error(*extra: str) -> str:
        flags = ["--load", str(tmp_path), "--opd-teacher-load", str(tmp_path), *extra]
        with pytest.raises(ValueError) as e:
            arguments.validate_args(arguments.parse_args(flags), world_size=2)
        return str(e.value)

    assert "--max-tokens-per-micro-batch must be >= 1" in error("--max-tokens-per-micro-batch", "0")
    vpp = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    assert "--num-layers-per-virtual-pipeline-stage" in error(
        "--max-tokens-per-micro-batch", "64", *vpp
    )
    if not compat.has_cuda():  # Megatron-Core's dynamic engine needs CUDA and flash-attn
        assert error("--rollout-engine", "dynamic").startswith("--rollout-engine dynamic: ")
