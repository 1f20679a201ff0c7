"""Data sets by name through ``datasets.load_dataset``: a Hub repository, or a local folder laid out like one.

A :class:`HubSource` stands wherever a data file can stand in a
:class:`~raco_ds.data.objectives.DatasetSpec` (``files`` or an objective's
``files``); the formats parse its rows exactly like a local file's. Its name in
error messages is ``path[config=...,data_dir=...,split=...]``, so a bad row
reads ``PKU-Alignment/PKU-SafeRLHF[split=train]:17:safer_response_id: ...``
(row = 1-based record index within the split).

``path`` is what ``load_dataset`` takes: a Hub name (``Anthropic/hh-rlhf``),
or a local folder with the repository's files (a ``git clone`` or
``huggingface_hub.snapshot_download`` of the dataset repo), which
``load_dataset`` reads without the network. With ``HF_HUB_OFFLINE=1`` a Hub
name is served from the local Hugging Face cache of an earlier download.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raco_ds.data.records import DataError

__all__ = ["HubSource", "is_saved_dataset", "load_hub"]


@dataclass(frozen=True, kw_only=True)
class HubSource:
    """One split of a data set read through ``datasets.load_dataset``."""

    path: str
    """A Hub dataset name (``owner/name``) or a local folder laid out like the Hub repository."""
    name: str | None = None
    """The configuration (``load_dataset``'s ``name``), e.g. ``alpaca-7b``; None: the default one."""
    split: str = "train"
    """The split to read."""
    revision: str | None = None
    """A branch, tag or commit of the Hub repository (e.g. ``refs/convert/parquet``); None: main."""
    data_dir: str | None = None
    """A folder inside the repository (``load_dataset``'s ``data_dir``), e.g. ``helpful-base``."""
    columns: tuple[tuple[str, str], ...] = ()
    """Column renames applied before parsing, as (name in the data, name the format reads) pairs."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        columns = self.columns.items() if isinstance(self.columns, Mapping) else self.columns
        object.__setattr__(self, "columns", tuple((str(a), str(b)) for a, b in columns))

    def __str__(self) -> str:
        options = [f"{key}={value}" for key, value in (("config", self.name), ("data_dir", self.data_dir),
                                                       ("revision", self.revision), ("split", self.split)) if value]
        return f"{self.path}[{','.join(options)}]"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HubSource:
        """Build a source from a dict (a YAML config, or :func:`dataclasses.asdict`); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hub source keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def is_saved_dataset(path: str | Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


@functools.lru_cache(maxsize=4)
def load_hub(source: HubSource) -> Any:
    """The ``datasets.Dataset`` of ``source`` with its columns renamed; a failure is a :class:`DataError`.

    Cached per source: the loader reads a source once for its rows and once for the data
    fingerprint, and ``load_dataset`` itself re-validates its cache on every call.
    """
    import datasets

    try:
        dataset = datasets.load_dataset(
            source.path, source.name, split=source.split, revision=source.revision, data_dir=source.data_dir
        )
    except (OSError, ValueError) as error:  # not found, offline, unknown config or split
        raise DataError(
            f"{source}: load_dataset failed ({type(error).__name__}: {error}); check the name, config, split and "
            "revision. Without network access, download the repository elsewhere (huggingface_hub.snapshot_download) "
            "and pass its folder (--data.data_dir for a preset), or run with HF_HUB_OFFLINE=1 on a cached copy"
        ) from error
    renames = dict(source.columns)
    missing = sorted(set(renames) - set(dataset.column_names))
    if missing:
        raise DataError(
            f"{source}: the column mapping renames {missing}, which the data does not have "
            f"(columns: {dataset.column_names}); fix --data.columns"
        )
    clashes = sorted(set(renames.values()) & (set(dataset.column_names) - set(renames)))
    if clashes:
        raise DataError(
            f"{source}: the column mapping renames onto {clashes}, which the data already has "
            f"(columns: {dataset.column_names}); map that column too, or pick another target"
        )
    return dataset.rename_columns(renames) if renames else dataset
