"""Where tensors live and what this platform's Megatron-Core configuration needs: the GPU when
there is one, else the CPU. The rest of the project asks these functions instead of testing
``torch.cuda`` itself."""

from __future__ import annotations

from typing import Any

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


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
    TP > 1. Mark them here, as the initializer would have. (0.19 marks them itself; then this
    finds nothing to do.)"""
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
