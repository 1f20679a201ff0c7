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

A data file can also be a :class:`~raco_ds.data.hub.HubSource` (a data set
read through ``datasets.load_dataset``); its rows are parsed like a file's.
Field names may be dotted paths into nested rows (``summaries.0.text``).

Named presets are in :data:`PRESETS`: the bundled samples in ``data/`` (see
data/SOURCES.md) and the full Hub data sets (docs/data.md);
:func:`get_preset` builds one and :func:`resolve_dataset` turns the trainer's
``--data`` value into a spec.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raco_ds.data.hub import HubSource, is_saved_dataset
from raco_ds.data.records import DataError

__all__ = [
    "DATA_DIR_ENV",
    "FORMAT_NAMES",
    "PRESETS",
    "SHORTER",
    "DatasetSpec",
    "ObjectiveSpec",
    "Source",
    "bundled_data_dir",
    "get_preset",
    "resolve_dataset",
    "select_objectives",
    "trl_spec",
]

Format = Literal["shared", "per_objective", "scored"]
FORMAT_NAMES: tuple[str, ...] = ("shared", "per_objective", "scored")
"""The data shapes; :data:`raco_ds.data.formats.FORMATS` has one parser per name."""
RowStyle = Literal["trl", "hh"]
Source = str | HubSource
"""Where rows come from: a local file or folder path, or a data set read through ``load_dataset``."""

