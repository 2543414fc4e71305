"""Qwen3/Llama GPTModels on TP x PP layouts equal TP1, forward and one training step."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.models import gpt
from megatron_opd.runtime import checkpointing, distributed
from megatron_opd.runtime.distributed import ParallelConfig
from megatron_opd.runtime.spawn import run_distributed

VOCAB = 250  # pads to 256: the padded columns exist in every layout below
SEQ, BATCH = 12, 2


def tiny_arch(model_type: str = "qwen3", tied: bool = False, layers: int = 4) -> gpt.ArchConfig:
    return gpt.ArchConfig(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # != hidden / heads, as in Qwen3
        rope_theta=1_000_000.0,
        tie_word_embeddings=tied,
    )


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _build(arch, tp, pp, vpp=None, **overrides):
    cfg = gpt.transformer_config(arch, tp, pp, vpp, **overrides)
    return cfg, gpt.build_model(arch, cfg, distributed.student_grid())


def _full_logits(chunks, cfg, tokens) -> torch.Tensor | None:
    """Forward through Megatron's pipeline schedule; full-vocab logits on the last stage."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tok = next(data_iterator)
        out = model(tok, gpt.position_ids(*tok.shape), gpt.causal_mask(tok.shape[1]))
        return out, None

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=chunks,
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0].contiguous())
    return logits[..., :VOCAB].detach()


def _save_reference(path, arch) -> torch.Tensor:
    distributed.initialize(ParallelConfig(1, 1), seed=11)
    try:
        cfg, chunks = _build(arch, 1, 1)
        checkpointing.save_model(chunks, path)
        return _full_logits(chunks, cfg, fixed_batch()[0])
    finally:
        distributed.teardown()


def _logits_at_layout(path, arch, tp, pp):
    distributed.initialize(
        ParallelConfig(tp, pp), seed=99
    )  # other seed: weights must come from disk
    cfg, chunks = _build(arch, tp, pp)
    checkpointing.load_model(chunks, path)
    return _full_logits(chunks, cfg, fixed_batch()[0])


def _last_stage_value(results):
    values = [r for r in results if r is not None]
    assert values, "no rank returned the last stage's output"
    for v in values[1:]:
        assert torch.equal(v, values[0]) if isinstance(v, torch.Tensor) else v == values[0]
    return values[0]


@pytest.fixture(scope="module")
def qwen3_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3") / "ckpt"
    arch = tiny_arch()
    return path, arch, _save_reference(path, arch)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_qwen3_logits_match_tp1(qwen3_reference, tp, pp):
    path, arch, ref = qwen3_reference
    got = _last_stage_value(run_distributed(_logits_at_layout, tp * pp, path, arch, tp, pp))
    assert got.shape == ref.shape == (BATCH, SEQ, VOCAB)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_llama_tied_embeddings_pp2(tmp_path):
    arch = tiny_arch("llama", tied=True, layers=2)
    ref = _save_reference(tmp_path / "ckpt", arch)
    got = _last_stage_value(run_distributed(_logits_at_layout, 2, tmp_path / "ckpt", arch, 1, 2))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# One training step with Megatron DDP + optimizer


