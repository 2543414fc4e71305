"""Everything that bridges Megatron-Core versions (0.16.1 through 0.19.x) or makes Megatron-Core
run without CUDA, and the few patches of its behaviour the project needs everywhere. No other
module of the project tests a version or ``torch.cuda``; they ask here.

* :mod:`~megatron_opd.compat.versions`: the supported range and the features that differ in it
  (detected, never read off a version string).
* :mod:`~megatron_opd.compat.platform`: where tensors live, peak memory, the config a platform
  needs.
* :mod:`~megatron_opd.compat.cpu`: CPU stand-ins for the CUDA Megatron-Core assumes.
* :mod:`~megatron_opd.compat.inference`: the inference API on either side of 0.17's rewrite, and
  the rotary / progress-bar patches.
* :mod:`~megatron_opd.compat.writers`: dist-checkpoint writers that cannot hang or outlive a rank.
* :mod:`~megatron_opd.compat.moe`: mixture-of-experts layers without transformer-engine or CUDA.

``apply()`` is idempotent and is called by :func:`megatron_opd.runtime.distributed.initialize` (and
by anything that builds Megatron objects before that). With CUDA present it changes only the
inference path (rotary keys cached rotated) and the log / checkpoint-writer patches.
"""

from __future__ import annotations

from megatron_opd.compat import cpu, inference, moe, versions, writers
from megatron_opd.compat.cpu import install_cpu_rng_tracker
from megatron_opd.compat.platform import (
    default_device,
    distributed_backend,
    ensure_tensor_parallel_attributes,
    has_cuda,
    peak_memory_bytes,
    reset_peak_memory,
    transformer_config_overrides,
    transformer_engine_available,
)
from megatron_opd.compat.versions import check_megatron_core_version, megatron_core_version
from megatron_opd.compat.writers import WriterDied, die_with_parent

__all__ = [
    "WriterDied",
    "apply",
    "check_megatron_core_version",
    "default_device",
    "die_with_parent",
    "distributed_backend",
    "ensure_tensor_parallel_attributes",
    "has_cuda",
    "inference",
    "install_cpu_rng_tracker",
    "megatron_core_version",
    "moe",
    "peak_memory_bytes",
    "reset_peak_memory",
    "transformer_config_overrides",
    "transformer_engine_available",
    "versions",
    "writers",
]

_APPLIED = False


def apply() -> None:
    """Make Megatron-Core usable on this platform. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    check_megatron_core_version()
    if not has_cuda():
        cpu.apply()
    inference.apply()
    writers.apply()
    moe.apply(cpu=not has_cuda())
    _APPLIED = True
