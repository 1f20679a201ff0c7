"""The objectives spec: which objectives there are, their weights, and where each label comes from.

A :class:`DatasetSpec` names the data's shape:

``shared``
    One pair per row, a label per objective (PKU-SafeRLHF: ``prompt``,
    ``response_0``, ``response_1``; helpful <- ``better_response_id``, harmless
    <- ``safer_response_id``). Each objective's ``label_field`` holds the id of
    the response it prefers.
``per_objective``
    Each objective has its own files of (prompt, chosen, rejected) rows:
    ``row_style="trl"`` for TRL's ``prompt``/``chosen``/``rejected`` columns
    (plain strings or conversational message lists), ``row_style="hh"`` for
    Anthropic HH-RLHF ``chosen``/``rejected`` transcripts. TRL data with one
    objective is this shape with K = 1 (:func:`trl_spec`).
``scored``
    Derived pairs: rows of (prompt, response, score per attribute); every two
    responses to the same prompt form a pair and each objective compares one
    score field (HelpSteer: helpfulness, higher wins; verbosity, lower wins).
    Equal scores give a tie (label 0).

Named presets for the bundled files in ``data/`` (see data/SOURCES.md) are in
:data:`PRESETS`; :func:`get_preset` builds one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DATA_DIR_ENV",
    "PRESETS",
    "DatasetSpec",
    "ObjectiveSpec",
    "bundled_data_dir",
    "get_preset",
    "trl_spec",
]

Format = Literal["shared", "per_objective", "scored"]
RowStyle = Literal["trl", "hh"]

DATA_DIR_ENV = "RACO_DS_DATA"
"""Environment variable that overrides where the bundled data files are looked up."""


@dataclass(frozen=True, kw_only=True)
class ObjectiveSpec:
    """One objective: its name, its user weight and where its label comes from."""

    name: str
    """Objective name, used in logs, metrics and error messages."""
    weight: float = 1.0
    """User weight (>= 0); weights are normalised onto the simplex by :meth:`DatasetSpec.weights`."""
    label_field: str | None = None
    """``shared``: the field holding the id of the response this objective prefers.
    ``scored``: the score field compared between the two responses. Unused for ``per_objective``."""
    files: tuple[str, ...] = ()
    """``per_objective``: this objective's own data files. Unused for the other formats."""
    higher_is_better: bool = True
    """``scored``: True when the higher score wins, False when the lower one does (verbosity)."""


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """The shape of a preference data set and the objectives it trains."""

    format: Format
    """``shared``, ``per_objective`` or ``scored`` (see the module docstring)."""
    objectives: tuple[ObjectiveSpec, ...]
    """The objectives, in the order of the label rows (K of them)."""
    files: tuple[str, ...] = ()
    """``shared`` / ``scored``: the data files (jsonl, json, parquet or ``save_to_disk`` folders)."""
    row_style: RowStyle = "trl"
    """``per_objective``: ``trl`` (prompt/chosen/rejected columns) or ``hh`` (chosen/rejected transcripts)."""
    prompt_field: str = "prompt"
    """Field with the prompt (a string, or a list of chat messages)."""
    response_fields: tuple[str, str] = ("response_0", "response_1")
    """``shared``: the fields of response A and response B."""
    response_ids: tuple[Any, Any] = (0, 1)
    """``shared``: the label-field values meaning "A is preferred" and "B is preferred"."""
    response_field: str = "response"
    """``scored``: the field with the response text."""
    chosen_field: str = "chosen"
    """``per_objective``: the field with the preferred response (or transcript)."""
    rejected_field: str = "rejected"
    """``per_objective``: the field with the other response (or transcript)."""
    score_range: tuple[float, float] | None = None
    """``scored``: allowed (min, max) of every score field, inclusive; None accepts any number."""
    skip_invalid: bool = False
    """Skip and count malformed rows instead of raising (see :mod:`raco_ds.data.loading`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        object.__setattr__(self, "files", tuple(str(f) for f in self.files))
        if self.format not in ("shared", "per_objective", "scored"):
            raise ValueError(
                f"DatasetSpec.format={self.format!r} is not a known shape; use 'shared', 'per_objective' or 'scored'"
            )
        if not self.objectives:
            raise ValueError("DatasetSpec.objectives is empty; name at least one objective")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"DatasetSpec.objectives has duplicate names {names}; give each objective its own name")
        if any(o.weight < 0 for o in self.objectives) or sum(o.weight for o in self.objectives) <= 0:
            raise ValueError(
                f"objective weights {[o.weight for o in self.objectives]} must be >= 0 with a positive sum"
            )
        if self.format == "per_objective":
            if self.row_style not in ("trl", "hh"):
                raise ValueError(f"DatasetSpec.row_style={self.row_style!r}; use 'trl' or 'hh'")
            for o in self.objectives:
                if not o.files:
                    raise ValueError(
                        f"objective {o.name!r} has no files; per_objective data needs ObjectiveSpec.files per objective"
                    )
        else:
            if not self.files:
                raise ValueError(f"DatasetSpec.files is empty; {self.format} data needs at least one file")
            for o in self.objectives:
                if not o.label_field:
                    raise ValueError(
                        f"objective {o.name!r} has no label_field; {self.format} data reads each label from a field"
                    )

    @property
    def num_objectives(self) -> int:
        """K, the number of objectives."""
        return len(self.objectives)

    @property
    def objective_names(self) -> tuple[str, ...]:
        """Objective names in label order."""
        return tuple(o.name for o in self.objectives)

    @property
    def shared(self) -> bool:
        """True when every pair carries a label for every objective (``shared`` and ``scored``)."""
        return self.format != "per_objective"

    def weights(self) -> tuple[float, ...]:
        """User weights normalised onto the simplex (sum 1)."""
        total = sum(o.weight for o in self.objectives)
        return tuple(o.weight / total for o in self.objectives)

    def all_files(self) -> tuple[str, ...]:
        """Every file the spec reads, in reading order."""
        if self.format == "per_objective":
            return tuple(f for o in self.objectives for f in o.files)
        return self.files

    def with_weights(self, weights: Sequence[float]) -> DatasetSpec:
        """Return a copy with new user weights, one per objective in order."""
        if len(weights) != self.num_objectives:
            raise ValueError(
                f"got {len(weights)} weights for {self.num_objectives} objectives {list(self.objective_names)}"
            )
        objectives = tuple(
            dataclasses.replace(o, weight=float(w)) for o, w in zip(self.objectives, weights, strict=True)
        )
        return dataclasses.replace(self, objectives=objectives)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` reads back (used in cache keys and configs)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetSpec:
        """Build a spec from a dict (e.g. a YAML config); unknown keys are an error."""
        _reject_unknown(cls, data, "dataset spec")
        values = dict(data)
        objectives = []
        for o in values.pop("objectives", ()):
            _reject_unknown(ObjectiveSpec, o, "objective")
            objectives.append(ObjectiveSpec(**{**o, "files": tuple(o.get("files", ()))}))
        for key in ("files", "response_fields", "response_ids", "score_range"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(objectives=tuple(objectives), **values)


def _reject_unknown(cls: type, data: Mapping[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known keys are {sorted(known)}")


def trl_spec(files: Sequence[str], name: str = "preference", **options: Any) -> DatasetSpec:
    """A single-objective spec for TRL ``prompt``/``chosen``/``rejected`` files (plain or conversational)."""
    return DatasetSpec(
        format="per_objective",
        row_style="trl",
        objectives=(ObjectiveSpec(name=name, files=tuple(files)),),
        **options,
    )


def bundled_data_dir() -> Path:
    """The folder with the bundled sample files (``$RACO_DS_DATA`` or the repository's ``data/``)."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "data")


def _pku_saferlhf(data_dir: Path) -> DatasetSpec:
    # Shared pairs: the RACO paper's safety setting. 400 rows, 90 where the two labels disagree.
    return DatasetSpec(
        format="shared",
        files=(str(data_dir / "pku_saferlhf_sample.jsonl"),),
        objectives=(
            ObjectiveSpec(name="helpful", label_field="better_response_id"),
            ObjectiveSpec(name="harmless", label_field="safer_response_id"),
        ),
    )


def _hh_rlhf(data_dir: Path) -> DatasetSpec:
    # The upstream sample holds one row no loader can use (an empty rejected reply at
    # hh_rlhf_helpful_sample.jsonl:248). The preset skips and logs it explicitly so the
    # default run works; pass skip_invalid=False to see the error.
    return DatasetSpec(
        format="per_objective",
        row_style="hh",
        skip_invalid=True,
        objectives=(
            ObjectiveSpec(name="helpful", files=(str(data_dir / "hh_rlhf_helpful_sample.jsonl"),)),
            ObjectiveSpec(name="harmless", files=(str(data_dir / "hh_rlhf_harmless_sample.jsonl"),)),
        ),
    )


def _helpsteer(data_dir: Path) -> DatasetSpec:
    # Derived pairs: every two responses to one prompt; HelpSteer scores are integers 0-4.
    return DatasetSpec(
        format="scored",
        files=(str(data_dir / "helpsteer_sample.jsonl"),),
        score_range=(0, 4),
        objectives=(
            ObjectiveSpec(name="helpfulness", label_field="helpfulness", higher_is_better=True),
            ObjectiveSpec(name="concise", label_field="verbosity", higher_is_better=False),
        ),
    )


PRESETS: dict[str, Callable[[Path], DatasetSpec]] = {
    "pku_saferlhf": _pku_saferlhf,
    "hh_rlhf": _hh_rlhf,
    "helpsteer": _helpsteer,
}
"""Named specs for the bundled files: name -> builder taking the data folder."""


def get_preset(name: str, data_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> DatasetSpec:
    """Build the preset ``name`` for files in ``data_dir`` (default :func:`bundled_data_dir`).

    ``overrides`` replace spec fields, e.g. ``skip_invalid=False``.

    >>> get_preset("pku_saferlhf").objective_names
    ('helpful', 'harmless')
    """
    if name not in PRESETS:
        raise ValueError(f"unknown data preset {name!r}; known presets: {sorted(PRESETS)}")
    spec = PRESETS[name](Path(data_dir) if data_dir is not None else bundled_data_dir())
    return dataclasses.replace(spec, **overrides) if overrides else spec
