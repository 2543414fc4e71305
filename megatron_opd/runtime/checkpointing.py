"""Megatron ``dist_checkpointing`` save/load of model chunks, written atomically.

A checkpoint directory is written under ``<dir>.tmp`` by every rank and renamed by rank 0 once all
ranks are done, so a crash mid-save never leaves a half-written directory under the final name.
Sharded tensor keys carry global layer numbers, so a checkpoint saved at one TP/PP layout loads at
any other (Megatron reshards on load).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_opd import compat
from megatron_opd.compat import WriterDied
from megatron_opd.runtime import integrity
from megatron_opd.runtime.distributed import is_rank0
from megatron_opd.runtime.errors import RunError

META_FILE = "megatron_opd.json"


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip Megatron's DDP and Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def atomic_save(
    sharded_state_dict: dict[str, Any],
    directory: str | Path,
    meta: Optional[dict] = None,
    before_rename: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Save with dist_checkpointing to ``directory`` via ``directory.tmp`` and a rename.

    ``before_rename(tmp_dir)`` runs on rank 0 to add files (a tokenizer) before the rename."""
    from megatron.core import dist_checkpointing

    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if is_rank0():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        dist_checkpointing.save(sharded_state_dict, str(tmp))
        if is_rank0() and before_rename is not None:
            before_rename(tmp)
        if is_rank0() and meta is not None:
            write_json_atomic(tmp / META_FILE, stamp(meta))
        _barrier()
        if is_rank0():
            integrity.write_manifest(tmp)  # every rank's files are complete after the barrier
    except BaseException as error:  # torch's CheckpointException is a BaseException
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        full = _no_space(error) or (not interrupted and _out_of_space(tmp))
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
        if full:
            raise RunError(f"no space left on device writing {final}") from error
        died = _writer_died(error)
        if died is not None:
            raise RunError(f"{died}, writing {final}; the checkpoint was not kept") from error
        raise
    if is_rank0():
        if final.exists():
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    _barrier()
    return final


def _no_space(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain (Megatron's writers re-raise their children's errors)."""
    for cause in _causes(error):
        if getattr(cause, "errno", None) == errno.ENOSPC or "No space left on device" in str(cause):
            return True
    return False


def _causes(error: BaseException):
    """``error``, its causes and contexts, and the other ranks' errors a ``CheckpointException``
    carries (on the coordinator: ``failures``, rank -> ``WrappedException(exc, traceback)``)."""
    seen, todo = set(), [error]
    while todo:
        error = todo.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        todo.append(error.__cause__ or error.__context__)
        failures = getattr(error, "failures", None)
        for failure in failures.values() if isinstance(failures, dict) else ():
            # a WrappedException, or (exception, traceback) where it is a plain tuple
            parts = failure if isinstance(failure, tuple) else (getattr(failure, "exc", None),)
            todo += [p for p in parts if isinstance(p, BaseException)]


def _out_of_space(directory: Path) -> bool:
    """Whether ``directory``'s filesystem is full. torch.save inside Megatron's writer reports a
    short write as "unexpected pos 704 vs 598", with no errno, so after a failed save we try to
    write 1 MiB there ourselves."""
    probe = directory / ".space_probe"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno == errno.ENOSPC
    finally:
        probe.unlink(missing_ok=True)
    return False


def _writer_died(error: BaseException) -> Optional[BaseException]:
    for cause in _causes(error):
        if isinstance(cause, WriterDied):
            return cause
    return None


def save_model(
    chunks: list[torch.nn.Module], directory: str | Path, meta: Optional[dict] = None
) -> Path:
    return atomic_save(model_sharded_state_dict(chunks), directory, meta)


def load_model(chunks: list[torch.nn.Module], directory: str | Path, strict: bool = True) -> None:
    """Load weights saved at any TP/PP layout into this layout's chunks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"{directory} is not a Megatron dist checkpoint (no metadata.json)")
    sharded = model_sharded_state_dict(chunks)
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.ASSUME_OK_UNEXPECTED
    # ShardedTensor keys are global (layer numbers included), so the nesting under "model" or
    # "model<i>" does not have to match the layout the checkpoint was saved with.
    state = dist_checkpointing.load(sharded, str(directory), strict=handling)
    for i, c in enumerate(chunks):
        part = state["model"] if len(chunks) == 1 else state[f"model{i}"]
        unwrap(c).load_state_dict(part, strict=strict)


def stamp(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the megatron-core version that wrote the checkpoint (0.16 cannot read what
    0.17+ writes: :func:`megatron_opd.runtime.integrity.check_readable` says so by name)."""
    return {**meta, "megatron_core": compat.megatron_core_version()}


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: was {directory} written by megatron_opd?")
    return json.loads(path.read_text())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------
# Training checkpoints: <save>/iter_0000010/ and <save>/latest_checkpointed_iteration.txt

LATEST_FILE = "latest_checkpointed_iteration.txt"
# Optimizer state stored in model space, so it reshards across TP/PP/DP layouts on load.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration the "latest" pointer names, or None when ``root`` holds no training run."""
    path = Path(root) / LATEST_FILE
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path} is corrupt: {text!r}")
    return int(text)


def save_training_checkpoint(
    root: str | Path,
    iteration: int,
    chunks: list[torch.nn.Module],
    optimizer,
    scheduler,
    extra: dict[str, Any],
    meta: Optional[dict] = None,
    before_rename: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Model, optimizer, LR scheduler, ``extra`` (data position, counters) at ``iteration``.

    The iteration directory is written under a temporary name and renamed; the latest pointer is
    rewritten (atomically) only after that, so a crash mid-save leaves the previous latest intact.
    """
    model_sd = model_sharded_state_dict(chunks)
    state: dict[str, Any] = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["extra"] = extra
    path = atomic_save(state, iteration_dir(root, iteration), meta, before_rename)
    if is_rank0():
        tmp = Path(root) / (LATEST_FILE + ".tmp")
        try:
            tmp.write_text(str(iteration))
            os.replace(tmp, Path(root) / LATEST_FILE)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            if _no_space(error):
                raise RunError(f"no space left on device writing {tmp}") from error
            raise
    _barrier()
    return path


def weights_are_finite(chunks: list[torch.nn.Module]) -> bool:
    """True when every rank's weights are finite (every rank must call it)."""
    bad = torch.zeros(1, device=compat.default_device())
    for c in chunks:
        for p in unwrap(c).parameters():
            if not torch.isfinite(p).all():
                bad.fill_(1.0)
                break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def load_training_checkpoint(
    root: str | Path,
    chunks: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
) -> tuple[int, dict[str, Any]]:
    """Restore from the latest iteration under ``root``; returns (iteration, extra)."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"{root} has no {LATEST_FILE}")
    path = iteration_dir(root, iteration)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{path} named by {Path(root) / LATEST_FILE} is missing")
    model_sd = model_sharded_state_dict(chunks)
    state: dict[str, Any] = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_METADATA
        )
    loaded = dist_checkpointing.load(state, str(path))
    for i, c in enumerate(chunks):
        unwrap(c).load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return int(loaded["iteration"]), dict(loaded.get("extra", {}))


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory holding weights and metadata: a training run's root resolves to its latest
    iteration; a converted checkpoint or an ``iter_*`` directory is itself."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint {root} does not exist")
    it = latest_iteration(root)
    return iteration_dir(root, it) if it is not None else root
