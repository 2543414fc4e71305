"""Megatron-Core's mixture-of-experts layers without transformer-engine, and on the CPU.

* ``transformer/moe/moe_utils.py`` imports ``te_general_gemm`` (and the fused permute / top-k
  kernels) only inside ``try: import transformer_engine``, but the router's gating linear
  (``RouterGatingLinearFunction.forward``) tests ``te_general_gemm is not None`` unconditionally:
  without transformer-engine every MoE forward is a ``NameError``. -> the name is defined as
  ``None``, which is what Megatron's own fallback (``torch.mm`` in the router dtype) expects.
  The fused kernels are only called when their ``moe_*_fusion`` flags are set, which this project
  never does.
* ``transformer/moe/token_dispatcher.py``: the ``alltoall`` dispatcher creates a
  ``torch.cuda.Stream`` at construction and copies its split sizes device-to-host on it
  (``with torch.cuda.stream(...)``). On the CPU there is no device and every op has finished when
  it returns -> a stream stand-in and a no-op ``torch.cuda.stream`` context (CPU only). This
  project's models use the ``allgather`` dispatcher, which needs neither.
"""

from __future__ import annotations

import contextlib


def _bridge_missing_te_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _bridge_cuda_streams() -> None:
    import torch

    from megatron_opd.compat.cpu import _CpuStream

    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def apply(cpu: bool) -> None:
    _bridge_missing_te_gemm()
    if cpu:
        _bridge_cuda_streams()
