"""Row formats: turning raw rows into :class:`PreferencePair` objects, one parser per shape.

Each parser takes the spec and raw rows (``(RowRef, dict | error)`` from
:mod:`raco_ds.data.readers`) and yields pairs or :class:`InvalidRowError`
objects; the loader decides whether an error raises or is skipped.

Labels: A is always the first response of the row (``response_0`` for shared
pairs, ``chosen`` for per-objective pairs, the earlier row for scored pairs).

* shared: objective k's label is +1 when ``row[label_field] == response_ids[0]``,
  -1 when it equals ``response_ids[1]``; anything else is an invalid row. With
  ``label_field="@shorter"`` the response with fewer words wins (a tie when
  equal): the summarisation setting's conciseness.
* per_objective: the pair's own objective gets +1 (chosen is A), the others 0.
* scored: +1 when A's score wins, -1 when B's wins, 0 on equal scores. A pair
  tied on every objective carries no gradient for anyone and is dropped
  (counted in :attr:`ScoredStats.all_tie_pairs`).
* HH transcripts: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` is split into user /
  assistant turns; the final assistant turns of ``chosen`` and ``rejected``
  are the two responses and the dialogue before them (which must be the same
  in both) is the prompt. Consecutive turns of the same speaker are merged
  (joined by a blank line) so roles alternate, as strict chat templates require.

Field names may be dotted paths into nested rows (``summaries.0.text``: key,
list index, key); a prompt may be built from several fields by the spec's
``prompt_template``. :data:`FORMATS` maps each spec format to its parser: the
loader has no other dispatch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import combinations
from numbers import Real
from typing import Any

from raco_ds.data.objectives import SHORTER, DatasetSpec, Source
from raco_ds.data.records import InvalidRowError, Message, PreferencePair, RowRef

__all__ = [
    "FORMATS",
    "ScoredStats",
    "parse_hh_transcript",
    "parse_per_objective",
    "parse_scored",
    "parse_shared",
]

Parsed = PreferencePair | InvalidRowError
RawRows = Iterable[tuple[RowRef, "dict[str, Any] | InvalidRowError"]]

_ROLES = ("system", "user", "assistant")
_TEMPLATE_FIELD = re.compile(r"\{([\w.]+)\}")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


# ---- field helpers -------------------------------------------------------------------------


def _field(row: dict[str, Any], name: str, where: RowRef) -> Any:
    """``row[name]``, or for a dotted path (``summaries.0.text``) the nested value; missing or null raises."""
    if name in row:
        value = row[name]
    else:
        value = row
        for part in name.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise InvalidRowError(where, name, f"missing field {name!r} (row has {sorted(row)})")
    if value is None:
        raise InvalidRowError(where, name, f"{name!r} is null (the row records no value for it)")
    return value


def _text(row: dict[str, Any], name: str, where: RowRef, what: str = "text") -> str:
    value = _field(row, name, where)
    if not isinstance(value, str):
        raise InvalidRowError(where, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRowError(where, name, f"empty {what}")
    return value


def _messages(value: Any, name: str, where: RowRef) -> tuple[Message, ...]:
    """Validate a conversational value: a list of {"role", "content"} dicts."""
    if not isinstance(value, list) or not value:
        raise InvalidRowError(where, name, "expected a string or a non-empty list of chat messages")
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in _ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidRowError(
                where, f"{name}[{i}]", f"expected {{'role': one of {_ROLES}, 'content': str}}, got {message!r:.80}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return tuple(messages)


def _prompt(row: dict[str, Any], name: str, where: RowRef) -> tuple[Message, ...]:
    """A prompt as chat messages: a plain string becomes one user turn."""
    value = _field(row, name, where)
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRowError(where, name, "empty prompt")
        return ({"role": "user", "content": value},)
    messages = _messages(value, name, where)
    if messages[-1]["role"] == "assistant":
        raise InvalidRowError(where, name, "the prompt ends with an assistant turn; it must end with the user's turn")
    return messages


def _row_prompt(spec: DatasetSpec, row: dict[str, Any], where: RowRef) -> tuple[Message, ...]:
    """The row's prompt: the spec's prompt_template filled from the row, else its prompt_field."""
    if spec.prompt_template is None:
        return _prompt(row, spec.prompt_field, where)
    text = _TEMPLATE_FIELD.sub(lambda match: _text(row, match.group(1), where), spec.prompt_template)
    return ({"role": "user", "content": text},)


def _words(text: str) -> int:
    return len(text.split())


def _response(value: Any, name: str, where: RowRef) -> str:
    """A response: a non-empty string or a conversational single assistant message."""
    if isinstance(value, list):
        messages = _messages(value, name, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise InvalidRowError(where, name, "a conversational response must be exactly one assistant message")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise InvalidRowError(where, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRowError(where, name, "empty response")
    return value


def _rows(raw: RawRows) -> Iterator[tuple[RowRef, dict[str, Any]] | InvalidRowError]:
    for where, row in raw:
        yield row if isinstance(row, InvalidRowError) else (where, row)


def _guard(parse: Callable[[RowRef, dict[str, Any]], Any], raw: RawRows) -> Iterator[Parsed]:
    """Run ``parse(where, row)`` on every readable row, turning InvalidRowError into yielded values."""
    for item in _rows(raw):
        if isinstance(item, InvalidRowError):
            yield item
            continue
        try:
            yield parse(*item)
        except InvalidRowError as error:
            yield error


# ---- shared pairs --------------------------------------------------------------------------


def parse_shared(spec: DatasetSpec, raw: RawRows) -> Iterator[Parsed]:
    """Shared pairs: one pair per row, each objective's label from its ``label_field``."""
    field_a, field_b = spec.response_fields
    id_a, id_b = spec.response_ids

    def parse(where: RowRef, row: dict[str, Any]) -> PreferencePair:
        prompt = _row_prompt(spec, row, where)
        response_a = _response(_field(row, field_a, where), field_a, where)
        response_b = _response(_field(row, field_b, where), field_b, where)
        labels = []
        for objective in spec.objectives:
            if objective.label_field == SHORTER:
                words_a, words_b = _words(response_a), _words(response_b)
                labels.append(0 if words_a == words_b else (1 if words_a < words_b else -1))
                continue
            value = _field(row, objective.label_field, where)
            if isinstance(value, bool) or value not in (id_a, id_b):
                raise InvalidRowError(
                    where, objective.label_field, f"label {value!r} is outside the allowed values ({id_a!r}, {id_b!r})"
                )
            labels.append(1 if value == id_a else -1)
        return PreferencePair(prompt, response_a, response_b, tuple(labels), -1, where)

    return _guard(parse, raw)


