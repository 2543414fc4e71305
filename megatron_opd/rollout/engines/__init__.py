"""Rollout engines: what turns a model's weights and a batch of prompts into sampled tokens.

Every engine has one interface (:class:`Engine`): it is built once per model, ``generate`` is
called for each batch, and ``release`` frees what it holds between rollouts (KV caches, captured
graphs). Rollout sources (:mod:`megatron_opd.rollout.sources`: the student in place, its refitted
copy, rollout ranks of their own) never see which engine runs;
:func:`megatron_opd.rollout.generation.generate` looks the engine up here by name.

========  =======================================================================  ============
name      what runs                                                                where
========  =======================================================================  ============
static    Megatron-Core's ``StaticInferenceEngine`` (eager, one batch)             everywhere
dynamic   Megatron-Core's ``DynamicInferenceEngine`` (continuous batching)         CUDA + flash
graph     this project's fixed-shape decode step over the model's own modules,     everywhere;
          captured whole as one CUDA graph on a GPU, run eagerly on CPU            TP only
========  =======================================================================  ============

Adding an engine (vLLM, SGLang): one module with a class that has ``name``, ``__init__(chunks,
pg_collection)``, ``generate`` and ``release``, plus its line in :data:`ENGINES`; the
``--rollout-engine`` flag takes its choices from there.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from megatron_opd import compat
from megatron_opd.rollout.engines.base import Engine, Generation, Sampling
from megatron_opd.rollout.engines.graph import GraphEngine, unsupported
from megatron_opd.rollout.engines.megatron import DynamicEngine, StaticEngine
from megatron_opd.runtime.checkpointing import unwrap

__all__ = [
    "ENGINES",
    "Engine",
    "Generation",
    "Sampling",
    "engine_for",
    "release_engines",
    "resolve",
]


ENGINES: dict[str, type] = {"static": StaticEngine, "dynamic": DynamicEngine, "graph": GraphEngine}

_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model core -> {name: engine}


def engine_for(model_chunks: Sequence[torch.nn.Module], name: str, pg_collection=None) -> Engine:
    """The ``name`` engine of this model, built on first use and kept with the model (a graph
    engine's captured graphs read the model's parameters where they are, so the optimizer step
    and the refit, which write them in place, never need a new capture)."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; use one of {', '.join(ENGINES)}")
    core = unwrap(model_chunks[0])
    engines = _built.setdefault(core, {})
    if name not in engines:
        engines[name] = ENGINES[name](model_chunks, pg_collection)
    return engines[name]


def release_engines(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Release every engine built on this model (their memory goes back to the allocator)."""
    for engine in _built.get(unwrap(model_chunks[0]), {}).values():
        engine.release()


def resolve(name: str, model_chunks: Sequence[torch.nn.Module]) -> str:
    """``auto``: ``graph`` on CUDA where the model is one it supports, else ``static``; other
    names as given."""
    if name != "auto":
        return name
    if compat.has_cuda() and unsupported(model_chunks) is None:
        return "graph"
    return "static"
