"""Everything that bridges Megatron-Core versions or makes Megatron-Core run without CUDA, and the
few patches of Megatron-Core's behaviour the project needs everywhere (quiet inference bars,
checkpoint writer processes that cannot hang or outlive a rank; see the end of this file).

This is the only module in the project that knows about either. ``apply()`` is idempotent and is
called by :func:`megatron_opd.distributed.initialize` (and by anything that builds Megatron objects
before that). With CUDA present it changes only the inference path (rotary keys cached rotated)
and the log / checkpoint-writer patches noted below.

Megatron-Core 0.16.1 hard-codes CUDA in a handful of places (paths relative to ``megatron/core``):

* ``tensor_parallel/random.py`` ``CudaRNGStatesTracker`` reads ``torch.cuda.get_rng_state()``
  -> a tracker that keeps CPU generator states instead.
* ``torch.cuda.current_device()`` is used as a device in rotary embeddings, p2p communication, grad
  buffers and inference -> it returns ``"cpu"``; ``synchronize`` is a no-op, ``Event`` a stand-in.
* ``transformer/utils.py`` ``get_default_causal_mask`` allocates on ``"cuda"`` -> a CPU mask.
* the optimizer, grad clipping, pipeline schedules and the inference controller allocate with
  ``device="cuda"``, call ``.cuda()`` and compare ``tensor.type()`` with ``torch.cuda.*`` names ->
  those entry points run under :class:`_CudaAsCpu`, a ``TorchFunctionMode`` scoped to them.
* ``inference/communication_utils.py`` asserts ``tensor.is_cuda`` before pipeline sends.
* gloo cannot be trusted with batched p2p: interleaved pipelines produce wrong losses with
  ``batch_p2p_comm=True``. :func:`transformer_config_overrides` forces it off.

On every platform, one change of inference behaviour (speed only, the same numbers up to float
rounding): the static KV cache stores rotary-embedded keys instead of re-rotating the whole cache
at every decode step (:func:`_install_static_cache_rotary`). (Grouped-query attention without
per-head copies is not a patch: the local layer spec uses :mod:`megatron_opd.attention`.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

MEGATRON_CORE_VERSIONS = ("0.16.1",)

_APPLIED = False


def has_cuda() -> bool:
    return torch.cuda.is_available()


def megatron_core_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def check_megatron_core_version() -> None:
    found = megatron_core_version()
    if found not in MEGATRON_CORE_VERSIONS:
        raise RuntimeError(
            f"megatron-core {found} is not supported; install one of {MEGATRON_CORE_VERSIONS}"
        )


def default_device() -> torch.device:
    """The device tensors of this process live on (the local GPU, or the CPU)."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reset_peak_memory() -> None:
    """Open a new window for :func:`peak_memory_bytes`: CUDA's allocator peak, or on CPU the
    process's peak resident set (Linux resets VmHWM through /proc/self/clear_refs)."""
    if has_cuda():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the window stays the whole process
        pass


def peak_memory_bytes() -> int:
    """The peak since :func:`reset_peak_memory`: tensors allocated on the GPU, or on CPU the whole
    process's peak RSS (interpreter and libraries included)."""
    if has_cuda():
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def distributed_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def transformer_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields this platform needs (fused CUDA kernels off on CPU)."""
    if has_cuda():
        return {}
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
        batch_p2p_comm=False,
    )


def transformer_engine_available() -> bool:
    if not has_cuda():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def ensure_tensor_parallel_attributes(model: torch.nn.Module) -> None:
    """Megatron-Core 0.16.1 marks a parameter as tensor-parallel (``tensor_model_parallel``,
    ``partition_dim``) only inside its weight initializer, so a model built with
    ``perform_initialization=False`` (as for loading a checkpoint) has TP-sharded weights that look
    replicated: the gradient norm then counts them on TP rank 0 only and is silently wrong at
    TP > 1. Mark them here, as the initializer would have."""
    from megatron.core.tensor_parallel import layers

    for module in model.modules():
        if isinstance(module, layers.ColumnParallelLinear):
            dims = {"weight": 0, "bias": 0}
        elif isinstance(module, layers.RowParallelLinear):
            dims = {"weight": 1}
        elif isinstance(module, layers.VocabParallelEmbedding):
            dims = {"weight": 0}
        else:
            continue
        for name, dim in dims.items():
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and not getattr(
                param, "tensor_model_parallel", False
            ):
                param.tensor_model_parallel = True
                param.partition_dim = dim
                param.partition_stride = 1


# --------------------------------------------------------------------------------------------
# CPU shims
# --------------------------------------------------------------------------------------------

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


def _apply_cpu_shims() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Event = _CpuEvent
    torch.cuda.set_device = lambda *a, **k: None

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

    _apply_cpu_inference_shims()


def _apply_cpu_inference_shims() -> None:
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


# --------------------------------------------------------------------------------------------
# Inference: rotary embeddings applied once per key (both platforms)


def _install_static_cache_rotary() -> None:
    """Megatron-Core 0.16.1's static KV cache (``transformer/attention.py``,
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


