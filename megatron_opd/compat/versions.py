"""Which Megatron-Core this is, and which of the features that differ across the supported range
it has. Every other bridge asks these questions (a feature, never a version string); the version
itself is only checked against the supported range and written into checkpoints."""

from __future__ import annotations

import functools
import inspect

# the range pyproject.toml declares; both ends are tested (.ci/run)
SUPPORTED = ">=0.16.1,<0.20"
OLDEST, NEWEST_TESTED = "0.16.1", "0.19.2"


def megatron_core_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # 0.20.0rc1: stop at the pre-release tag
            break
    return tuple(parts)


def check_megatron_core_version() -> None:
    found = megatron_core_version()
    if not (_release(OLDEST) <= _release(found) < (0, 20)):
        raise RuntimeError(
            f"megatron-core {found} is not supported; install megatron-core{SUPPORTED} "
            f"(tested: {OLDEST} and {NEWEST_TESTED})"
        )


@functools.cache
def has_inference_wrapper_config() -> bool:
    """0.16: ``GPTInferenceWrapper(model, InferenceWrapperConfig, context, pg_collection=)`` and
    ``TextGenerationController(..., pp_group=)``. 0.19: the config module is gone; the wrapper
    takes ``(model, context)`` and both read their process groups from ``context.config``."""
    try:
        from megatron.core.inference.model_inference_wrappers import (  # noqa: F401
            inference_wrapper_config,
        )
    except ImportError:
        return False
    return True


@functools.cache
def dynamic_context_from_config() -> bool:
    """0.16 builds a ``DynamicInferenceContext`` with ``from_config``; 0.19 with its constructor."""
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext

    return hasattr(DynamicInferenceContext, "from_config")


@functools.cache
def dynamic_engine_takes_seed() -> bool:
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine

    return "random_seed" in inspect.signature(DynamicInferenceEngine.__init__).parameters


@functools.cache
def reads_common_state_from_distcp() -> bool:
    """Whether this Megatron-Core loads a checkpoint whose common state (iteration, scheduler,
    non-tensor optimizer state) lives inside the ``.distcp`` files rather than in ``common.pt``:
    the format 0.19 writes. 0.16 cannot read it."""
    from megatron.core.dist_checkpointing.strategies import common

    # 0.16 reads the common state only through its registry of common.pt strategies; 0.19 dropped
    # the registry when the state moved into the .distcp files
    return not hasattr(common, "register_default_common_strategies")
