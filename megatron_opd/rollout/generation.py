"""Sampling from the model's own weights: the one call every rollout source and evaluation makes.

:func:`generate` checks the request, resolves ``--rollout-engine`` (``auto``) for the model, and
hands the batch to that model's engine (:mod:`megatron_opd.rollout.engines`: Megatron-Core's static
and dynamic engines, or this project's captured decode step), built once and kept with the model.
It runs on every rank of the model-parallel group (TP and PP ranks all return the same result)
and leaves the model in the train/eval mode it found it in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from megatron_opd.rollout import engines
from megatron_opd.rollout.engines.base import Generation, Sampling
from megatron_opd.rollout.engines.megatron import dynamic_engine_unavailable, left_padding_supported
from megatron_opd.rollout.engines.sampling import sample_categorical
from megatron_opd.runtime.checkpointing import unwrap

__all__ = [
    "Generation",
    "dynamic_engine_unavailable",
    "generate",
    "left_padding_supported",
    "sample_categorical",
]


def generate(
    model_chunks: list[torch.nn.Module],
    tokenizer,
    prompts_token_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    greedy: bool = False,
    stop_token_ids: Optional[Sequence[int]] = None,
    vocab_size: Optional[int] = None,
    max_batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    return_logprobs: bool = True,
    engine: str = "static",
    pg_collection=None,
) -> list[Generation]:
    """Continue each prompt with up to ``max_new_tokens`` tokens; one :class:`Generation` each.

    ``tokenizer``: a :class:`megatron_opd.models.tokenizer.Tokenizer` (its ``pad_id``, and its
    ``stop_token_ids`` unless ``stop_token_ids`` is given). ``vocab_size``: ids at or above it are
    never sampled; defaults to the model's true vocabulary size (``build_model`` records it).
    ``greedy`` takes the argmax and ignores the sampling knobs; otherwise sampling at
    ``temperature`` with at most one of ``top_k`` / ``top_p``. ``seed`` seeds the sampler (give each
    data-parallel rank its own); model-parallel ranks must pass the same one.
    ``return_logprobs=False`` leaves each ``Generation.logprobs`` empty and skips their cost.
    ``engine``: a name in :data:`megatron_opd.rollout.engines.ENGINES` (``static``, the default;
    ``dynamic``: CUDA and flash-attn only; ``graph``: the captured decode step) or ``auto``
    (``graph`` on CUDA where it supports the model, else ``static``).
    ``pg_collection``: the model's own process groups (a rollout copy on its own grid,
    :mod:`megatron_opd.rollout.refit`); by default Megatron's global ones.
    """
    if len(model_chunks) != 1:
        raise ValueError(
            "generation needs one model chunk per rank; unset "
            "--num-layers-per-virtual-pipeline-stage for rollouts"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k > 0 and top_p > 0:
            raise ValueError("set at most one of top_k and top_p")
    if not prompts_token_ids or any(len(p) == 0 for p in prompts_token_ids):
        raise ValueError("every prompt needs at least one token")

    model = model_chunks[0]
    vocab_size = vocab_size or getattr(unwrap(model), "true_vocab_size", None)
    stop_token_ids = tokenizer.stop_token_ids if stop_token_ids is None else stop_token_ids
    sampling = Sampling(
        max_new_tokens=int(max_new_tokens),
        stop_token_ids=tuple(sorted(set(int(t) for t in stop_token_ids))),
        vocab_size=vocab_size,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        greedy=bool(greedy),
        return_logprobs=bool(return_logprobs),
        max_batch_size=max_batch_size,
    )
    name = engines.resolve(engine, model_chunks)
    runner = engines.engine_for(model_chunks, name, pg_collection)
    return runner.generate(
        tokenizer, [list(map(int, p)) for p in prompts_token_ids], sampling, seed
    )
