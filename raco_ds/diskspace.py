"""A full disk as an error a user can act on: which folder, how much space is needed, what to do.

Writers do not agree on how they report a full disk: Python raises
``OSError(ENOSPC)``, PyTorch's ``torch.save`` a ``RuntimeError`` ("file write
failed", or "basic_ios::clear: iostream error"), safetensors its own error. So
:func:`is_disk_full` also asks the file system: a write that failed while less
space is free than the write needed is a full disk, whatever the message.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

__all__ = ["DiskFullError", "disk_full_error", "format_bytes", "is_disk_full"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left while writing; the message names the folder, the space needed and the fix."""


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def is_disk_full(error: BaseException, path: str | Path, needed: int) -> bool:
    """True when ``error``, raised while writing about ``needed`` bytes under ``path``, means a full disk."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _FULL:
            return True
        cause = cause.__cause__ or cause.__context__
    if "No space left on device" in str(error):
        return True
    free = _free_bytes(Path(path))
    return free is not None and free < needed


def disk_full_error(path: str | Path, needed: int, what: str, then: str) -> DiskFullError:
    """The error to raise: ``what`` could not be written under ``path``; ``then`` says how to continue."""
    free = _free_bytes(Path(path))
    have = f"{format_bytes(free)} are free there" if free is not None else "its free space is unknown"
    return DiskFullError(
        f"no space left on the device of {path} while writing {what}: it needs about {format_bytes(needed)} and "
        f"{have}. Free at least {format_bytes(max(needed - (free or 0), 0) or needed)} on that file system "
        f"(e.g. delete old runs there, or keep fewer checkpoints with --checkpointing.keep_last 1), then {then}",
    )
