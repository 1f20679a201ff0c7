"""What a parsed preference pair is, and how a bad input row is reported.

Every format (shared pairs, per-objective pairs, HH transcripts, HelpSteer
scores, TRL columns) is parsed into the same :class:`PreferencePair`: a chat
prompt (a list of messages ending with the user's turn), two responses A and B
and one label per objective. A row that cannot be parsed raises
:class:`InvalidRowError`, which always names ``file:row:field`` so the user can
open the file at that line; ``skip_invalid`` turns these errors into counted
skips (:class:`SkipLog`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DataError", "InvalidRowError", "Message", "PreferencePair", "RowRef", "SkipLog"]

logger = logging.getLogger(__name__)

Message = dict[str, str]
"""A chat message ``{"role": "system" | "user" | "assistant", "content": str}``."""


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: the file (or dataset name) and its 1-based row number.

    For JSON-lines files ``row`` is the line number in the file (blank lines
    count), for JSON arrays, parquet files and ``save_to_disk`` folders it is
    the 1-based record index.
    """

    file: str
    """Path of the file (or folder / in-memory dataset name) the row came from."""
    row: int
    """1-based row number: the line number for JSON lines, else the record index."""

    def __str__(self) -> str:
        return f"{self.file}:{self.row}"


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and row and field) and the fix."""


class InvalidRowError(DataError):
    """A malformed input row; the message starts with ``file:row:field``."""

    def __init__(self, where: RowRef, field: str, problem: str, fix: str = "") -> None:
        self.where = where
        self.field = field
        self.problem = problem
        hint = fix or (
            "fix or remove the row, or skip and count such rows with --data.skip_invalid true "
            "(skip_invalid=True in Python)"
        )
        super().__init__(f"{where}:{field}: {problem}; {hint}")


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: a prompt, two responses and a label per objective.

    Labels follow docs/CONTRACTS.md: +1 when the objective prefers A, -1 when
    it prefers B, 0 for a tie or for a pair that is not this objective's.
    """

    prompt: tuple[Message, ...]
    """Chat messages before the responses; the last one is the user's turn."""
    response_a: str
    """Text of response A (non-empty)."""
    response_b: str
    """Text of response B (non-empty)."""
    labels: tuple[int, ...]
    """One label in {+1, -1, 0} per objective, in the spec's objective order."""
    objective: int
    """Owning objective for per-objective data; -1 for shared pairs."""
    source: RowRef
    """Where the pair came from (for error messages and audits)."""


@dataclass
class SkipLog:
    """Counts of rows skipped under ``skip_invalid``, by file and by reason."""

    by_file: Counter[str] = field(default_factory=Counter)
    """Skipped rows per file."""
    by_field: Counter[str] = field(default_factory=Counter)
    """Skipped rows per offending field."""
    examples: list[str] = field(default_factory=list)
    """The first few error messages, verbatim, for the log."""

    max_examples: int = 5
    """How many error messages to keep verbatim."""

    @property
    def total(self) -> int:
        """Total number of skipped rows."""
        return sum(self.by_file.values())

    def add(self, error: InvalidRowError) -> None:
        """Count one skipped row."""
        self.by_file[error.where.file] += 1
        self.by_field[error.field] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def log(self) -> None:
        """Write one warning summarising the skips (nothing when none were skipped)."""
        if self.total:
            logger.warning(
                "skip_invalid: skipped %d malformed rows (by file %s, by field %s); first: %s",
                self.total,
                dict(self.by_file),
                dict(self.by_field),
                " | ".join(self.examples),
            )
