"""Where raco_ds caches converted models and reference log-probs, and how it writes them.

Everything cached lives under one root, ``$RACO_DS_CACHE`` or
``~/.cache/raco_ds`` (outside the repository, so a clone stays small and a
second checkout reuses the work). Writes are atomic: a folder is built under a
temporary name beside its final place and renamed in one step, a file is
written to a temporary name and ``os.replace``-d. A crash leaves only a
``.tmp-*`` entry that nothing reads, and two processes racing to fill the same
entry both succeed (the rename of the loser finds the winner's entry and its
copy is discarded), which is what several ranks on one node need.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CACHE_ENV", "atomic_directory", "atomic_file", "cache_root"]

CACHE_ENV = "RACO_DS_CACHE"
"""Environment variable that overrides the cache root."""


def cache_root() -> Path:
    """Return the cache root (``$RACO_DS_CACHE`` or ``~/.cache/raco_ds``), created if missing."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raco_ds").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``final`` when the block succeeds.

    If ``final`` already exists when the block ends (another process finished
    first), the temporary copy is dropped and the existing one kept: entries
    are content-addressed or deterministic, so both copies are equivalent.
    On an exception the temporary folder is removed and ``final`` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    # mkdtemp makes the folder private (0700); a shared cache should follow the umask like any folder.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            # rename onto an existing non-empty folder fails: someone else won the race
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s folder; it replaces ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex}"
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
