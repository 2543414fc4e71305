"""A manifest of every checkpoint file (size and SHA-256), written with the checkpoint and checked
before anything is loaded from it.

Megatron's dist checkpoints carry no checksums: a flipped byte inside a ``.distcp`` loads without a
word, and a truncated shard or an empty ``common.pt`` fails deep inside the load, after the models
are built. ``manifest.json`` is written inside the temporary directory, before the rename, so a
checkpoint under its final name always has one that describes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

from megatron_opd import compat
from megatron_opd.compat import versions
from megatron_opd.runtime.errors import UserError

MANIFEST_FILE = "manifest.json"
# a Megatron dist checkpoint cannot load without these (and common.pt, where the writing
# Megatron-Core keeps the common state there: 0.16; 0.19 keeps it in the .distcp files)
REQUIRED = ("metadata.json", ".metadata")
COMMON_FILE = "common.pt"
META_FILE = "megatron_opd.json"
NOT_COVERED = (MANIFEST_FILE, META_FILE)
_CHUNK = 8 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    """Megatron's files: the top level, less our own metadata (megatron_opd.json is edited by
    people and parsed with its own errors; tokenizer/ is read by transformers)."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name not in NOT_COVERED and not p.name.endswith(".tmp")
    )


def write_manifest(directory: str | Path) -> None:
    """Size and SHA-256 of every file under ``directory`` (one process, after all ranks wrote)."""
    directory = Path(directory)
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_of(directory / rel)}
        for rel in _files(directory)
    }
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST_FILE)


def _describe(directory: Path) -> str:
    match = re.fullmatch(r"iter_(\d+)", directory.name)
    return f"iteration {int(match.group(1))} ({directory})" if match else str(directory)


def verify(
    directory: str | Path,
    flag: str,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Refuse a damaged checkpoint, naming the flag, the iteration and the file.

    Every rank checks that every file is there with its recorded size; the checksums are split
    over the ranks (file ``i`` on rank ``i % world_size``), so a wide job reads each file once. A
    checkpoint without a manifest (written before manifests existed) gets the presence checks."""
    directory = Path(directory)
    where = _describe(directory)
    manifest_path = directory / MANIFEST_FILE
    if not (directory / "metadata.json").exists():
        return  # not a dist checkpoint: the loader says what it is missing
    check_readable(directory, flag)
    recorded: Optional[dict] = None
    if manifest_path.exists():
        try:
            recorded = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{flag}: {where}: {MANIFEST_FILE} is corrupt") from None
    if recorded is None:
        required = (
            REQUIRED if versions.reads_common_state_from_distcp() else REQUIRED + (COMMON_FILE,)
        )
        for name in required:
            path = directory / name
            if not path.exists():
                raise UserError(f"{flag}: {where}: {name} is missing; the checkpoint is damaged")
            if path.stat().st_size == 0:
                raise UserError(f"{flag}: {where}: {name} is empty; the checkpoint is damaged")
        return
    for rel, info in recorded.items():
        path = directory / rel
        if not path.exists():
            raise UserError(f"{flag}: {where}: {rel} is missing; the checkpoint is damaged")
        size = path.stat().st_size
        if size != info["size"]:
            raise UserError(
                f"{flag}: {where}: {rel} has {size} bytes, {info['size']} were written; "
                "the checkpoint is damaged"
            )
    for i, rel in enumerate(sorted(recorded)):
        if i % world_size == rank and sha256_of(directory / rel) != recorded[rel]["sha256"]:
            raise UserError(
                f"{flag}: {where}: {rel} does not match its checksum in {MANIFEST_FILE}; "
                "the checkpoint is damaged",
                rank_local=True,
            )


def check_readable(directory: str | Path, flag: str) -> None:
    """Refuse, before any model is built, a checkpoint this Megatron-Core cannot read: one written
    by megatron-core 0.17+ (common state inside the ``.distcp`` files, no ``common.pt``) read by
    0.16. The other way round works: 0.19 reads 0.16's checkpoints."""
    directory = Path(directory)
    if (directory / COMMON_FILE).exists() or compat.versions.reads_common_state_from_distcp():
        return
    written = "a newer megatron-core"
    try:
        written = (
            "megatron-core " + json.loads((directory / META_FILE).read_text())["megatron_core"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise UserError(
        f"{flag}: {_describe(directory)} was written by {written}, and megatron-core "
        f"{compat.megatron_core_version()} cannot read it (its common state is inside the .distcp "
        "files); load it with megatron-core >= 0.17"
    )
