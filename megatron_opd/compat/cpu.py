"""CPU stand-ins: what makes Megatron-Core (0.16.1 through 0.19.x) run without CUDA.

Megatron-Core hard-codes CUDA in a handful of places (paths relative to ``megatron/core``):

* ``tensor_parallel/random.py`` ``CudaRNGStatesTracker`` reads ``torch.cuda.get_rng_state()``
  -> a tracker that keeps CPU generator states instead.
* ``torch.cuda.current_device()`` is used as a device in rotary embeddings, p2p communication, grad
  buffers and inference -> it returns ``"cpu"``; ``synchronize`` is a no-op, ``Event`` a stand-in.
* 0.19: ``distributed/param_and_grad_buffer.py`` ``start_grad_sync`` calls
  ``torch.cuda.current_stream()`` on every step (to wait on CUDA-graph events) -> a stream
  stand-in whose waits do nothing (on the CPU every op has finished when it returns).
* ``transformer/utils.py`` ``get_default_causal_mask`` allocates on ``"cuda"`` -> a CPU mask.
* the optimizer, grad clipping, pipeline schedules and the inference controller allocate with
  ``device="cuda"``, call ``.cuda()`` and compare ``tensor.type()`` with ``torch.cuda.*`` names ->
  those entry points run under :class:`_CudaAsCpu`, a ``TorchFunctionMode`` scoped to them.
* ``inference/communication_utils.py`` asserts ``tensor.is_cuda`` before pipeline sends.
* gloo cannot be trusted with batched p2p: interleaved pipelines produce wrong losses with
  ``batch_p2p_comm=True``. :func:`megatron_opd.compat.platform.transformer_config_overrides`
  forces it off.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_FACTORY_DEVICE_KWARG = "device"


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare ordinal means a CUDA device


class _CudaAsCpu(TorchFunctionMode):
    """Runs CUDA-minded Megatron code on the CPU: ``device="cuda"`` allocates on the CPU,
    ``.cuda()`` and ``.pin_memory()`` return the tensor itself, and ``.type()`` reports the
    ``torch.cuda.*`` name that Megatron's asserts expect."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get(_FACTORY_DEVICE_KWARG)):
            kwargs[_FACTORY_DEVICE_KWARG] = "cpu"
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # an enclosing _CudaAsCpu may have renamed it already
            return (
                name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            )
        if func is torch.Tensor.to and args and _is_cuda_device(args[1] if len(args) > 1 else None):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _run_as_cpu(fn: Callable) -> Callable:
    if getattr(fn, "_megatron_opd_cpu", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaAsCpu():
            return fn(*args, **kwargs)

    wrapper._megatron_opd_cpu = True
    return wrapper


def _wrap_attr(owner: Any, name: str) -> None:
    setattr(owner, name, _run_as_cpu(getattr(owner, name)))


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event`` (timing only) on the CPU."""

    def __init__(self, *args, **kwargs):
        self._time = 0.0

    def record(self, *args, **kwargs):
        import time

        self._time = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end._time - self._time) * 1000.0


class CpuStream:
    """Stand-in for ``torch.cuda.Stream`` / ``current_stream()``: on the CPU every op has finished
    when it returns, so there is nothing to wait for."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        event = event if event is not None else _CpuEvent()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Megatron's named RNG states, kept as CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def apply() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Event = _CpuEvent
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: CpuStream()  # 0.19's grad sync

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tf_utils

    tf_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    install_cpu_rng_tracker()

    from megatron.core.pipeline_parallel import schedules

    for name in (
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_without_interleaving",
        "forward_backward_pipelining_with_interleaving",
    ):
        _wrap_attr(schedules, name)

    import megatron.core.optimizer as mopt
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as opt_mod

    _wrap_attr(mopt, "get_megatron_optimizer")
    for name in ("clip_grad_by_total_norm_fp32", "count_zeros_fp32", "get_grad_norm_fp32"):
        if hasattr(clip_grads, name):
            _wrap_attr(clip_grads, name)
    for cls in vars(opt_mod).values():
        if isinstance(cls, type) and issubclass(cls, opt_mod.MegatronOptimizer):
            for name in ("step", "__init__", "clip_grad_norm", "count_zeros", "load_state_dict"):
                if name in vars(cls):
                    _wrap_attr(cls, name)
    try:
        from megatron.core.optimizer import distrib_optimizer

        cls = distrib_optimizer.DistributedOptimizer
        for name in ("__init__", "step", "load_state_dict", "sharded_state_dict"):
            if name in vars(cls):
                _wrap_attr(cls, name)
    except ImportError:
        pass

    from megatron.core.distributed import distributed_data_parallel as ddp_mod

    _wrap_attr(ddp_mod.DistributedDataParallel, "__init__")

    # tied embeddings across pipeline stages: the first all-reduce moves the weight with .cuda()
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _wrap_attr(LanguageModule, "setup_embeddings_and_output_layer")

    _apply_inference()


def _apply_inference() -> None:
    try:
        from megatron.core.inference import communication_utils
        from megatron.core.inference.text_generation_controllers import (
            text_generation_controller as tgc,
        )
    except ImportError:  # inference extras missing; nothing to patch
        return
    communication_utils._is_cuda = lambda tensor: None
    cls = tgc.TextGenerationController
    for name in ("__init__", "generate_all_output_tokens_static_batch"):
        if name in vars(cls):
            _wrap_attr(cls, name)
