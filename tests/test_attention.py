"""SDPAttention equals Megatron-Core's local DotProductAttention: forward and gradients of q, k, v
(float64), MHA and GQA, causal, padded masks, decode against a KV cache; a whole GPTModel."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.models import gpt
from megatron_opd.runtime import distributed
from megatron_opd.runtime.distributed import ParallelConfig

HN = 8


@pytest.fixture(scope="module", autouse=True)
def megatron():
    distributed.initialize(ParallelConfig(1, 1), seed=0)
    yield
    distributed.teardown()


def _config(heads: int, groups: int, **overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=heads * HN,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=HN,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _pair(heads: int, groups: int, layer_number: int = 1, **overrides):
    """(Megatron's DotProductAttention, SDPAttention) on the same config, causal."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_opd.models.attention import SDPAttention

    cfg = _config(heads, groups, **overrides)
    args = dict(
        config=cfg,
        layer_number=layer_number,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
    )
    return DotProductAttention(**args), SDPAttention(**args)


def _inputs(sq, sk, b, heads, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, HN, generator=g, dtype=torch.float64)
    k = torch.randn(sk, b, groups, HN, generator=g, dtype=torch.float64)
    v = torch.randn(sk, b, groups, HN, generator=g, dtype=torch.float64)
    return q, k, v


def _run(module, q, k, v, mask, weight):
    """Output and the gradients of q, k, v of ``sum(out * weight)``."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _left_pad_mask(sq: int, sk: int, pads: list[int]) -> torch.Tensor:
    """``[b, 1, sq, sk]``, True = not allowed: bottom-right causal OR the key is a left pad."""
    causal = ~torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    pad = torch.arange(sk)[None, :] < torch.tensor(pads)[:, None]  # [b, sk]
    return causal[None, None] | pad[:, None, None, :]


def _assert_same(ours, ref, rows=None):
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        if rows is not None and name in ("out", "dq"):
            a, r = a[rows], r[rows]
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("heads,groups", [(4, 4), (6, 2)])
def test_causal_without_mask(heads, groups):
    ref_mod, ours_mod = _pair(heads, groups)
    q, k, v = _inputs(11, 11, 3, heads, groups)
    weight = torch.randn(11, 3, heads * HN, dtype=torch.float64)
    _assert_same(_run(ours_mod, q, k, v, None, weight), _run(ref_mod, q, k, v, None, weight))


@pytest.mark.parametrize("heads,groups", [(4, 4), (6, 2)])
def test_explicit_causal_mask_broadcast_over_batch(heads, groups):
    ref_mod, ours_mod = _pair(heads, groups)
    q, k, v = _inputs(9, 9, 2, heads, groups, seed=1)
    mask = gpt.causal_mask(9)  # [1, 1, s, s]
    weight = torch.randn(9, 2, heads * HN, dtype=torch.float64)
    _assert_same(_run(ours_mod, q, k, v, mask, weight), _run(ref_mod, q, k, v, mask, weight))


@pytest.mark.parametrize("heads,groups", [(4, 4), (6, 2)])
def test_left_padded_prefill_mask(heads, groups):
    """Rows of different left padding. A pad query sees no key: Megatron gives it the mean of
    the values, SDPA zeros; the loss ignores pad positions as training does, and every real
    position's output and every gradient must agree."""
    ref_mod, ours_mod = _pair(heads, groups)
    s, pads = 10, [0, 3, 7]
    q, k, v = _inputs(s, s, 3, heads, groups, seed=2)
    mask = _left_pad_mask(s, s, pads)
    real = torch.arange(s)[:, None] >= torch.tensor(pads)[None, :]  # [s, b]
    weight = torch.randn(s, 3, heads * HN, dtype=torch.float64) * real[..., None]
    ours = _run(ours_mod, q, k, v, mask, weight)
    _assert_same(ours, _run(ref_mod, q, k, v, mask, weight), rows=real)
    assert torch.isfinite(ours[0]).all()


@pytest.mark.parametrize("heads,groups", [(4, 4), (6, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_against_kv_cache(heads, groups, padded):
    """One query per row against 17 cached keys, the mask ``[b, 1, 1, sk]`` the rollout passes;
    the last row sees no key at all (finite, the mean of the values as in Megatron)."""
    ref_mod, ours_mod = _pair(heads, groups)
    sk, pads = 17, [0, 4, 17]
    q, k, v = _inputs(1, sk, 3, heads, groups, seed=3)
    mask = _left_pad_mask(1, sk, pads) if padded else None
    weight = torch.randn(1, 3, heads * HN, dtype=torch.float64)
    _assert_same(_run(ours_mod, q, k, v, mask, weight), _run(ref_mod, q, k, v, mask, weight))


def test_causal_chunk_after_cache_aligns_bottom_right():
    """sq < sk without a mask (a prefill chunk after cached keys): query i sees keys
    <= sk - sq + i. Megatron's module refuses it, so it gets that mask explicitly."""
    ref_mod, ours_mod = _pair(6, 3)
    q, k, v = _inputs(4, 10, 2, 6, 3, seed=4)
    weight = torch.randn(4, 2, 6 * HN, dtype=torch.float64)
    explicit = _left_pad_mask(4, 10, [0, 0])
    _assert_same(_run(ours_mod, q, k, v, None, weight), _run(ref_mod, q, k, v, explicit, weight))


def test_query_key_layer_scaling_and_given_scale():
    ref_mod, ours_mod = _pair(4, 2, layer_number=3, apply_query_key_layer_scaling=True)
    q, k, v = _inputs(7, 7, 2, 4, 2, seed=5)
    weight = torch.randn(7, 2, 4 * HN, dtype=torch.float64)
    _assert_same(_run(ours_mod, q, k, v, None, weight), _run(ref_mod, q, k, v, None, weight))
    ref_mod, ours_mod = _pair(4, 2, softmax_scale=0.05)
    _assert_same(_run(ours_mod, q, k, v, None, weight), _run(ref_mod, q, k, v, None, weight))


def test_dropout_draws_from_the_model_parallel_rng_fork():
    """Dropout acts in training only; the same tracker seed gives the same drop pattern, and the
    default generator is left alone, as in Megatron's module."""
    from megatron.core import tensor_parallel

    _, ours_mod = _pair(4, 2, attention_dropout=0.5)
    q, k, v = _inputs(8, 8, 2, 4, 2, seed=6)
    ours_mod.eval()
    ref_mod, no_dropout = _pair(4, 2)
    plain = no_dropout(q, k, v, None)
    torch.testing.assert_close(ours_mod(q, k, v, None), plain)
    torch.testing.assert_close(ref_mod(q, k, v, None), plain)
    ours_mod.train()
    outs = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        before = torch.get_rng_state()
        outs.append(ours_mod(q, k, v, None))
        assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert (outs[0] - plain).abs().max() > 0.1


def test_unsupported_features_are_refused():
    from megatron.core.packed_seq_params import PackedSeqParams

    with pytest.raises(ValueError, match="sliding-window"):
        _pair(4, 2, window_size=(4, 0))
    with pytest.raises(ValueError, match="softmax_type"):
        _pair(4, 2, softmax_type="off-by-one")
    _, ours_mod = _pair(4, 2)
    q, k, v = _inputs(3, 3, 1, 4, 2)
    with pytest.raises(NotImplementedError, match="packed_seq_params"):
        ours_mod(q, k, v, None, packed_seq_params=PackedSeqParams())
    with pytest.raises(NotImplementedError, match="attention_bias"):
        ours_mod(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(TypeError, match="boolean"):
        ours_mod(q, k, v, torch.zeros(1, 1, 3, 3))


def _model_with_either_attention():
    """A tiny GPTModel (4 heads, 2 query groups) built by the project's spec at the current TP,
    run with SDPAttention and again with Megatron's module swapped into the same model, on a
    left-padded batch: (logits of real tokens, parameter gradients) for each."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opd.models.attention import SDPAttention

    arch = gpt.ArchConfig(
        model_type="qwen3",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    cfg = gpt.transformer_config(arch, parallel_state.get_tensor_model_parallel_world_size())
    (model,) = gpt.build_model(arch, cfg, distributed.student_grid())
    layers = model.decoder.layers
    assert all(isinstance(layer.self_attention.core_attention, SDPAttention) for layer in layers)
    b, s, pads = 3, 12, [0, 2, 5]
    tokens = torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(8))
    mask = _left_pad_mask(s, s, pads)
    real = (torch.arange(s)[None, :] >= torch.tensor(pads)[:, None]).float()  # [b, s]

    def run():
        model.zero_grad()
        logits = model(tokens, gpt.position_ids(b, s), mask)  # [b, s, vocab / tp]
        (logits.log_softmax(-1)[..., 0] * real).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return logits.detach() * real[..., None], grads

    ours = run()
    for layer in layers:
        sa = layer.self_attention
        sa.core_attention = DotProductAttention(
            config=cfg,
            layer_number=sa.layer_number,
            attn_mask_type=sa.attn_mask_type,
            attention_type="self",
            pg_collection=sa.pg_collection,
        )
    return ours, run()


def _assert_models_agree(ours, ref):
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    for name, grad in ref[1].items():
        torch.testing.assert_close(ours[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gpt_model_logits_and_gradients_match_megatron_attention():
    """The project's layer spec uses SDPAttention; swapping Megatron's module back into the same
    model gives the same logits and parameter gradients (fp32, left-padded batch)."""
    _assert_models_agree(*_model_with_either_attention())


def _tp2_rank():
    distributed.initialize(ParallelConfig(2, 1), seed=0)
    ours, ref = _model_with_either_attention()
    _assert_models_agree(ours, ref)  # a failure is reported with this rank's traceback
    return ours[0].shape[-1]


@pytest.mark.slow
def test_gpt_model_at_tp2_matches_megatron_attention():
    """Heads and query groups per TP partition (2 and 1 of 4 and 2): each rank's vocab-shard
    logits and gradients with SDPAttention equal those with Megatron's module."""
    from megatron_opd.runtime.spawn import run_distributed

    assert run_distributed(_tp2_rank, 2) == [128, 128]


@pytest.mark.parametrize("sq,sk", [(6, 6), (1, 13)])
def test_bf16_prefill_and_decode(sq, sk):
    """bf16 inputs, softmax in fp32 as Megatron's default: the same up to bf16 rounding."""
    ref_mod, ours_mod = _pair(6, 2, bf16=True, params_dtype=torch.bfloat16)
    q, k, v = (t.to(torch.bfloat16) for t in _inputs(sq, sk, 2, 6, 2, seed=9))
    mask = _left_pad_mask(sq, sk, [0, 3])
    ours, ref = ours_mod(q, k, v, mask), ref_mod(q, k, v, mask)
    assert ours.dtype == torch.bfloat16
    real = torch.arange(sk - sq, sk)[:, None] >= torch.tensor([0, 3])[None, :]  # [sq, b]
    torch.testing.assert_close(ours[real].float(), ref[real].float(), atol=2e-2, rtol=2e-2)
