"""Starting a run on its ``--save`` directory, checked before any model is built: the directory is
writable, a crashed save's leftovers are cleaned up, the checkpoints to load are intact, and a
checkpoint to resume agrees with the flags (same prompts and seed, ``--train-iters`` not behind it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from megatron_opd.runtime import checkpointing, integrity
from megatron_opd.runtime.distributed import env_rank_and_world
from megatron_opd.runtime.errors import UserError
from megatron_opd.training import data


def prepare_save_dir(save: Optional[str]) -> None:
    """Create ``--save`` and write a file into it now, not at the first save after hours of
    training; on rank 0, finish or remove what a save killed midway left behind."""
    if not save:
        return
    root = Path(save)
    if root.exists() and not root.is_dir():
        raise UserError(f"--save {root} is not a directory")
    rank, _, _ = env_rank_and_world()
    probe = root / f".write_test.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--save {root} is not writable: {e.strerror or e}") from None
    if rank == 0:
        clean_stale_temporaries(root)


def clean_stale_temporaries(root: Path) -> list[Path]:
    """``iter_*.tmp`` (a save that never finished) is removed; ``iter_N.old`` (a save killed
    between its two renames) is put back as ``iter_N`` when that is missing, else removed."""
    removed = []
    for path in sorted(root.glob("iter_*.tmp")) + sorted(root.glob("*.tmp")):
        if not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    for old in sorted(root.glob("iter_*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:
            os.replace(old, final)
    return removed


def prompt_digest(token_ids: list[list[int]]) -> str:
    """Identifies a tokenized prompt set: the same file (wherever it lies) gives the same digest."""
    h = hashlib.sha256()
    for ids in token_ids:
        h.update(json.dumps(ids).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def run_identity(seed: int, prompt_data: str, prompts) -> dict[str, Any]:
    """What a resumed run must share with the one that saved (stored in megatron_opd.json):
    ``--seed``, ``--prompt-data`` and the tokenized prompts it gave."""
    return {
        "seed": seed,
        "prompt_data": prompt_data,
        "prompts": len(prompts),
        "prompt_digest": prompt_digest(prompts.token_ids),
    }


def check_run_inputs(
    resume_root: Optional[Path],
    student_dir: Path,
    teacher_dirs: list[Path],
    prompts,
    *,
    save: Optional[str],
    train_iters: int,
    seed: int,
    prompt_data: str,
) -> None:
    """The checkpoints (student, every teacher) are intact, and a resume agrees with
    ``--train-iters``, ``--seed`` and ``--prompt-data`` (``save``: ``--save``)."""
    rank, _, world = env_rank_and_world()
    flag = "--load" if resume_root is None or str(resume_root) != str(save) else "--save"
    integrity.verify(student_dir, flag, rank, world)
    for teacher_dir in teacher_dirs:
        integrity.verify(teacher_dir, "--opd-teacher-load", rank, world)
    if resume_root is None:
        return
    iteration = checkpointing.latest_iteration(resume_root)
    if iteration is not None and train_iters < iteration:
        raise UserError(
            f"--train-iters {train_iters} is below iteration {iteration} of the checkpoint "
            f"in {resume_root}; raise --train-iters to continue, or --save elsewhere to start over"
        )
    saved = checkpointing.read_meta(student_dir).get("run")
    if not saved:
        return  # written before runs recorded this; the data stream's own check still applies
    if saved["seed"] != seed:
        raise UserError(
            f"--seed {seed} differs from the checkpoint's ({saved['seed']}) in "
            f"{resume_root}; resume with --seed {saved['seed']}, or --save elsewhere"
        )
    if saved["prompt_digest"] != prompt_digest(prompts.token_ids):
        raise UserError(
            f"--prompt-data {prompt_data} ({len(prompts)} prompts) differs from the "
            f"checkpoint's ({saved['prompt_data']}, {saved['prompts']} prompts) in "
            f"{resume_root}; resume with the same --prompt-data (and --max-prompt-length, "
            "--system-prompt), or --save elsewhere"
        )


def load_prompt_problems(prompt_data: str, seed: int):
    """``--prompt-data`` read (the built-in set drawn with ``seed``), with errors naming the
    flag."""
    try:
        problems = data.load_prompt_source(prompt_data, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"--prompt-data: {e}") from None
    if not problems:
        raise UserError(f"--prompt-data {prompt_data} holds no prompts")
    return problems
