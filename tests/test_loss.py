"""The OPD loss through Megatron's schedule: one step's gradient is the token mean over the whole
step (equal to plain autograd of the formula in float64), whatever the micro-batch split or DP size.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.models import gpt
from megatron_opd.reward.loss import (
    build_loss_mask,
    opd_loss_func,
    reduce_reports,
    require_per_token_loss,
    shift_targets,
    step_log_ratio_moments,
)
from megatron_opd.reward.rewards import RewardConfig
from megatron_opd.reward.vocab_parallel import sampled_token_logprobs
from megatron_opd.runtime import distributed
from megatron_opd.runtime.distributed import ParallelConfig
from megatron_opd.runtime.spawn import run_distributed

VOCAB, PADDED = 250, 256
SEQ, ROWS = 16, 8
KINDS = ("power", "zscore", "full_vocab_kl")
REWARD_CFGS = {
    "power": RewardConfig(kind="power", alpha=2.0),
    "zscore": RewardConfig(kind="zscore"),
    "full_vocab_kl": RewardConfig(kind="full_vocab_kl"),
}


def _arch() -> gpt.ArchConfig:
    return gpt.ArchConfig(
        model_type="qwen3",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )


def _step_data() -> dict[str, torch.Tensor]:
    """One optimizer step of 8 sequences with ragged prompts and responses, some truncated."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 7, (ROWS,), generator=g)
    response = torch.stack(
        [torch.randint(1, SEQ - int(p) + 1, (1,), generator=g)[0] for p in prompt]
    )
    truncated = torch.rand(ROWS, generator=g) < 0.3
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets = shift_targets(input_ids)
    teacher_logits = torch.randn(ROWS, SEQ, PADDED, generator=g) * 2
    teacher_logits[..., VOCAB:] = 50.0  # padding: must be ignored
    log_t = torch.log_softmax(teacher_logits[..., :VOCAB].double(), dim=-1)
    return dict(
        input_ids=input_ids,
        targets=targets,
        loss_mask=build_loss_mask(prompt, response, truncated, SEQ),
        teacher_logits=teacher_logits,
        teacher_logprobs=log_t.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float(),
    )


def _build():
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    arch = _arch()
    cfg = gpt.transformer_config(arch, 1, 1, calculate_per_token_loss=True)
    (model,) = gpt.build_model(arch, cfg, distributed.student_grid())
    g = torch.Generator().manual_seed(1234)  # the same weights in every process
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    return cfg, [ddp]


def _logits(model, batch) -> torch.Tensor:
    ids = batch["input_ids"]
    return model(ids, gpt.position_ids(*ids.shape), gpt.causal_mask(ids.shape[1]))


def _flat_grads(chunks) -> torch.Tensor:
    named = sorted(chunks[0].module.named_parameters())
    return torch.cat([p.main_grad.detach().reshape(-1).clone() for _, p in named])


def _reference(chunks, data, kind):
    """Plain autograd of -sum(sg[r] * log pi_S) / N (or sum KL / N) over the whole step, float64."""
    for c in chunks:
        c.zero_grad_buffer()
    logits = _logits(chunks[0], data)[..., :VOCAB].double()
    log_s = torch.log_softmax(logits, dim=-1)
    lp_s = log_s.gather(-1, data["targets"].unsqueeze(-1)).squeeze(-1)
    lp_t = data["teacher_logprobs"].double()
    m = data["loss_mask"]
    n = m.sum()
    if kind == "power":
        alpha = REWARD_CFGS["power"].alpha
        loss = -((torch.exp(alpha * lp_t) - torch.exp(alpha * lp_s.detach())) * lp_s)[m].sum() / n
    elif kind == "zscore":
        lr = (lp_t - lp_s.detach())[m]
        loss = -((lr - lr.mean()) / lr.std(unbiased=False) * lp_s[m]).sum() / n
    else:
        log_t = torch.log_softmax(data["teacher_logits"][..., :VOCAB].double(), dim=-1)
        loss = (log_s.exp() * (log_s - log_t)).sum(-1)[m].sum() / n
    loss.backward()
    return _flat_grads(chunks), loss.item()


