"""Objectives spec, formats and loaders: the bundled files, TRL columns, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raco_ds.data import (
    DatasetSpec,
    InvalidRowError,
    ObjectiveSpec,
    RowRef,
    get_preset,
    load_preference_data,
    parse_hh_transcript,
    trl_spec,
)


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- the bundled files ------------------------------------------------------------------------


def test_pku_saferlhf_shared_pairs():
    data = load_preference_data(get_preset("pku_saferlhf"))
    assert len(data) == 400 and data.skipped.total == 0
    assert data.objective_names == ("helpful", "harmless")
    assert data.spec.weights() == (0.5, 0.5)
    assert sum(p.labels[0] != p.labels[1] for p in data.pairs) == 90
    assert data.label_counts() == {"helpful": {1: 125, -1: 275, 0: 0}, "harmless": {1: 111, -1: 289, 0: 0}}
    assert all(p.objective == -1 for p in data.pairs)
    first = json.loads(Path(data.spec.files[0]).read_text().splitlines()[0])
    pair = data.pairs[0]
    assert pair.prompt == ({"role": "user", "content": first["prompt"]},)
    assert (pair.response_a, pair.response_b) == (first["response_0"], first["response_1"])
    expected = tuple(1 if first[f] == 0 else -1 for f in ("better_response_id", "safer_response_id"))
    assert pair.labels == expected and str(pair.source).endswith("pku_saferlhf_sample.jsonl:1")


def test_hh_rlhf_per_objective_pairs_skip_the_known_bad_row():
    data = load_preference_data(get_preset("hh_rlhf"))
    assert data.label_counts() == {"helpful": {1: 499, -1: 0, 0: 500}, "harmless": {1: 500, -1: 0, 0: 499}}
    assert data.skipped.total == 1 and dict(data.skipped.by_field) == {"rejected": 1}
    assert [p.objective for p in data.pairs] == [0] * 499 + [1] * 500
    assert len(data.indices_of_objective(1)) == 500
    for pair in data.pairs:
        assert pair.prompt[-1]["role"] == "user"
        # roles alternate (consecutive same-speaker turns upstream are merged)
        assert [m["role"] for m in pair.prompt] == ["user", "assistant"] * (len(pair.prompt) // 2) + ["user"]
        for text in (pair.response_a, pair.response_b):
            assert "\n\nHuman:" not in text and "\n\nAssistant:" not in text and text == text.strip()
    # row 1 of the helpful file: a 3-turn prompt; the final replies are the two responses
    row = json.loads(Path(data.spec.objectives[0].files[0]).read_text().splitlines()[0])
    assert data.pairs[0].response_a == row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert data.pairs[0].response_b == row["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert len(data.pairs[0].prompt) == 3


def test_hh_rlhf_without_skipping_names_the_empty_reply():
    with pytest.raises(InvalidRowError, match=r"hh_rlhf_helpful_sample\.jsonl:248:rejected: empty response"):
        load_preference_data(get_preset("hh_rlhf"), skip_invalid=False)


def test_helpsteer_derived_pairs_and_ties():
    data = load_preference_data(get_preset("helpsteer"))
    assert (data.scored.prompts, data.scored.rows) == (139, 500)
    # 105 prompts x 6 pairs + 21 x 3 + 4 x 1 = 697 candidate pairs; 187 tie on both objectives
    assert data.scored.all_tie_pairs == 187 and len(data) == 510
    counts = data.label_counts()
    assert counts["helpfulness"] == {1: 227, -1: 164, 0: 119}
    assert counts["concise"] == {1: 175, -1: 168, 0: 167}
    assert all(any(p.labels) for p in data.pairs)


def test_scored_labels_on_crafted_rows(tmp_path):
    rows = [
        {"prompt": "p", "response": "a", "helpfulness": 3, "verbosity": 1},
        {"prompt": "p", "response": "b", "helpfulness": 3, "verbosity": 2},  # helpfulness tie
        {"prompt": "p", "response": "c", "helpfulness": 4, "verbosity": 1},
        {"prompt": "q", "response": "alone", "helpfulness": 0, "verbosity": 0},  # no partner: no pair
    ]
    spec = get_preset("helpsteer", files=(_write_jsonl(tmp_path / "s.jsonl", rows),))
    data = load_preference_data(spec)
    got = {(p.response_a, p.response_b): p.labels for p in data.pairs}
    # (helpfulness: higher wins, concise: lower verbosity wins); (a, c) ties on verbosity -> 0
    assert got == {("a", "b"): (0, 1), ("a", "c"): (-1, 0), ("b", "c"): (-1, -1)}


def test_hh_transcript_split():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye?\n\nAssistant:  See you.\n\nAssistant: Soon.\n"
    assert parse_hh_transcript(text, RowRef("f", 1), "chosen") == (
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "See you.\n\nSoon."},  # same-speaker turns merged
    )
    with pytest.raises(InvalidRowError, match=r"^f:2:chosen: the transcript must start"):
        parse_hh_transcript("preamble\n\nHuman: x\n\nAssistant: y", RowRef("f", 2), "chosen")
    with pytest.raises(InvalidRowError, match=r"^f:3:rejected: the transcript does not end"):
        parse_hh_transcript("\n\nHuman: x\n\nAssistant: y\n\nHuman: z", RowRef("f", 3), "rejected")


# ---- TRL columns, file types ----------------------------------------------------------------


TRL_ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    },
]


def test_trl_plain_and_conversational(tmp_path):
    data = load_preference_data(trl_spec([_write_jsonl(tmp_path / "trl.jsonl", TRL_ROWS)]))
    assert data.objective_names == ("preference",) and data.label_counts() == {"preference": {1: 2, -1: 0, 0: 0}}
    plain, chat = data.pairs
    assert plain.prompt == ({"role": "user", "content": "What is 2+2?"},) and (plain.response_a, plain.response_b) == (
        "4",
        "5",
    )
    assert chat.prompt[0] == {"role": "system", "content": "Be brief."} and chat.response_a == "Paris."
    assert plain.objective == 0 and plain.labels == (1,)


def test_trl_implicit_prompt(tmp_path):
    user = {"role": "user", "content": "Hi"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Hello"}],
        "rejected": [user, {"role": "assistant", "content": "Go away"}],
    }
    data = load_preference_data(trl_spec([_write_jsonl(tmp_path / "i.jsonl", [row])]))
    assert data.pairs[0].prompt == (user,) and data.pairs[0].response_b == "Go away"


def test_json_array_parquet_and_save_to_disk_give_the_same_pairs(tmp_path):
    import datasets

    jsonl = _write_jsonl(tmp_path / "a.jsonl", TRL_ROWS[:1] * 3)
    (tmp_path / "a.json").write_text(json.dumps(TRL_ROWS[:1] * 3))
    frame = datasets.Dataset.from_list(TRL_ROWS[:1] * 3)
    frame.to_parquet(str(tmp_path / "a.parquet"))
    frame.save_to_disk(str(tmp_path / "a_disk"))
    loaded = [
        load_preference_data(trl_spec([str(tmp_path / name)])).pairs
        for name in ("a.jsonl", "a.json", "a.parquet", "a_disk")
    ]
    assert Path(jsonl).exists()
    for pairs in loaded[1:]:
        assert [(p.prompt, p.response_a, p.response_b, p.source.row) for p in pairs] == [
            (p.prompt, p.response_a, p.response_b, p.source.row) for p in loaded[0]
        ]


def test_to_hf_dataset_round_trips_the_pairs():
    data = load_preference_data(get_preset("pku_saferlhf"))
    table = data.to_hf_dataset()
    assert len(table) == 400 and table[3]["labels"] == list(data.pairs[3].labels)


# ---- bad input ---------------------------------------------------------------------------------

GOOD_SHARED = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}


@pytest.mark.parametrize(
    "bad_row, field, problem",
    [
        ({k: v for k, v in GOOD_SHARED.items() if k != "response_1"}, "response_1", "missing field"),
        ({**GOOD_SHARED, "safer_response_id": 2}, "safer_response_id", "outside the allowed values"),
        ({**GOOD_SHARED, "response_0": "   "}, "response_0", "empty response"),
        ({**GOOD_SHARED, "prompt": ""}, "prompt", "empty prompt"),
        ('{"prompt": "p", "response_0": ', "<json>", "broken JSON"),
        ("[1, 2]", "<row>", "expected a JSON object"),
    ],
)
def test_bad_row_names_file_row_field(tmp_path, bad_row, field, problem):
    # line 1 good, line 2 blank (still counted), line 3 bad, line 4 good
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(GOOD_SHARED)
        + "\n\n"
        + (bad_row if isinstance(bad_row, str) else json.dumps(bad_row))
        + "\n"
        + json.dumps(GOOD_SHARED)
        + "\n"
    )
    spec = get_preset("pku_saferlhf", files=(str(path),))
    with pytest.raises(InvalidRowError) as raised:
        load_preference_data(spec)
    assert str(raised.value).startswith(f"{path}:3:{field}: ") and problem in str(raised.value)
    assert "skip_invalid=True" in str(raised.value)
    data = load_preference_data(spec, skip_invalid=True)
    assert len(data) == 2 and data.skipped.total == 1 and data.skipped.by_field == {field: 1}
    assert [p.source.row for p in data.pairs] == [1, 4]


def test_skip_invalid_logs_a_summary(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "b.jsonl", [GOOD_SHARED, {**GOOD_SHARED, "response_1": ""}, "{oops"])
    with caplog.at_level("WARNING"):
        data = load_preference_data(get_preset("pku_saferlhf", files=(path,)), skip_invalid=True)
    assert len(data) == 1 and data.skipped.total == 2
    assert "skipped 2 malformed rows" in caplog.text and f"{path}:2:response_1" in caplog.text


def test_scored_row_outside_range_and_not_a_number(tmp_path):
    rows = [{"prompt": "p", "response": "a", "helpfulness": 5, "verbosity": 1}]
    with pytest.raises(InvalidRowError, match=r"s\.jsonl:1:helpfulness: score 5 is outside the allowed range"):
        load_preference_data(get_preset("helpsteer", files=(_write_jsonl(tmp_path / "s.jsonl", rows),)))
    rows = [{"prompt": "p", "response": "a", "helpfulness": "high", "verbosity": 1}]
    with pytest.raises(InvalidRowError, match=r"t\.jsonl:1:helpfulness: score 'high' is not a number"):
        load_preference_data(get_preset("helpsteer", files=(_write_jsonl(tmp_path / "t.jsonl", rows),)))


def test_objective_without_usable_pairs_is_an_error(tmp_path):
    # every pair ties on helpfulness -> that objective could never train
    rows = [
        {"prompt": "p", "response": "a", "helpfulness": 2, "verbosity": 1},
        {"prompt": "p", "response": "b", "helpfulness": 2, "verbosity": 3},
    ]
    with pytest.raises(ValueError, match=r"objective 'helpfulness' has no usable pairs"):
        load_preference_data(get_preset("helpsteer", files=(_write_jsonl(tmp_path / "s.jsonl", rows),)))
    # a per-objective file whose rows are all invalid, skipped
    good = _write_jsonl(tmp_path / "good.jsonl", TRL_ROWS[:1])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "", "rejected": "x"}])
    spec = DatasetSpec(
        format="per_objective",
        objectives=(ObjectiveSpec(name="a", files=(good,)), ObjectiveSpec(name="b", files=(bad,))),
        skip_invalid=True,
    )
    with pytest.raises(ValueError, match=r"objective 'b' has no usable pairs.*1 rows skipped"):
        load_preference_data(spec)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*never downloads"):
        load_preference_data(trl_spec([str(tmp_path / "nope.jsonl")]))


# ---- the spec itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format="pairs", objectives=(ObjectiveSpec(name="a"),), files=("f",)), "not a known shape"),
        (dict(format="shared", objectives=(), files=("f",)), "objectives is empty"),
        (dict(format="shared", objectives=(ObjectiveSpec(name="a", label_field="x"),) * 2, files=("f",)), "duplicate"),
        (dict(format="shared", objectives=(ObjectiveSpec(name="a"),), files=("f",)), "no label_field"),
        (dict(format="shared", objectives=(ObjectiveSpec(name="a", label_field="x"),)), "files is empty"),
        (dict(format="per_objective", objectives=(ObjectiveSpec(name="a"),)), "has no files"),
        (
            dict(format="shared", objectives=(ObjectiveSpec(name="a", label_field="x", weight=-1),), files=("f",)),
            ">= 0",
        ),
    ],
)
def test_spec_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**kwargs)


def test_spec_dict_round_trip_and_unknown_keys():
    spec = get_preset("helpsteer").with_weights([0.3, 0.7])
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    assert spec.weights() == pytest.approx((0.3, 0.7))
    with pytest.raises(ValueError, match=r"unknown dataset spec keys \['colour'\]"):
        DatasetSpec.from_dict({**spec.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="unknown data preset 'nope'"):
        get_preset("nope")


def test_hh_pair_whose_dialogues_differ_names_the_rejected_field(tmp_path):
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}
    spec = DatasetSpec(
        format="per_objective",
        row_style="hh",
        objectives=(ObjectiveSpec(name="h", files=(_write_jsonl(tmp_path / "h.jsonl", [row]),)),),
    )
    with pytest.raises(
        InvalidRowError, match=r"h\.jsonl:1:rejected: the dialogue before the final Assistant reply differs"
    ):
        load_preference_data(spec)