def _train_step(path, arch, tp, pp, vpp=None):
    """One optimizer step: (token-mean loss, grad norm, layer 0's q_layernorm weight after it)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    distributed.initialize(ParallelConfig(tp, pp, vpp), seed=5)
    cfg, chunks = _build(arch, tp, pp, vpp, calculate_per_token_loss=True)
    checkpointing.load_model(chunks, path)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    chunks = [DistributedDataParallel(cfg, ddp_cfg, c) for c in chunks]
    cfg.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=1.0, clip_grad=1.0, weight_decay=0.0), chunks
    )
    tokens, labels = fixed_batch()
    micro = [(tokens[i : i + 1], labels[i : i + 1]) for i in range(BATCH)]

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        per_token = model(
            tok, gpt.position_ids(*tok.shape), gpt.causal_mask(tok.shape[1]), labels=lab
        )

        def loss_func(loss):
            total = loss.float().sum()
            count = torch.tensor(loss.numel(), dtype=torch.int)
            return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

        return per_token, loss_func

    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro) for _ in chunks] if vpp else iter(micro),
        model=chunks,
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok
    qnorm = None  # layer 0 lives on the first stage ("layers.0" on other stages is a later layer)
    for c in chunks[:1] if parallel_state.is_pipeline_first_stage() else []:
        for name, p in c.named_parameters():
            if name.endswith("decoder.layers.0.self_attention.q_layernorm.weight"):
                qnorm = p.detach().clone()
    if parallel_state.is_pipeline_last_stage():
        s = torch.stack([r["lm loss"] for r in reports]).sum(0)
        loss = (s[0] / s[1]).item()
    else:
        loss = None
    return loss, grad_norm, qnorm


@pytest.mark.slow
def test_training_step_matches_across_layouts(qwen3_reference):
    path, arch, _ = qwen3_reference
    ref_loss, ref_norm, ref_q = run_distributed(_train_step, 1, path, arch, 1, 1)[0]
    # (1, 2, 2): interleaved pipeline, 2 virtual stages of 1 layer each per rank
    for tp, pp, vpp in [(2, 1, None), (1, 2, None), (1, 2, 2)]:
        results = run_distributed(_train_step, tp * pp, path, arch, tp, pp, vpp)
        loss = _last_stage_value([r[0] for r in results])
        assert loss == pytest.approx(ref_loss, abs=1e-5), (tp, pp, vpp)
        for _, norm, _ in results:
            assert norm == pytest.approx(ref_norm, rel=1e-5), (tp, pp, vpp)
        # q_layernorm is replicated across TP: its update must use the TP-reduced gradient
        for _, _, q in results:
            if q is not None:
                torch.testing.assert_close(q, ref_q, rtol=0, atol=1e-6)
    assert ref_norm > 0


# ---------------------------------------------------------------------------------------------
# Bad descriptions


def test_tp_must_divide_heads():
    arch = tiny_arch()
    with pytest.raises(
        ValueError, match="--tensor-model-parallel-size 8 does not divide num_attention_heads 4"
    ):
        gpt.validate_layout(arch, 8, 1)


def test_tp_must_divide_query_groups():
    arch = gpt.ArchConfig(
        model_type="qwen3",
        vocab_size=10,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
    )
    with pytest.raises(ValueError, match="does not divide num_key_value_heads"):
        gpt.validate_layout(arch, 2, 1)


def test_tp_must_divide_intermediate_size():
    """Else Megatron fails while building: '160 is not divisible by 3 when instantiating
    ColumnParallelLinear', naming no flag."""
    arch = gpt.ArchConfig(
        model_type="qwen3",
        vocab_size=10,
        hidden_size=48,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=6,
    )
    gpt.validate_layout(arch, 2, 1)  # 160 / 2: fine
    with pytest.raises(
        ValueError,
        match=r"--tensor-model-parallel-size 3 does not divide intermediate_size .* 160",
    ):
        gpt.validate_layout(arch, 3, 1)


def test_pp_larger_than_layers():
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 8 is larger than"):
        gpt.validate_layout(tiny_arch(layers=4), 1, 8)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    with pytest.raises(
        ValueError, match="unsupported architecture 'gpt2'; supported: qwen3, llama"
    ):
        gpt.ArchConfig.from_file(tmp_path)


def test_missing_field(tmp_path):
    (tmp_path / "arch.yaml").write_text(
        "model_type: qwen3\nvocab_size: 10\nhidden_size: 8\nintermediate_size: 8\n"
        "num_attention_heads: 2\n"
    )
    with pytest.raises(ValueError, match="missing required field 'num_hidden_layers'"):
        gpt.ArchConfig.from_file(tmp_path / "arch.yaml")


def test_yaml_and_hf_config_agree(tmp_path):
    import json

    import yaml

    raw = tiny_arch().to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(raw))
    a, b = (
        gpt.ArchConfig.from_file(tmp_path),
        gpt.ArchConfig.from_file(tmp_path / "arch.yaml"),
    )
    assert a == b == tiny_arch()


def test_padded_vocab_size():
    assert gpt.padded_vocab_size(151_936, 128, 1) == 151_936
    assert gpt.padded_vocab_size(151_936, 128, 8) == 152_576
    assert gpt.padded_vocab_size(49_152, 128, 3) == 49_152
    assert gpt.padded_vocab_size(250, 128, 2) == 256


def test_checkpoint_built_models_keep_tensor_parallel_attributes():
    """Megatron marks TP-sharded weights only in its initializer; a model built to be loaded
    (perform_initialization=False) must still carry the marks, or the grad norm is wrong at TP>1."""
    distributed.initialize(ParallelConfig(1, 1), seed=3)
    try:
        arch = tiny_arch()
        marks = []
        for init in (True, False):
            _, chunks = _build(arch, 1, 1, perform_initialization=init)
            marks.append(
                {
                    n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", -1))
                    for n, p in chunks[0].named_parameters()
                }
            )
        assert marks[0] == marks[1]
        assert marks[1]["decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1)
        assert marks[1]["output_layer.weight"] == (True, 0)
    finally:
        distributed.teardown()


def test_rope_theta_conflict_is_refused(tmp_path):
    import json

    raw = tiny_arch().to_hf_dict()
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert gpt.ArchConfig.from_file(tmp_path) == tiny_arch()  # agreeing: fine
    raw["rope_parameters"]["rope_theta"] = 10_000.0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as excinfo:
        gpt.ArchConfig.from_file(tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: rope_theta 1000000.0 and ")
    assert "rope_parameters.rope_theta 10000.0 disagree" in message and "\n" not in message


def test_invalid_architecture_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", ')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON: "):
        gpt.ArchConfig.from_file(tmp_path)
    (tmp_path / "arch.yaml").write_text("model_type: [qwen3\n")
    with pytest.raises(ValueError, match=r"arch.yaml is not valid YAML: "):
        gpt.ArchConfig.from_file(tmp_path / "arch.yaml")