def _schedule(chunks, cfg, data, rows, micro_rows, kind, dp_group):
    """One step through get_forward_backward_func over ``rows`` of the step in micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = [
        {k: v[i : i + micro_rows] for k, v in data.items()}
        for i in range(rows.start, rows.stop, micro_rows)
    ]
    moments = None
    if kind == "zscore":  # step-wide moments from a forward-only pass of the pre-update student
        with torch.no_grad():
            lp_s = [
                sampled_token_logprobs(_logits(chunks[0], mb), mb["targets"], VOCAB) for mb in micro
            ]
        moments = step_log_ratio_moments(
            [mb["teacher_logprobs"] for mb in micro],
            lp_s,
            [mb["loss_mask"] for mb in micro],
            dp_group,
        )

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        loss_func = opd_loss_func(
            targets=mb["targets"],
            loss_mask=mb["loss_mask"],
            reward_cfg=REWARD_CFGS[kind],
            vocab_size=VOCAB,
            tp_group=None,
            teacher_logprobs=mb["teacher_logprobs"],
            teacher_logits=mb["teacher_logits"] if kind == "full_vocab_kl" else None,
            zscore_moments=moments,
        )
        return _logits(model, mb), loss_func

    require_per_token_loss(cfg)
    for c in chunks:
        c.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=chunks,
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=micro_rows,
        forward_only=False,
    )
    return _flat_grads(chunks), reduce_reports(reports, dp_group)


def _dp1_runs():
    distributed.initialize(ParallelConfig(1, 1), seed=0)
    try:
        cfg, chunks = _build()
        data = _step_data()
        out = {}
        for kind in KINDS:
            ref, ref_loss = _reference(chunks, data, kind)
            whole = _schedule(chunks, cfg, data, range(0, ROWS), ROWS, kind, None)
            split = _schedule(chunks, cfg, data, range(0, ROWS), 2, kind, None)
            out[kind] = dict(ref=ref, ref_loss=ref_loss, whole=whole, split=split)
        return out, int(data["loss_mask"].sum())
    finally:
        distributed.teardown()


def _dp_rank():
    """One rank of DP 2: its half of the step, two micro-batches of two."""
    from megatron.core import parallel_state

    distributed.initialize(ParallelConfig(1, 1), seed=0)
    cfg, chunks = _build()
    data = _step_data()
    rank = parallel_state.get_data_parallel_rank()
    group = parallel_state.get_data_parallel_group()
    rows = range(rank * ROWS // 2, (rank + 1) * ROWS // 2)
    return {kind: _schedule(chunks, cfg, data, rows, 2, kind, group) for kind in KINDS}


@pytest.fixture(scope="module")
def dp1():
    return _dp1_runs()


def _assert_grads_equal(got, ref, what):
    assert ref.abs().max() > 1e-4, "the test gradient must not be trivially zero"
    torch.testing.assert_close(
        got, ref.float(), rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=what
    )


@pytest.mark.parametrize("kind", KINDS)
def test_step_gradient_is_token_mean_over_step(dp1, kind):
    runs, n_tokens = dp1
    r = runs[kind]
    _assert_grads_equal(r["whole"][0], r["ref"], f"{kind}: 1 micro-batch of 8 vs autograd")
    _assert_grads_equal(r["split"][0], r["ref"], f"{kind}: 4 micro-batches of 2 vs autograd")
    for report in (r["whole"][1], r["split"][1]):
        assert report["num_tokens"] == n_tokens
        assert report["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-7)


def test_report_does_not_depend_on_split(dp1):
    runs, _ = dp1
    whole, split = runs["zscore"]["whole"][1], runs["zscore"]["split"][1]
    assert whole.keys() == split.keys()
    for key in whole:
        assert whole[key] == pytest.approx(split[key], rel=1e-5, abs=1e-6, nan_ok=True), key
    # z-scored over the step: mean 0 and std 1 over all of its tokens
    assert abs(whole["reward_mean"]) < 1e-5 and whole["reward_std"] == pytest.approx(1.0, 1e-5)
    assert whole["reward_min"] <= whole["reward_p1"] <= whole["reward_p50"] <= whole["reward_p99"]


@pytest.mark.slow
def test_dp2_equals_dp1(dp1):
    runs, n_tokens = dp1
    ranks = run_distributed(_dp_rank, 2, timeout=240)
    for kind in KINDS:
        for grads, report in (r[kind] for r in ranks):
            _assert_grads_equal(grads, runs[kind]["ref"], f"{kind}: DP2 vs autograd at DP1")
            assert report["num_tokens"] == n_tokens
            for key, value in runs[kind]["split"][1].items():
                assert report[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (
                    kind,
                    key,
                )


# ---------------------------------------------------------------------------------------------
# Loss mask, configuration errors


def test_loss_mask_drops_final_stop_token_unless_truncated():
    prompt = torch.tensor([2, 3, 1])
    response = torch.tensor([3, 2, 4])
    truncated = torch.tensor([False, True, False])
    got = build_loss_mask(prompt, response, truncated, 6)
    # position i predicts token i + 1: row 0 scores tokens 2, 3 (token 4 is its stop token)
    expected = torch.tensor(
        [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(got, expected)
    keep = build_loss_mask(prompt, response, truncated, 6, mask_final_stop_token=False)
    assert torch.equal(
        keep, expected | torch.tensor([[0, 0, 0, 1, 0, 0], [0] * 6, [0, 0, 0, 1, 0, 0]]).bool()
    )
    with pytest.raises(ValueError, match="longer than the sequence length 6"):
        build_loss_mask(torch.tensor([3]), torch.tensor([4]), torch.tensor([True]), 6)


def test_configuration_errors():
    class Config:
        calculate_per_token_loss = False
        finalize_model_grads_func = None

    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        require_per_token_loss(Config())
    Config.calculate_per_token_loss = True
    with pytest.raises(ValueError, match="finalize_model_grads_func"):
        require_per_token_loss(Config())
    common = dict(
        targets=torch.zeros(1, 2, dtype=torch.long),
        loss_mask=torch.ones(1, 2),
        vocab_size=VOCAB,
        tp_group=None,
    )
    with pytest.raises(ValueError, match="full_vocab_kl needs the teacher's logits"):
        opd_loss_func(reward_cfg=RewardConfig(kind="full_vocab_kl"), **common)
    with pytest.raises(ValueError, match="zscore needs the step's log-ratio moments"):
        opd_loss_func(
            reward_cfg=RewardConfig(kind="zscore"), teacher_logprobs=torch.zeros(1, 2), **common
        )
    with pytest.raises(ValueError, match="--opd-alpha must be > 0"):
        opd_loss_func(
            reward_cfg=RewardConfig(alpha=0.0), teacher_logprobs=torch.zeros(1, 2), **common
        )