SHORTER = "@shorter"
"""``shared``: an objective with this ``label_field`` prefers the response with fewer words (equal: a tie)."""

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
    """``shared``: the field holding the id of the response this objective prefers, or :data:`SHORTER`
    (the response with fewer words wins). ``scored``: the score field compared between the two
    responses. Unused for ``per_objective``."""
    files: tuple[Source, ...] = ()
    """``per_objective``: this objective's own data files (or Hub sources). Unused for the other formats."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", _sources(self.files))
    higher_is_better: bool = True
    """``scored``: True when the higher score wins, False when the lower one does (verbosity)."""


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """The shape of a preference data set and the objectives it trains."""

    format: Format
    """``shared``, ``per_objective`` or ``scored`` (see the module docstring)."""
    objectives: tuple[ObjectiveSpec, ...]
    """The objectives, in the order of the label rows (K of them)."""
    files: tuple[Source, ...] = ()
    """``shared`` / ``scored``: the data files (jsonl, json, parquet, ``save_to_disk`` folders or Hub sources)."""
    row_style: RowStyle = "trl"
    """``per_objective``: ``trl`` (prompt/chosen/rejected columns) or ``hh`` (chosen/rejected transcripts)."""
    prompt_field: str = "prompt"
    """Field with the prompt (a string, or a list of chat messages)."""
    prompt_template: str | None = None
    """``shared`` / ``scored``: build the prompt (one user turn) from several fields instead of reading
    prompt_field: each ``{field.path}`` is replaced by that field's text, e.g.
    ``"TITLE: {info.title}\\nPOST: {info.post}\\n\\nTL;DR:"``."""
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
        object.__setattr__(self, "files", _sources(self.files))
        if self.format not in FORMAT_NAMES:
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
                if o.label_field == SHORTER and self.format != "shared":
                    raise ValueError(f"objective {o.name!r}: label_field {SHORTER!r} applies to shared pairs only")
        if self.prompt_template is not None and self.format == "per_objective":
            raise ValueError("DatasetSpec.prompt_template applies to shared and scored data; per_objective reads "
                             "prompt_field (or HH transcripts)")

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

    def all_files(self) -> tuple[Source, ...]:
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
            objectives.append(ObjectiveSpec(**{**o, "files": _sources_from_dicts(o.get("files", ()))}))
        values["files"] = _sources_from_dicts(values.get("files", ()))
        for key in ("response_fields", "response_ids", "score_range"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(objectives=tuple(objectives), **values)


def _sources(files: Sequence[Source]) -> tuple[Source, ...]:
    return tuple(f if isinstance(f, HubSource) else str(f) for f in files)


def _sources_from_dicts(files: Sequence[Any]) -> tuple[Source, ...]:
    return tuple(HubSource.from_dict(f) if isinstance(f, Mapping) else f for f in files)


def _reject_unknown(cls: type, data: Mapping[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known keys are {sorted(known)}")


def trl_spec(files: Sequence[Source], name: str = "preference", **options: Any) -> DatasetSpec:
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


def _bundled(data_dir: str | None) -> Path:
    return Path(data_dir) if data_dir is not None else bundled_data_dir()


def _pku_saferlhf(data_dir: str | None) -> DatasetSpec:
    # Shared pairs: the RACO paper's safety setting. 400 rows, 90 where the two labels disagree.
    return DatasetSpec(
        format="shared",
        files=(str(_bundled(data_dir) / "pku_saferlhf_sample.jsonl"),),
        objectives=_PKU_OBJECTIVES,
    )


def _hh_rlhf(data_dir: str | None) -> DatasetSpec:
    # The upstream sample holds one row no loader can use (an empty rejected reply at
    # hh_rlhf_helpful_sample.jsonl:248). The preset skips and logs it explicitly so the
    # default run works; pass skip_invalid=False to see the error.
    folder = _bundled(data_dir)
    return DatasetSpec(
        format="per_objective",
        row_style="hh",
        skip_invalid=True,
        objectives=(
            ObjectiveSpec(name="helpful", files=(str(folder / "hh_rlhf_helpful_sample.jsonl"),)),
            ObjectiveSpec(name="harmless", files=(str(folder / "hh_rlhf_harmless_sample.jsonl"),)),
        ),
    )


def _helpsteer(data_dir: str | None) -> DatasetSpec:
    # Derived pairs: every two responses to one prompt; HelpSteer scores are integers 0-4.
    return DatasetSpec(
        format="scored",
        files=(str(_bundled(data_dir) / "helpsteer_sample.jsonl"),),
        score_range=(0, 4),
        objectives=_HELPSTEER_OBJECTIVES[:1] + _HELPSTEER_OBJECTIVES[-1:],
    )


_PKU_OBJECTIVES = (
    ObjectiveSpec(name="helpful", label_field="better_response_id"),
    ObjectiveSpec(name="harmless", label_field="safer_response_id"),
)
_HELPSTEER_OBJECTIVES = (
    ObjectiveSpec(name="helpfulness", label_field="helpfulness"),
    ObjectiveSpec(name="correctness", label_field="correctness"),
    ObjectiveSpec(name="coherence", label_field="coherence"),
    ObjectiveSpec(name="complexity", label_field="complexity"),
    ObjectiveSpec(name="verbosity", label_field="verbosity"),
    ObjectiveSpec(name="concise", label_field="verbosity", higher_is_better=False),
)
# The Reddit TL;DR prompt of the summarisation paper's comparisons (CNN/DM rows, which have an
# article and no post, are invalid rows under this template and are skipped by the preset).
_TLDR_PROMPT = "SUBREDDIT: r/{info.subreddit}\nTITLE: {info.title}\nPOST: {info.post}\n\nTL;DR:"


def _hub_pku_saferlhf(path: str | None) -> DatasetSpec:
    # All three response models' pairs (the default config: data/*/train.jsonl); --data.config_name
    # alpaca-7b (or alpaca2-7b, alpaca3-8b) picks one.
    return DatasetSpec(
        format="shared", files=(HubSource(path=path or "PKU-Alignment/PKU-SafeRLHF"),), objectives=_PKU_OBJECTIVES
    )


def _hub_hh_rlhf(path: str | None) -> DatasetSpec:
    # Separate pairs per objective, one data_dir each, as the dataset card's usage section loads them.
    # The full files hold a few rows with an empty reply (as the sample does): skipped and counted.
    path = path or "Anthropic/hh-rlhf"
    return DatasetSpec(
        format="per_objective",
        row_style="hh",
        skip_invalid=True,
        objectives=(
            ObjectiveSpec(name="helpful", files=(HubSource(path=path, data_dir="helpful-base"),)),
            ObjectiveSpec(name="harmless", files=(HubSource(path=path, data_dir="harmless-base"),)),
        ),
    )


def _hub_helpsteer(default: str) -> Callable[[str | None], DatasetSpec]:
    # HelpSteer and HelpSteer2 share the row schema (prompt, response, five 0-4 scores); pairs are
    # derived per prompt as for the bundled sample. Select objectives with --objectives.
    def build(path: str | None) -> DatasetSpec:
        return DatasetSpec(
            format="scored",
            files=(HubSource(path=path or default),),
            score_range=(0, 4),
            objectives=_HELPSTEER_OBJECTIVES,
        )

    return build


def _hub_summarize_from_feedback(path: str | None) -> DatasetSpec:
    # The comparisons config: two summaries of one post and the labeller's choice; concise = fewer words.
    # Its main branch holds only a loading script, which datasets no longer runs; the Hub's parquet
    # conversion (revision refs/convert/parquet, folder comparisons/) holds the same rows.
    return DatasetSpec(
        format="shared",
        files=(HubSource(path=path or "openai/summarize_from_feedback", revision="refs/convert/parquet",
                         data_dir="comparisons"),),
        prompt_template=_TLDR_PROMPT,
        response_fields=("summaries.0.text", "summaries.1.text"),
        skip_invalid=True,
        objectives=(ObjectiveSpec(name="quality", label_field="choice"), ObjectiveSpec(name="concise",
                                                                                     label_field=SHORTER)),
    )  # fmt: skip


PRESETS: dict[str, Callable[[str | None], DatasetSpec]] = {
    "pku_saferlhf": _pku_saferlhf,
    "hh_rlhf": _hh_rlhf,
    "helpsteer": _helpsteer,
    "PKU-Alignment/PKU-SafeRLHF": _hub_pku_saferlhf,
    "Anthropic/hh-rlhf": _hub_hh_rlhf,
    "nvidia/HelpSteer": _hub_helpsteer("nvidia/HelpSteer"),
    "nvidia/HelpSteer2": _hub_helpsteer("nvidia/HelpSteer2"),
    "openai/summarize_from_feedback": _hub_summarize_from_feedback,
}
"""Named specs: the bundled samples (short names; the builder takes the folder holding them, None:
:func:`bundled_data_dir`) and the full Hub data sets (Hub names; the builder takes a local folder laid
out like the Hub repository, None: the Hub name itself)."""


def get_preset(name: str, data_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> DatasetSpec:
    """Build the preset ``name``, reading from ``data_dir`` (default: the bundled samples, or the Hub).

    ``overrides`` replace spec fields, e.g. ``skip_invalid=False``.

    >>> get_preset("pku_saferlhf").objective_names
    ('helpful', 'harmless')
    >>> print(get_preset("Anthropic/hh-rlhf").objectives[1].files[0])
    Anthropic/hh-rlhf[data_dir=harmless-base,split=train]
    """
    if name not in PRESETS:
        raise ValueError(f"unknown data preset {name!r}; known presets: {sorted(PRESETS)}")
    spec = PRESETS[name](None if data_dir is None else str(data_dir))
    return dataclasses.replace(spec, **overrides) if overrides else spec


def select_objectives(spec: DatasetSpec, names: Sequence[str]) -> DatasetSpec:
    """``spec`` with only the objectives ``names``, in that order (a DataError names unknown ones)."""
    available = {o.name: o for o in spec.objectives}
    unknown = [name for name in names if name not in available]
    if unknown:
        raise DataError(
            f"objectives {unknown} are not in this data set, which has {list(available)}; "
            f"pass --objectives {','.join(list(available)[:max(len(names), 2)])} (any of its objectives, in any order)"
        )
    return dataclasses.replace(spec, objectives=tuple(available[name] for name in names))


def resolve_dataset(
    dataset: str,
    *,
    objectives: Sequence[str],
    data_dir: str | None = None,
    config_name: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> DatasetSpec:
    """The spec of the trainer's ``--data`` value, with the objectives ``objectives`` selected.

    ``dataset`` is a preset name (a bundled sample or a Hub data set, see :data:`PRESETS`), a local
    file or ``save_to_disk`` folder in TRL format, a local folder laid out like a Hub repository, or
    any other Hub name (TRL ``prompt``/``chosen``/``rejected`` columns, one objective). The
    ``load_dataset`` options (``config_name``, ``split``, ``revision``, ``columns``) apply to every
    Hub source of the spec; with a local file or a bundled sample they are a DataError.
    """
    if dataset in PRESETS:
        spec = get_preset(dataset, data_dir)
    elif Path(dataset).is_dir() and not is_saved_dataset(dataset):
        spec = trl_spec([HubSource(path=dataset)])
    elif Path(dataset).exists():
        spec = trl_spec([dataset])
    elif _HUB_NAME.fullmatch(dataset) and Path(dataset).suffix not in _FILE_SUFFIXES:
        spec = trl_spec([HubSource(path=dataset)])
    else:
        raise DataError(
            f"data.dataset={dataset!r} is neither a preset {sorted(PRESETS)}, an existing file or folder, "
            "nor a Hub name (owner/name)"
        )
    options = {"name": config_name, "split": split, "revision": revision, "columns": columns}
    options = {key: value for key, value in options.items() if value}
    if options:
        spec = _with_hub_options(spec, dataset, options)
    return select_objectives(spec, objectives)


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")  # a missing local file, not a Hub name


def _with_hub_options(spec: DatasetSpec, dataset: str, options: dict[str, Any]) -> DatasetSpec:
    def apply(files: tuple[Source, ...]) -> tuple[Source, ...]:
        return tuple(dataclasses.replace(f, **options) if isinstance(f, HubSource) else f for f in files)

    if not any(isinstance(f, HubSource) for f in spec.all_files()):
        flags = ", ".join(f"--data.{'config_name' if key == 'name' else key}" for key in options)
        raise DataError(f"{flags} apply to data read through load_dataset (a Hub name or a folder laid out like "
                        f"a Hub repository), not to {dataset!r}; drop them")  # fmt: skip
    objectives = tuple(dataclasses.replace(o, files=apply(o.files)) for o in spec.objectives)
    return dataclasses.replace(spec, files=apply(spec.files), objectives=objectives)
