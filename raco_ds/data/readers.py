"""Reading raw rows from local files or HF datasets, each with its ``file:row`` reference.

Sources:

* ``*.jsonl`` (and ``*.json`` files holding JSON lines): parsed line by line
  with Python's ``json``, so a broken line is reported by its 1-based line
  number and can be skipped on its own (HF's Arrow JSON reader fails the whole
  file with a byte offset and cannot skip one line).
* ``*.json`` holding one JSON array of objects: row = 1-based element index; a
  syntax error is reported at the line where the decoder stopped.
* ``*.parquet`` / ``*.arrow`` files and ``save_to_disk`` folders: read through
  HF ``datasets`` (``Dataset.from_parquet``, ``Dataset.from_file``,
  ``load_from_disk``); a ``DatasetDict`` must have a ``train`` split. Row =
  1-based record index.
* an in-memory ``datasets.Dataset`` (e.g. the result of ``load_dataset``).
* a :class:`~raco_ds.data.hub.HubSource`: one split read through
  ``datasets.load_dataset`` (a Hub name or a local folder laid out like a Hub
  repository), its name in errors ``path[config=...,split=...]``. Row =
  1-based record index within the split.

Every file must be UTF-8: a line that is not is an invalid row (``file:row``
and the offending byte), so ``skip_invalid`` can skip it like any other. A
source without a single row is an error naming it.

Nothing but a HubSource with a Hub name is downloaded: a path that does not exist is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raco_ds.data.hub import HubSource, load_hub
from raco_ds.data.records import DataError, InvalidRowError, RowRef

__all__ = ["RawRow", "read_rows", "source_name"]

RawRow = tuple[RowRef, "dict[str, Any] | InvalidRowError"]
"""A row reference with either the row's fields or the error that made it unreadable."""


def source_name(source: Any) -> str:
    """A printable name for a source: the path, or an in-memory dataset's fingerprint."""
    if isinstance(source, (str, os.PathLike, HubSource)):
        return str(source)
    fingerprint = getattr(source, "_fingerprint", None)
    return f"<dataset {fingerprint}>" if fingerprint else "<dataset>"


def read_rows(source: Any) -> Iterator[RawRow]:
    """Yield ``(RowRef, row dict | InvalidRowError)`` for every row of ``source``.

    Unreadable rows (broken JSON, bytes that are not UTF-8, a value that is not
    an object) are yielded as errors, not raised, so the caller can apply its
    ``skip_invalid`` policy. A missing file raises ``FileNotFoundError``; an
    unknown file type or a source without rows raises :class:`DataError`: no row
    of such a source can be used.
    """
    rows = 0
    for item in _read_source(source):
        rows += 1
        yield item
    if rows == 0:
        raise DataError(
            f"{source_name(source)}: no rows (the file is empty); put preference rows in it, or point --data "
            "(or the dataset spec) at another file"
        )


def _read_source(source: Any) -> Iterator[RawRow]:
    if isinstance(source, HubSource):
        yield from _read_dataset(load_hub(source), str(source))
        return
    if not isinstance(source, (str, os.PathLike)):
        yield from _read_dataset(source, source_name(source))
        return
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"data file {path} does not exist; give a local jsonl/json/parquet file or a save_to_disk folder "
            "(raco_ds never downloads data)"
        )
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(
                    f"{path} is a DatasetDict without a 'train' split (splits: {list(loaded)}); save one split"
                )
            loaded = loaded["train"]
        yield from _read_dataset(loaded, str(path))
    elif path.suffix == ".jsonl":
        yield from _read_json_lines(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix in (".parquet", ".arrow"):
        import datasets

        reader = datasets.Dataset.from_parquet if path.suffix == ".parquet" else datasets.Dataset.from_file
        yield from _read_dataset(reader(str(path)), str(path))
    else:
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; "
            "use .jsonl, .json, .parquet, .arrow or a save_to_disk folder"
        )


def _as_row(where: RowRef, value: Any) -> dict[str, Any] | InvalidRowError:
    if isinstance(value, dict):
        return value
    return InvalidRowError(where, "<row>", f"expected a JSON object, got {type(value).__name__}")


_NOT_UTF8_FIX = "save the file as UTF-8, or skip such rows with --data.skip_invalid true"


def _not_utf8(error: UnicodeDecodeError, column: int) -> str:
    return f"not UTF-8 (byte 0x{error.object[error.start]:02x} at column {column})"


def _read_json_lines(path: Path) -> Iterator[RawRow]:
    with open(path, "rb") as handle:  # decoded line by line, so a bad byte costs one row, not the file
        for line_number, raw in enumerate(handle, start=1):
            where = RowRef(str(path), line_number)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                column = len(raw[: error.start].decode("utf-8", errors="replace")) + 1
                yield where, InvalidRowError(where, "<encoding>", _not_utf8(error, column), _NOT_UTF8_FIX)
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                yield where, InvalidRowError(where, "<json>", f"broken JSON ({error.msg} at column {error.colno})")
                continue
            yield where, _as_row(where, value)


def _read_json(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    if not data.lstrip().startswith(b"["):
        yield from _read_json_lines(path)  # HF convention: a .json file may hold JSON lines
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        # One bad byte makes the whole array unusable: report its line.
        line_start = data.rfind(b"\n", 0, error.start) + 1
        column = len(data[line_start : error.start].decode("utf-8", errors="replace")) + 1
        where = RowRef(str(path), data.count(b"\n", 0, error.start) + 1)
        raise InvalidRowError(where, "<encoding>", _not_utf8(error, column), "save the file as UTF-8") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        # One broken array makes every row unusable: report where the decoder stopped.
        raise InvalidRowError(
            RowRef(str(path), error.lineno), "<json>", f"broken JSON array ({error.msg})", "fix the file"
        ) from error
    for index, value in enumerate(values, start=1):
        where = RowRef(str(path), index)
        yield where, _as_row(where, value)


def _read_dataset(dataset: Any, name: str) -> Iterator[RawRow]:
    for index, row in enumerate(dataset, start=1):
        where = RowRef(name, index)
        yield where, _as_row(where, row)
