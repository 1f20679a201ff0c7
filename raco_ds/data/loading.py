"""Loading a :class:`DatasetSpec` into validated preference pairs.

Policy on bad input (issue 4): a malformed row (missing field, a label
outside its allowed values, an empty response, broken JSON) raises
:class:`InvalidRowError` naming ``file:row:field``. With
``skip_invalid=True`` (argument, or the spec's field) the row is skipped,
counted in :attr:`PreferenceData.skipped` and summarised in one log warning.
Either way, an objective left without a single non-tie pair is a
:class:`DataError` here, before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raco_ds.data.formats import FORMATS, ScoredStats
from raco_ds.data.hub import HubSource, load_hub
from raco_ds.data.objectives import DatasetSpec, Source
from raco_ds.data.readers import read_rows
from raco_ds.data.records import DataError, InvalidRowError, PreferencePair, SkipLog

__all__ = ["PreferenceData", "content_hash", "load_preference_data"]

logger = logging.getLogger(__name__)


@dataclass
class PreferenceData:
    """Validated pairs of a spec, in a fixed order (a pair's position is its ``pair_index``)."""

    spec: DatasetSpec
    """The spec the pairs were loaded from."""
    pairs: list[PreferencePair]
    """All pairs: shared data in file order; per-objective data objective by objective."""
    skipped: SkipLog = field(default_factory=SkipLog)
    """Rows skipped under ``skip_invalid``."""
    fingerprint: str = ""
    """sha256 of the spec and the content of every data file (a cache-key ingredient)."""
    scored: ScoredStats | None = None
    """For scored data: prompts, rows and pairs dropped as ties on every objective."""

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def objective_names(self) -> tuple[str, ...]:
        """Objective names in label order."""
        return self.spec.objective_names

    def label_counts(self) -> dict[str, dict[int, int]]:
        """Per objective, how many pairs carry each label (+1, -1, 0)."""
        counts = {name: {1: 0, -1: 0, 0: 0} for name in self.objective_names}
        for pair in self.pairs:
            for name, label in zip(self.objective_names, pair.labels, strict=True):
                counts[name][label] += 1
        return counts

    def indices_of_objective(self, objective: int) -> list[int]:
        """Pair indices owned by ``objective`` (per-objective data) or labelled non-tie by it (shared)."""
        if self.spec.shared:
            return [i for i, p in enumerate(self.pairs) if p.labels[objective] != 0]
        return [i for i, p in enumerate(self.pairs) if p.objective == objective]

    def to_hf_dataset(self) -> Any:
        """The pairs as a ``datasets.Dataset`` (prompt messages, responses, labels, objective, source)."""
        import datasets

        return datasets.Dataset.from_list(
            [
                {
                    "pair_index": i,
                    "prompt": list(p.prompt),
                    "response_a": p.response_a,
                    "response_b": p.response_b,
                    "labels": list(p.labels),
                    "objective": p.objective,
                    "source": str(p.source),
                }
                for i, p in enumerate(self.pairs)
            ]
        )


def content_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of every file under a folder (relative names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _source_hash(source: Source) -> str:
    if isinstance(source, HubSource):
        # A local copy: its bytes; a Hub name: the fingerprint datasets gives the downloaded split.
        local = Path(source.path)
        return content_hash(local) if local.is_dir() else load_hub(source)._fingerprint
    return content_hash(source)


def _where_independent(source: Any) -> Any:
    """A source's entry in the spec without the folder a local file or copy lies in: the content hash
    identifies it, so a moved checkout or a copied data folder keeps its caches."""
    if isinstance(source, Mapping):  # a HubSource: keep its config, split, revision and columns
        return {**source, "path": _where_independent(source["path"])}
    return Path(source).name if Path(source).exists() else source


def _fingerprint(spec: DatasetSpec) -> str:
    described = spec.to_dict()
    described["files"] = [_where_independent(f) for f in described["files"]]
    for objective in described["objectives"]:
        objective["files"] = [_where_independent(f) for f in objective["files"]]
    description = {"spec": described, "content": [_source_hash(f) for f in spec.all_files()]}
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def _rows_of(files: Iterable[Source]) -> Iterator[Any]:
    for file in files:
        yield from read_rows(file)


def load_preference_data(spec: DatasetSpec, skip_invalid: bool | None = None) -> PreferenceData:
    """Read, validate and label every pair of ``spec``.

    ``skip_invalid`` overrides ``spec.skip_invalid`` when given. Raises
    :class:`InvalidRowError` on the first malformed row (unless skipping) and
    :class:`DataError` when an objective has no usable (non-tie) pair.
    """
    skip = spec.skip_invalid if skip_invalid is None else skip_invalid
    stats = ScoredStats()
    parsed = FORMATS[spec.format](spec, _rows_of, stats)
    pairs: list[PreferencePair] = []
    skipped = SkipLog()
    for item in parsed:
        if isinstance(item, InvalidRowError):
            if not skip:
                raise item
            skipped.add(item)
        else:
            pairs.append(item)
    skipped.log()
    data = PreferenceData(spec, pairs, skipped, _fingerprint(spec), stats if spec.format == "scored" else None)
    _check_every_objective_has_pairs(data)
    logger.info(
        "loaded %d pairs for objectives %s (label counts %s, %d rows skipped)",
        len(pairs),
        list(spec.objective_names),
        data.label_counts(),
        skipped.total,
    )
    return data


def _check_every_objective_has_pairs(data: PreferenceData) -> None:
    for name, counts in data.label_counts().items():
        if counts[1] + counts[-1] == 0:
            raise DataError(
                f"objective {name!r} has no usable pairs: all {len(data.pairs)} loaded pairs tie on it or belong to "
                f"other objectives ({data.skipped.total} rows skipped as invalid); check its label_field / files in "
                "the dataset spec, or drop the objective"
            )
