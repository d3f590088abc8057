"""Atomic file writes.

Every result file is written to a temporary sibling and moved into place with
:func:`os.replace`, which is atomic on POSIX and Windows for paths on the same file
system. A reader (or a rerun after ``kill -9``) therefore sees either the complete old
file, the complete new file, or nothing -- never a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name lets a later process tell an orphan (its writer was killed)
    # from a write in progress in a shared directory (see remove_orphaned_temp_files).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            # fsync before the rename so a power loss cannot leave a renamed-but-empty file.
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave our own temp file behind.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    # allow_nan=False: a NaN score must fail loudly here rather than produce invalid JSON.
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def is_temp_file(path: Path) -> bool:
    """True for temp files left behind by a process killed between create and rename."""
    return path.name.startswith(".") and TMP_MARKER in path.name


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> int:
    """Delete temp files under ``directory`` left by killed writers; returns how many.

    Only call this when no other writer is active in ``directory`` (runs hold a lock).
    """
    removed = 0
    root = Path(directory)
    if not root.is_dir():
        return 0
    for candidate in root.rglob(f".*{TMP_MARKER}*"):
        if candidate.is_file() and is_temp_file(candidate):
            candidate.unlink(missing_ok=True)
            removed += 1
    return removed


def _writer_alive(path: Path) -> bool:
    pid_text = path.name.split(TMP_MARKER, 1)[1].split("-", 1)[0]
    if not pid_text.isdigit():
        return False  # not written by this module's naming scheme: an orphan
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a live process of another user
    return True


def remove_orphaned_temp_files(directory: str | os.PathLike[str]) -> int:
    """Delete temp files under ``directory`` whose writing process no longer exists.

    Safe while other writers are active (e.g. a judge cache shared by several runs): a temp file
    of a live process is left alone.
    """
    removed = 0
    root = Path(directory)
    if not root.is_dir():
        return 0
    for candidate in root.rglob(f".*{TMP_MARKER}*"):
        if candidate.is_file() and is_temp_file(candidate) and not _writer_alive(candidate):
            candidate.unlink(missing_ok=True)
            removed += 1
    return removed