def apply() -> None:
    """Make Megatron-Core usable on this platform. Idempotent; with CUDA only the inference
    changes (module docstring) apply."""
    global _APPLIED
    if _APPLIED:
        return
    check_megatron_core_version()
    if not has_cuda():
        _apply_cpu_shims()
    _install_static_cache_rotary()
    apply_process_hygiene()
    _APPLIED = True


# --------------------------------------------------------------------------------------------
# Quiet logs and dist-checkpoint writer processes (CPU and CUDA alike)
# --------------------------------------------------------------------------------------------


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


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``): a helper
    process of a rank that is killed -9 must not live on holding hundreds of MB."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class WriterDied(RuntimeError):
    """A dist-checkpoint writer process ended without reporting (killed, out of memory)."""


def _watched_fork_context():
    """multiprocessing's fork context, except that a ``JoinableQueue.join()`` stops waiting with
    :class:`WriterDied` once a process started from the same context has died without finishing,
    and those processes die with their parent."""
    import multiprocessing as mp
    from multiprocessing import queues

    base = mp.get_context("fork")
    started: list = []

    class WatchedJoinableQueue(queues.JoinableQueue):
        def join(self):
            with self._cond:
                while not self._unfinished_tasks._semlock._is_zero():
                    self._cond.wait(timeout=0.5)
                    for p in started:
                        code = p.exitcode
                        if code is not None and code != 0:
                            raise WriterDied(
                                f"a checkpoint writer process (pid {p.pid}) died with exit code "
                                f"{code} before finishing its file"
                            )

    class WatchedContext:
        def __getattr__(self, name):
            return getattr(base, name)

        def JoinableQueue(self, maxsize=0):  # noqa: N802 - multiprocessing's name
            return WatchedJoinableQueue(maxsize, ctx=base)

        def Process(self, *args, target=None, **kwargs):  # noqa: N802
            def run(*a, **k):
                die_with_parent()
                return target(*a, **k)

            proc = base.Process(*args, target=run, **kwargs)
            started.append(proc)
            return proc

    return WatchedContext()


def _watch_checkpoint_writers() -> None:
    """Megatron-Core 0.16.1 ``dist_checkpointing/strategies/filesystem_async.py`` forks one writer
    per bucket and waits in ``count_queue.join()`` with no timeout: a writer killed by the OOM
    killer hangs the rank forever. Its fork context is swapped for one whose join notices dead
    writers, and whose writers die with the rank.

    Its results queue lives in a ``multiprocessing.Manager`` (a spawned server of ~270 MB that
    re-imports the script, seconds on the first save, and outlived a rank killed -9). That is for
    Megatron's asynchronous saves, whose persistent worker is a separate process; this project
    saves synchronously: the rank itself puts the writers' collected results and reads them back
    (``get_nowait``, so not a multiprocessing queue with its feeder thread), so a plain
    ``queue.Queue`` does.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if getattr(fsa, "_megatron_opd_watched", False):
        return
    import multiprocessing

    class _Multiprocessing:
        def __getattr__(self, name):
            return getattr(multiprocessing, name)

        def get_context(self, method=None):
            if method == "fork":
                return _watched_fork_context()
            return multiprocessing.get_context(method)

    def results_queue():
        if fsa._results_queue is None:
            import queue

            fsa._results_queue = queue.Queue()
        return fsa._results_queue

    fsa.mp = _Multiprocessing()
    fsa._get_write_results_queue = results_queue
    fsa._megatron_opd_watched = True


def _no_stack_dump_on_sigterm() -> None:
    """Megatron-Core's ``inference/data_parallel_inference_coordinator.py`` (imported with its
    inference engines) registers ``faulthandler`` for SIGTERM at import: every rank that torchrun
    stops after another rank failed then prints a stack dump. Unregistered once imported."""
    import faulthandler
    import signal
    import sys

    if "megatron.core.inference.data_parallel_inference_coordinator" in sys.modules:
        faulthandler.unregister(signal.SIGTERM)


def apply_process_hygiene() -> None:
    """The patches that apply with or without CUDA: quiet inference bars, watched writers."""
    _quiet_static_engine_progress()
    _watch_checkpoint_writers()
    _no_stack_dump_on_sigterm()