# ---- per-objective pairs (TRL columns or HH transcripts) ---------------------------------


def parse_hh_transcript(text: str, where: RowRef, name: str) -> tuple[Message, ...]:
    """Split an HH-RLHF transcript into chat messages (user / assistant turns, stripped).

    >>> parse_hh_transcript("\\n\\nHuman: Hi\\n\\nAssistant: Hello!", RowRef("f", 1), "chosen")
    ({'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'})
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise InvalidRowError(where, name, "the transcript must start with '\\n\\nHuman:'")
    turns: list[Message] = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        if turns and turns[-1]["role"] == _HH_ROLE[role]:
            # Upstream has a few consecutive same-speaker turns; strict chat templates (Gemma,
            # Llama-2) reject non-alternating roles, so such turns are merged.
            turns[-1] = {"role": turns[-1]["role"], "content": turns[-1]["content"] + "\n\n" + content.strip()}
        else:
            turns.append({"role": _HH_ROLE[role], "content": content.strip()})
    if not turns or turns[-1]["role"] != "assistant":
        raise InvalidRowError(where, name, "the transcript does not end with an '\\n\\nAssistant:' turn")
    return tuple(turns)


def parse_per_objective(spec: DatasetSpec, objective: int, raw: RawRows) -> Iterator[Parsed]:
    """Per-objective pairs of objective ``objective``: A = chosen (+1), B = rejected."""
    labels = tuple(1 if k == objective else 0 for k in range(spec.num_objectives))
    chosen_field, rejected_field = spec.chosen_field, spec.rejected_field

    def parse_hh(where: RowRef, row: dict[str, Any]) -> PreferencePair:
        chosen = parse_hh_transcript(_text(row, chosen_field, where, "transcript"), where, chosen_field)
        rejected = parse_hh_transcript(_text(row, rejected_field, where, "transcript"), where, rejected_field)
        if chosen[:-1] != rejected[:-1]:
            raise InvalidRowError(
                where, rejected_field, "the dialogue before the final Assistant reply differs from the chosen one's"
            )
        if not chosen[:-1]:
            raise InvalidRowError(where, chosen_field, "the transcript has no Human turn before the final reply")
        return PreferencePair(
            chosen[:-1],
            _response(chosen[-1]["content"], chosen_field, where),
            _response(rejected[-1]["content"], rejected_field, where),
            labels,
            objective,
            where,
        )

    def parse_trl(where: RowRef, row: dict[str, Any]) -> PreferencePair:
        chosen, rejected = _field(row, chosen_field, where), _field(row, rejected_field, where)
        if spec.prompt_field not in row and isinstance(chosen, list) and isinstance(rejected, list):
            # TRL's implicit prompt: full conversations sharing everything but the last reply.
            chosen_messages = _messages(chosen, chosen_field, where)
            rejected_messages = _messages(rejected, rejected_field, where)
            if chosen_messages[:-1] != rejected_messages[:-1] or len(chosen_messages) < 2:
                raise InvalidRowError(
                    where,
                    spec.prompt_field,
                    "missing prompt, and chosen/rejected do not share a prompt before the last reply",
                )
            prompt = _prompt({"p": list(chosen_messages[:-1])}, "p", where)
            chosen, rejected = [chosen_messages[-1]], [rejected_messages[-1]]
        else:
            prompt = _prompt(row, spec.prompt_field, where)
        return PreferencePair(
            prompt,
            _response(chosen, chosen_field, where),
            _response(rejected, rejected_field, where),
            labels,
            objective,
            where,
        )

    return _guard(parse_hh if spec.row_style == "hh" else parse_trl, raw)


# ---- scored rows -> derived pairs ------------------------------------------------------------


@dataclass
class ScoredStats:
    """What happened while deriving pairs from scored rows."""

    prompts: int = 0
    """Distinct prompts seen."""
    rows: int = 0
    """Valid scored rows."""
    all_tie_pairs: int = 0
    """Pairs dropped because every objective scored them equal (no gradient for anyone)."""


def parse_scored(spec: DatasetSpec, raw: RawRows, stats: ScoredStats | None = None) -> Iterator[Parsed]:
    """Derived pairs: every two valid responses to the same prompt (in row order) form a pair."""
    stats = stats if stats is not None else ScoredStats()
    groups: dict[str, list[tuple[RowRef, tuple[Message, ...], str, tuple[float, ...]]]] = {}

    def validate(where: RowRef, row: dict[str, Any]) -> None:
        prompt = _row_prompt(spec, row, where)
        response = _response(_field(row, spec.response_field, where), spec.response_field, where)
        scores = []
        for objective in spec.objectives:
            value = _field(row, objective.label_field, where)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise InvalidRowError(where, objective.label_field, f"score {value!r} is not a number")
            if spec.score_range is not None and not spec.score_range[0] <= value <= spec.score_range[1]:
                raise InvalidRowError(
                    where, objective.label_field, f"score {value!r} is outside the allowed range {spec.score_range}"
                )
            scores.append(float(value))
        key = repr([(m["role"], m["content"]) for m in prompt])
        groups.setdefault(key, []).append((where, prompt, response, tuple(scores)))

    for item in _guard(validate, raw):
        if item is not None:
            yield item  # an InvalidRowError; valid rows were grouped
    stats.prompts = len(groups)
    stats.rows = sum(len(g) for g in groups.values())
    signs = [1 if o.higher_is_better else -1 for o in spec.objectives]
    for group in groups.values():
        for (where, prompt, response_a, scores_a), (_, _, response_b, scores_b) in combinations(group, 2):
            labels = tuple(
                0 if a == b else (1 if (a - b) * sign > 0 else -1)
                for a, b, sign in zip(scores_a, scores_b, signs, strict=True)
            )
            if not any(labels):
                stats.all_tie_pairs += 1
                continue
            yield PreferencePair(prompt, response_a, response_b, labels, -1, where)


# ---- the registry ------------------------------------------------------------------------------

ReadRows = Callable[[tuple[Source, ...]], RawRows]
"""Reads the rows of some sources, in order (the loader's reader)."""
FormatParser = Callable[[DatasetSpec, ReadRows, ScoredStats], Iterator[Parsed]]
"""Parses a whole spec: its sources' rows to pairs and row errors."""


def _parse_shared_spec(spec: DatasetSpec, read: ReadRows, stats: ScoredStats) -> Iterator[Parsed]:
    return parse_shared(spec, read(spec.files))


def _parse_per_objective_spec(spec: DatasetSpec, read: ReadRows, stats: ScoredStats) -> Iterator[Parsed]:
    for k, objective in enumerate(spec.objectives):
        yield from parse_per_objective(spec, k, read(objective.files))


def _parse_scored_spec(spec: DatasetSpec, read: ReadRows, stats: ScoredStats) -> Iterator[Parsed]:
    return parse_scored(spec, read(spec.files), stats)


FORMATS: dict[str, FormatParser] = {
    "shared": _parse_shared_spec,
    "per_objective": _parse_per_objective_spec,
    "scored": _parse_scored_spec,
}
"""One parser per :data:`~raco_ds.data.objectives.FORMAT_NAMES` entry (``scored`` fills the stats)."""
