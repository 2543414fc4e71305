"""Output paths checked before any model is built: a file flag must not name a directory, a
directory flag must not name a file, and the place each is written must be writable.

``--save`` has its own check (``resume.prepare_save_dir``, which also cleans up after a crashed
save); these are the other outputs, which fail otherwise only when first written, after the models
are built (``--metrics-file`` at a directory: ``[Errno 21] Is a directory`` from MetricsLogger).
Nothing is created here: the probe file is written into the nearest existing ancestor and removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from megatron_opd.runtime.errors import UserError


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(flag: str, path: Path, where: Path) -> None:
    """Write and remove a file in the directory ``where``."""
    probe = where / f".write_test.{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None


def _check_ancestors(flag: str, path: Path, start: Path) -> Path:
    """The closest existing ancestor of ``start``, which must be a directory."""
    found = _nearest_existing(start)
    if not found.is_dir():
        raise UserError(f"{flag} {path}: {found} is not a directory")
    return found


def check_output_file(flag: str, path: Optional[str]) -> None:
    """``path`` will be a file (created, or appended to): not a directory, and writable."""
    if not path:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; it must name a file")
    if path.exists():
        try:
            with path.open("ab"):  # appending nothing: the contents stay as they are
                pass
        except OSError as e:
            raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None
        return
    _probe(flag, path, _check_ancestors(flag, path, path.parent))


def check_output_dir(flag: str, path: Optional[str]) -> None:
    """``path`` will be a directory (created if missing): not a file, and writable."""
    if not path:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is not a directory")
    _probe(flag, path, _check_ancestors(flag, path, path))
