"""Megatron-Core's inference API across the supported range, and two patches of its behaviour.

What differs between 0.16 and 0.19 (``megatron/core/inference``), each bridged by a function here
that detects the feature (:mod:`megatron_opd.compat.versions`):

* ``InferenceWrapperConfig`` is gone in 0.19: the wrapper takes ``(model, context)`` and reads the
  process groups, and the controller its pipeline group, from ``context.config.pg_collection``
  (0.16: ``pg_collection=`` / ``pp_group=`` arguments) -> :func:`wrap_model`,
  :func:`make_controller`.
* ``DynamicInferenceContext.from_config`` and ``DynamicInferenceEngine(random_seed=)`` are gone in
  0.19 -> :func:`make_dynamic_context`, :func:`make_dynamic_engine`.
* 0.19's dynamic engine trims a one-token stop word from the output unless
  ``SamplingParams.detokenize_stop_sequence`` -> :func:`keep_stop_tokens`.
* 0.19's engines set a process-wide ``InferenceMode`` flag that models read instead of
  ``self.training``, and the static engine never clears it -> :func:`engine_finished` after every
  rollout, :func:`inference_mode` for forwards run on an inference context without an engine.
* ``TextGenerationController`` is the controller in both (0.16's ``SimpleTextGenerationController``
  was an alias, removed in 0.19) -> :func:`controller_class`.

Behaviour patches, every platform: rotary embeddings applied once per cached key (speed only),
the static engine's progress bar kept off training logs, and a row-parallel matmul that names its
own group (so a decode step through it can be traced and captured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

from megatron_opd.compat import versions


def controller_class():
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    return TextGenerationController


def wrapper_config(model_config, padded_vocab: int, max_batch: int, max_length: int):
    """0.16's ``InferenceWrapperConfig`` for these limits; ``None`` where it no longer exists (the
    limits then come from the context, the padded width from ``GPTModel.vocab_size``)."""
    if not versions.has_inference_wrapper_config():
        return None
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )

    return InferenceWrapperConfig(
        hidden_size=model_config.hidden_size,
        params_dtype=model_config.params_dtype,
        inference_batch_times_seqlen_threshold=-1,  # no micro-batching across pipeline stages
        padded_vocab_size=padded_vocab,
        inference_max_requests=max_batch,
        inference_max_seq_length=max_length,
    )


def wrap_model(wrapper_cls, model, config, context, pg_collection=None, **kwargs):
    """``wrapper_cls(model, ...)`` (a ``GPTInferenceWrapper`` subclass) on ``context``, running
    on ``pg_collection``'s groups (Megatron's global ones when ``None``). ``config``: what
    :func:`wrapper_config` returned."""
    if config is not None:
        return wrapper_cls(model, config, context, pg_collection=pg_collection, **kwargs)
    if pg_collection is not None:
        context.config.pg_collection = pg_collection
    return wrapper_cls(model, context, **kwargs)


def make_controller(controller_cls, wrapped, tokenizer, pp_group, **kwargs):
    if versions.has_inference_wrapper_config():
        return controller_cls(wrapped, tokenizer, pp_group=pp_group, **kwargs)
    return controller_cls(wrapped, tokenizer, **kwargs)  # the groups came with the context


def make_dynamic_context(model, config, max_batch: int, max_length: int, buffer_size_gb: float):
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext

    if versions.dynamic_context_from_config():
        return DynamicInferenceContext.from_config(
            inference_config=config,
            model=model,
            max_batch_size=max_batch,
            buffer_size_gb=buffer_size_gb,
        )
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.utils import get_model_config

    return DynamicInferenceContext(
        get_model_config(model),
        InferenceConfig(
            max_sequence_length=max_length,
            buffer_size_gb=buffer_size_gb,
            max_requests=max_batch,
            materialize_only_last_token_logits=True,
        ),
    )


def make_dynamic_engine(controller, context, seed: int):
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine

    if versions.dynamic_engine_takes_seed():
        return DynamicInferenceEngine(controller, context, random_seed=seed)
    return DynamicInferenceEngine(controller, context)  # the controller's sampling_rng is seeded


def keep_stop_tokens(params):
    """Sampling params whose stop word stays in the generated tokens (0.16 always kept it)."""
    if any(f.name == "detokenize_stop_sequence" for f in dataclasses.fields(params)):
        params.detokenize_stop_sequence = True
    return params


@functools.cache
def _inference_mode_flag():
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:  # 0.16: models branch on inference_context and self.training
        return None
    return InferenceMode


def engine_finished() -> None:
    """Clear the flag an engine set, so that the next training or teacher forward is not run as
    inference (a no-op where the flag does not exist)."""
    flag = _inference_mode_flag()
    if flag is not None:
        flag.unset_active()


@contextlib.contextmanager
def inference_mode():
    """The flag an engine sets, for a forward run on an inference context without one."""
    flag = _inference_mode_flag()
    if flag is None:
        yield
        return
    flag.set_active()
    try:
        yield
    finally:
        flag.unset_active()


def apply() -> None:
    _install_static_cache_rotary()
    _quiet_static_engine_progress()
    _no_stack_dump_on_sigterm()
    _row_parallel_matmul_on_its_own_group()


# --------------------------------------------------------------------------------------------
# Behaviour patches


def _install_static_cache_rotary() -> None:
    """Megatron-Core's static KV cache (0.16 and 0.19 alike) (``transformer/attention.py``,
    ``_adjust_key_value_for_inference`` without ``flash_decode``) stores keys *before* rotary and
    hands back the whole cache with the rotary table up to the current position, so every decode
    step re-rotates every cached key of every layer (``apply_rotary_pos_emb`` over ``[s, b, g, d]``:
    cos, sin, a rotate-half ``cat`` and two products per element; ~40% of a decode step on the
    SmolLM2 student). Rotating only the new keys before they are cached and passing no key
    rotary table back gives the same keys (position ``i`` is rotated by angle ``i`` either way, by
    the same elementwise ops), at O(1) instead of O(s) per step. The dynamic engine already
    caches rotated keys; ``flash_decode`` has its own path; both are left alone."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import attention

    cls = attention.Attention
    original = cls._adjust_key_value_for_inference
    if getattr(original, "_megatron_opd_rotary", False):
        return
    concentration = attention._yarn_get_concentration_factor_from_config

    @functools.wraps(original)
    def adjust(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        context = (
            inference_context if inference_context is not None else kwargs.get("inference_params")
        )
        if (
            context is None
            or not context.is_static_batching()
            or self.config.flash_decode
            or not isinstance(rotary_pos_emb, tuple)
            or rotary_pos_emb[1] is None
        ):
            return original(
                self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        start = context.sequence_len_offset
        key = apply_rotary_pos_emb(
            key,
            rotary_pos_emb[1][start : start + key.size(0)],
            config=self.config,
            mscale=concentration(self.config),
            cp_group=self.pg_collection.cp,
        )
        out = original(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        query, key, value, (q_pos_emb, _), mask_type, block_table = out
        return query, key, value, (q_pos_emb, None), mask_type, block_table

    adjust._megatron_opd_rotary = True
    cls._adjust_key_value_for_inference = adjust


def _quiet_static_engine_progress() -> None:
    """``StaticInferenceEngine.generate`` opens a "static requests" tqdm bar for every call, so a
    training log gets one per rollout. Keep it only on an interactive terminal, and let it vanish
    when done."""
    try:
        from megatron.core.inference.engines import static_engine
    except ImportError:
        return
    bar = getattr(static_engine, "tqdm", None)
    if bar is None or getattr(bar, "_megatron_opd_quiet", False):
        return

    def quiet_bar(*args, **kwargs):
        kwargs.setdefault("disable", None)  # tqdm: None disables it when stderr is not a TTY
        kwargs.setdefault("leave", False)
        return bar(*args, **kwargs)

    quiet_bar._megatron_opd_quiet = True
    static_engine.tqdm = quiet_bar


def _no_stack_dump_on_sigterm() -> None:
    """Megatron-Core's ``inference/data_parallel_inference_coordinator.py`` (imported with its
    inference engines) registers ``faulthandler`` for SIGTERM at import: every rank that torchrun
    stops after another rank failed then prints a stack dump. Unregistered once imported."""
    import faulthandler
    import signal
    import sys

    if "megatron.core.inference.data_parallel_inference_coordinator" in sys.modules:
        faulthandler.unregister(signal.SIGTERM)


def _row_parallel_matmul_on_its_own_group() -> None:
    """``RowParallelLinear.forward`` (0.16 and 0.19 alike, ``tensor_parallel/layers.py``) passes
    ``tp_group=None`` to its matmul, which then looks up Megatron's global tensor-parallel group
    and, on global rank 0, calls ``warnings.warn`` on every forward. The group is only read by the
    backward of a sequence-parallel or dgrad all-reduce, which a row-parallel layer never does, so
    handing it the layer's own group changes no number. It does make the forward traceable by
    ``torch.compile(fullgraph=True)`` (which cannot trace ``warnings.warn`` with a category
    argument), the CPU stand-in for the graph engine's capture, and keeps a layer on its own grid
    (a rollout copy, a teacher) off the global group."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    original = RowParallelLinear._forward_impl
    if getattr(original, "_megatron_opd_group", False):
        return

    @functools.wraps(original)
    def forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group", 0) is None:
            kwargs["tp_group"] = self.tp_group
        return original(self, input, weight, *args, **kwargs)

    forward_impl._megatron_opd_group = True
    RowParallelLinear._forward_impl = forward_impl
