"""Which failures are the user's to fix, and the one ``error:`` line each becomes.

A user error (a bad option, config or data row, a damaged checkpoint, a path
that cannot be written, a full disk, a model that diverged) is printed as one
line naming what was found, where (file, row, field) and a fix that works, and
the launcher exits with :data:`EXIT_USER_ERROR`; anything else is a bug and
keeps its traceback. Import cost: the exception classes live in modules that
import torch, so launchers import this after their argument parsing.
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable

from raco_ds.data.records import DataError
from raco_ds.diskspace import DiskFullError
from raco_ds.onepass import OnePassMismatchError
from raco_ds.preemption import OutputDirLockError
from raco_ds.step_stats import NonFiniteGradientError
from raco_ds.trainer.checkpoint import CheckpointError
from raco_ds.trainer.config import ConfigError
from raco_ds.trainer.export import ExportError
from raco_ds.trainer.step_record import TooManySkippedSteps

__all__ = ["EXIT_USER_ERROR", "USER_ERRORS", "run_reporting_user_errors", "user_error_line"]

EXIT_USER_ERROR = 2
"""Exit status of a run stopped by a user error (argparse's convention for bad usage)."""

USER_ERRORS = (ConfigError, CheckpointError, DataError, ExportError, OutputDirLockError, DiskFullError,
               FileNotFoundError, NonFiniteGradientError, TooManySkippedSteps, OnePassMismatchError)  # fmt: skip
"""The exception types that are user errors (a full disk, a missing file; a diverged run; one-pass
capture forced on a model it cannot capture exactly). Any ``OSError`` that names a path (a permission,
a read-only file system) is one too; one without a path (a refused connection) keeps its traceback."""

_PATH_FIXES = {
    errno.EACCES: "give this user write access to it, or pass another --output-dir",
    errno.EPERM: "give this user write access to it, or pass another --output-dir",
    errno.EROFS: "pass an --output-dir on a writable file system",
    errno.ENOSPC: "free space on that file system, then rerun (with --resume once the run has a checkpoint)",
    errno.EDQUOT: "free space within your quota there, then rerun (with --resume once the run has a checkpoint)",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a file stands where a folder is expected; move it, or pass another --output-dir",
    errno.EISDIR: "a folder stands where a file is expected; check the path",
}


def user_error_line(error: BaseException) -> str | None:
    """The ``error: ...`` line for a user error, or None when ``error`` is a bug (keep its traceback)."""
    names_a_path = isinstance(error, OSError) and error.filename is not None
    if not (isinstance(error, USER_ERRORS) or names_a_path):
        return None
    if names_a_path:
        fix = _PATH_FIXES.get(error.errno, "check the path and its permissions")
        return f"error: {error.filename}: {error.strerror or error}; {fix}"
    return f"error: {error}"


def run_reporting_user_errors(job: Callable[[], object], *, debug: bool = False) -> int:
    """Run ``job``; a user error prints its one ``error:`` line (after its traceback when ``debug``)
    and returns :data:`EXIT_USER_ERROR`, a bug propagates with its traceback; 0 when ``job`` returns."""
    try:
        job()
    except Exception as err:
        line = user_error_line(err)
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
