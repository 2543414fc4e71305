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
* ``utils.GlobalMemoryBuffer.get_tensor``: the ``allgather`` dispatcher gathers its tokens over
  TP x EP into Megatron's global buffer (``use_global_buffer=True``). A buffer first allocated
  while the static engine generates (under ``torch.inference_mode``) is an inference tensor, and
  the next gather into it outside inference mode (the held-out gap's forward pass after the
  rollouts, at TP or EP > 1) raises "Inplace update to inference tensor outside InferenceMode".
  -> outside inference mode, a buffer that is an inference tensor is dropped and allocated anew
  (all platforms; a plain buffer is reused as before).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_opd.compat.cpu import CpuStream


def _bridge_missing_te_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _bridge_cuda_streams() -> None:
    torch.cuda.Stream = CpuStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _bridge_inference_buffers() -> None:
    import functools

    import torch
    from megatron.core import utils

    original = utils.GlobalMemoryBuffer.get_tensor
    if getattr(original, "_megatron_opd_moe", False):
        return

    @functools.wraps(original)
    def get_tensor(self, tensor_shape, dtype, name, *args, **kwargs):
        held = self.buffer.get((name, dtype))
        if held is not None and held.is_inference() and not torch.is_inference_mode_enabled():
            del self.buffer[(name, dtype)]
        return original(self, tensor_shape, dtype, name, *args, **kwargs)

    get_tensor._megatron_opd_moe = True
    utils.GlobalMemoryBuffer.get_tensor = get_tensor


def apply(cpu: bool) -> None:
    _bridge_missing_te_gemm()
    _bridge_inference_buffers()
    if cpu:
        _bridge_cuda_streams()
