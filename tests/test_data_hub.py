"""Data sets by name through ``datasets.load_dataset``, tested without the network.

Each Hub preset is read from a local folder laid out as its Hub repository serves it (same file
names and formats; the rows are the bundled upstream samples, so the column names and types are
the real ones; summarize_from_feedback rows are built with its card's features), plus the folders
a repository holds beside the preset's data, so that picking the right files is tested too.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from raco_ds.data import DataError, HubSource, get_preset, load_preference_data, resolve_dataset, trl_spec
from raco_ds.data.objectives import bundled_data_dir
from raco_ds.trainer.config import parse_args
from raco_ds.user_errors import user_error_line


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _bundled_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (bundled_data_dir() / name).read_text().splitlines() if line.strip()]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)


def _pairs(data) -> list[tuple]:
    return [(p.prompt, p.response_a, p.response_b, p.labels) for p in data.pairs]


# ---- PKU-Alignment/PKU-SafeRLHF: data/<model>/{train,test}.jsonl, configs in the card --------------

_PKU_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/train.jsonl
  - split: test
    path: data/*/test.jsonl
- config_name: alpaca-7b
  data_files:
  - split: train
    path: data/Alpaca-7B/train.jsonl
  - split: test
    path: data/Alpaca-7B/test.jsonl
- config_name: alpaca2-7b
  data_files:
  - split: train
    path: data/Alpaca2-7B/train.jsonl
  - split: test
    path: data/Alpaca2-7B/test.jsonl
---
# PKU-SafeRLHF (local test copy)
"""


@pytest.fixture
def pku_repo(tmp_path) -> Path:
    rows = _bundled_rows("pku_saferlhf_sample.jsonl")
    repo = tmp_path / "PKU-SafeRLHF"
    _jsonl(repo / "data" / "Alpaca-7B" / "train.jsonl", rows[:250])
    _jsonl(repo / "data" / "Alpaca-7B" / "test.jsonl", rows[250:300])
    _jsonl(repo / "data" / "Alpaca2-7B" / "train.jsonl", rows[250:])
    _jsonl(repo / "data" / "Alpaca2-7B" / "test.jsonl", rows[:10])
    (repo / "README.md").write_text(_PKU_CARD)
    return repo


def test_pku_saferlhf_from_the_hub_layout_matches_the_bundled_sample(pku_repo):
    bundled = load_preference_data(get_preset("pku_saferlhf"))
    full = load_preference_data(get_preset("PKU-Alignment/PKU-SafeRLHF", pku_repo))
    assert full.objective_names == ("helpful", "harmless")
    assert sorted(map(repr, _pairs(full))) == sorted(map(repr, _pairs(bundled)))  # same pairs and labels
    assert str(full.pairs[0].source).startswith(f"{pku_repo}[split=train]:")

    one_model = load_preference_data(resolve_dataset("PKU-Alignment/PKU-SafeRLHF", data_dir=str(pku_repo),
                                                     objectives=["harmless"], config_name="alpaca-7b"))  # fmt: skip
    assert _pairs(one_model) == [(p, a, b, (labels[1],)) for p, a, b, labels in _pairs(bundled)[:250]]
    test = load_preference_data(get_preset("PKU-Alignment/PKU-SafeRLHF", pku_repo, files=(
        HubSource(path=str(pku_repo), name="alpaca-7b", split="test"),)))  # fmt: skip
    assert _pairs(test) == _pairs(bundled)[250:300]


def test_a_bad_hub_row_names_the_dataset_row_and_field(pku_repo):
    rows = _bundled_rows("pku_saferlhf_sample.jsonl")[:5]
    rows[2]["safer_response_id"] = 2
    _jsonl(pku_repo / "data" / "Alpaca-7B" / "train.jsonl", rows)
    spec = resolve_dataset("PKU-Alignment/PKU-SafeRLHF", data_dir=str(pku_repo), objectives=["helpful", "harmless"],
                           config_name="alpaca-7b")
    with pytest.raises(DataError) as caught:
        load_preference_data(spec)
    line = user_error_line(caught.value)
    assert line.startswith(f"error: {pku_repo}[config=alpaca-7b,split=train]:3:safer_response_id: label 2 ")


def test_load_dataset_failures_are_one_error_line(pku_repo):
    spec = get_preset("PKU-Alignment/PKU-SafeRLHF", pku_repo, files=(HubSource(path=str(pku_repo), split="dev"),))
    with pytest.raises(DataError, match=r"\[split=dev\]: load_dataset failed \(ValueError: .*split"):
        load_preference_data(spec)
    with pytest.raises(DataError, match=r"config=nope.*load_dataset failed"):
        load_preference_data(resolve_dataset("PKU-Alignment/PKU-SafeRLHF", data_dir=str(pku_repo),
                                             objectives=["helpful"], config_name="nope"))  # fmt: skip


def test_a_hub_name_that_cannot_be_fetched_is_a_data_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here; never try it in a test
    spec = trl_spec([HubSource(path="raco-ds-tests/no-such-dataset")])
    with pytest.raises(DataError, match=r"^raco-ds-tests/no-such-dataset\[split=train\]: load_dataset failed") as e:
        load_preference_data(spec)
    assert "snapshot_download" in str(e.value)


# ---- Anthropic/hh-rlhf: <data_dir>/{train,test}.jsonl.gz ---------------------------------------------


@pytest.fixture
def hh_repo(tmp_path) -> Path:
    repo = tmp_path / "hh-rlhf"
    helpful, harmless = _bundled_rows("hh_rlhf_helpful_sample.jsonl"), _bundled_rows("hh_rlhf_harmless_sample.jsonl")
    _jsonl(repo / "helpful-base" / "train.jsonl.gz", helpful)
    _jsonl(repo / "helpful-base" / "test.jsonl.gz", helpful[:5])
    _jsonl(repo / "harmless-base" / "train.jsonl.gz", harmless)
    _jsonl(repo / "harmless-base" / "test.jsonl.gz", harmless[:5])
    _jsonl(repo / "helpful-online" / "train.jsonl.gz", harmless[:7])
    # The red-team folder has another schema; data_dir must keep it out.
    _jsonl(repo / "red-team-attempts" / "red_team_attempts.jsonl.gz",
           [{"transcript": "\n\nHuman: hi\n\nAssistant: hello", "min_harmlessness_score_transcript": 0.5,
             "num_params": "52B", "model_type": "context distillation", "rating": 2.0,
             "task_description": "t", "task_descripton_harmlessness_score": 0.1, "red_team_member_id": 1,
             "is_upworker": False, "tags": None}])  # fmt: skip
    return repo


def test_hh_rlhf_from_the_hub_layout_matches_the_bundled_sample(hh_repo):
    bundled = load_preference_data(get_preset("hh_rlhf"))
    full = load_preference_data(get_preset("Anthropic/hh-rlhf", hh_repo))
    assert _pairs(full) == _pairs(bundled)
    assert full.skipped.total == 1
    assert list(full.skipped.by_file) == [f"{hh_repo}[data_dir=helpful-base,split=train]"]
    test = load_preference_data(resolve_dataset("Anthropic/hh-rlhf", data_dir=str(hh_repo), split="test",
                                                objectives=["harmless", "helpful"]))  # fmt: skip
    assert test.objective_names == ("harmless", "helpful") and len(test) == 10


# ---- nvidia/HelpSteer and HelpSteer2: {train,validation}.jsonl.gz at the root ------------------------


@pytest.fixture(params=["nvidia/HelpSteer", "nvidia/HelpSteer2"])
def helpsteer_repo(request, tmp_path) -> tuple[str, Path]:
    rows = _bundled_rows("helpsteer_sample.jsonl")
    repo = tmp_path / request.param.split("/")[1]
    _jsonl(repo / "train.jsonl.gz", rows)
    _jsonl(repo / "validation.jsonl.gz", rows[:8])
    if request.param.endswith("2"):  # HelpSteer2 also holds pairwise preferences in other schemas
        _jsonl(repo / "preference" / "preference.jsonl.gz",
               [{"split": "train", "prompt": "p", "response_1": "a", "response_2": "b", "preference_strength": -2,
                 "preference_statement": "s", "preference_elaboration": "e",
                 "three_most_similar_preferences": ["x"], "all_preferences_unprocessed": [-2]}])  # fmt: skip
        _jsonl(repo / "disagreements" / "disagreements.jsonl.gz",
               [{"prompt": "p", "response": "r", "helpfulness": [3, 1, 4]}])
    return request.param, repo


def test_helpsteer_presets_derive_pairs_per_prompt_like_the_bundled_sample(helpsteer_repo):
    name, repo = helpsteer_repo
    bundled = load_preference_data(get_preset("helpsteer"))
    spec = resolve_dataset(name, data_dir=str(repo), objectives=["helpfulness", "concise"])
    assert _pairs(load_preference_data(spec)) == _pairs(bundled)
    every = load_preference_data(get_preset(name, repo))
    assert every.objective_names == ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "concise")
    counts = every.label_counts()
    assert counts["verbosity"][1] == counts["concise"][-1] and counts["verbosity"][-1] == counts["concise"][1]


# ---- openai/summarize_from_feedback: comparisons/<split>/0000.parquet (the Hub's parquet branch) --------


def _comparison(post: str | None, article: str | None, summaries: tuple[str, str], choice: int) -> dict:
    info = {"id": "t3_x", "post": post, "title": "My cat", "subreddit": "pets", "site": None, "article": article}
    return {
        "info": info,
        "summaries": [{"text": text, "policy": "sup2", "note": None} for text in summaries],
        "choice": choice, "worker": "w1", "batch": "batch3", "split": "train", "extra": {"confidence": 7},
    }  # fmt: skip


_COMPARISONS = [
    _comparison("My cat sleeps all day and I worry.", None, (" cat sleeps a lot", " my cat sleeps all day long"), 1),
    _comparison("I lost my keys twice this week.", None, (" keys lost", " I keep losing my keys"), 0),
    _comparison("Rain ruined the picnic.", None, (" rain ruined picnic", " picnic got rained"), 1),
    _comparison(None, "A CNN article about markets.", (" markets fell", " markets fell sharply today"), 0),
]


@pytest.fixture
def tldr_repo(tmp_path) -> Path:
    import datasets

    features = datasets.Features({
        "info": {name: datasets.Value("string") for name in ("id", "post", "title", "subreddit", "site", "article")},
        "summaries": [{"text": datasets.Value("string"), "policy": datasets.Value("string"),
                       "note": datasets.Value("string")}],
        "choice": datasets.Value("int32"), "worker": datasets.Value("string"), "batch": datasets.Value("string"),
        "split": datasets.Value("string"), "extra": {"confidence": datasets.Value("int32")},
    })  # fmt: skip
    repo = tmp_path / "summarize_from_feedback"
    for split, rows in (("train", _COMPARISONS), ("validation", _COMPARISONS[:2])):
        (repo / "comparisons" / split).mkdir(parents=True)
        datasets.Dataset.from_list(rows, features=features).to_parquet(repo / "comparisons" / split / "0000.parquet")
    # The axis config (Likert scores of single summaries) lies beside it; data_dir keeps it out.
    (repo / "axis" / "test").mkdir(parents=True)
    datasets.Dataset.from_list([{"info": {"post": "p"}, "summary": {"text": "t", "axes": {"overall": 5}}}]).to_parquet(
        repo / "axis" / "test" / "0000.parquet")
    return repo


def test_summarize_from_feedback_quality_vs_concise(tldr_repo):
    data = load_preference_data(get_preset("openai/summarize_from_feedback", tldr_repo))
    assert data.objective_names == ("quality", "concise")
    assert [p.labels for p in data.pairs] == [(-1, 1), (1, 1), (-1, 0)]  # quality = choice; fewer words wins
    assert data.pairs[0].prompt == ({"role": "user", "content": "SUBREDDIT: r/pets\nTITLE: My cat\n"
                                     "POST: My cat sleeps all day and I worry.\n\nTL;DR:"},)  # fmt: skip
    assert [data.pairs[0].response_a, data.pairs[0].response_b] == [s["text"] for s in _COMPARISONS[0]["summaries"]]
    # The CNN/DM row has an article and no post: skipped and counted by name.
    assert data.skipped.total == 1 and dict(data.skipped.by_field) == {"info.post": 1}
    assert "summarize_from_feedback[data_dir=comparisons,revision=refs/convert/parquet,split=train]:4:info.post" \
        in data.skipped.examples[0]


# ---- any other data set through load_dataset, with a column mapping ---------------------------------------


_QA_ROWS = [{"question": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(6)]


@pytest.fixture
def trl_repo(tmp_path) -> Path:
    import datasets

    repo = tmp_path / "my-org" / "prefs"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list(_QA_ROWS).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(_QA_ROWS[:2]).to_parquet(repo / "data" / "test-00000-of-00001.parquet")
    return repo


def test_a_hub_layout_folder_in_trl_format_with_a_column_mapping(trl_repo):
    cfg = parse_args(["--data", str(trl_repo), "--data.columns", "{question: prompt}", "--objectives", "preference",
                      "--weights", "1", "--data.split", "test"])  # fmt: skip
    data = load_preference_data(cfg.data.spec(cfg.objectives.names))
    assert [(p.prompt[0]["content"], p.response_a, p.labels) for p in data.pairs] == [
        ("Question 0?", "Good answer 0.", (1,)), ("Question 1?", "Good answer 1.", (1,))]
    with pytest.raises(DataError, match=r"renames \['query'\], which the data does not have .*question"):
        load_preference_data(resolve_dataset(str(trl_repo), objectives=["preference"], columns={"query": "prompt"}))
    with pytest.raises(DataError, match=r"missing field 'prompt'"):
        load_preference_data(resolve_dataset(str(trl_repo), objectives=["preference"]))


def test_save_to_disk_folders_and_parquet_files_resolve_as_before(trl_repo, tmp_path):
    import datasets

    renamed = datasets.Dataset.from_list(_QA_ROWS).rename_column("question", "prompt")
    renamed.save_to_disk(tmp_path / "saved")
    renamed.to_parquet(tmp_path / "prefs.parquet")
    expected = _pairs(load_preference_data(resolve_dataset(str(trl_repo), objectives=["preference"],
                                                           columns={"question": "prompt"})))  # fmt: skip
    for path in (tmp_path / "saved", tmp_path / "prefs.parquet"):
        spec = resolve_dataset(str(path), objectives=["preference"])
        assert spec.all_files() == (str(path),) and _pairs(load_preference_data(spec)) == expected


@pytest.mark.parametrize(
    ("dataset", "options", "message"),
    [
        ("helpsteer", {"split": "test"}, r"--data.split apply to data read through load_dataset .* not to 'helpsteer'"),
        ("helpsteer", {"objectives": ["helpfulness", "harmless"]}, r"objectives \['harmless'\] are not in this data"),
        ("no_such_preset", {}, r"neither a preset .* nor a Hub name"),
        ("data/missing.jsonl", {}, r"'data/missing.jsonl' is neither a preset .* an existing file"),
    ],
)
def test_resolve_rejects(dataset, options, message):
    options = {"objectives": ["helpfulness", "concise"], **options}
    with pytest.raises(DataError, match=message):
        resolve_dataset(dataset, **options)


def test_hub_sources_round_trip_through_the_spec_dict():
    from raco_ds.data import DatasetSpec

    for name in ("PKU-Alignment/PKU-SafeRLHF", "Anthropic/hh-rlhf", "openai/summarize_from_feedback"):
        spec = get_preset(name)
        assert DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    source = HubSource(path="a/b", columns={"q": "prompt"})
    assert source.columns == (("q", "prompt"),) and str(source) == "a/b[split=train]"


def test_the_data_fingerprint_follows_content_and_selection_not_location(trl_repo, tmp_path):
    """The fingerprint keys the reference log-probs cache: a moved copy keeps it, other rows or
    another split of the same folder do not."""
    import shutil

    def fingerprint(path: Path, **options) -> str:
        spec = resolve_dataset(str(path), objectives=["preference"], **options)
        return load_preference_data(spec).fingerprint

    moved = tmp_path / "elsewhere" / "prefs"
    shutil.copytree(trl_repo, moved)
    renamed = {"columns": {"question": "prompt"}}
    assert fingerprint(moved, **renamed) == fingerprint(trl_repo, **renamed)
    assert fingerprint(trl_repo, split="test", **renamed) != fingerprint(trl_repo, **renamed)
    rows = [{"prompt": r["question"], **{k: v for k, v in r.items() if k != "question"}} for r in _QA_ROWS]
    jsonl = _write_jsonl_rows(tmp_path / "a" / "prefs.jsonl", rows)
    copy = _write_jsonl_rows(tmp_path / "b" / "prefs.jsonl", rows)
    edited = _write_jsonl_rows(tmp_path / "c" / "prefs.jsonl", rows[:2])
    assert fingerprint(jsonl) == fingerprint(copy) != fingerprint(edited)


def _write_jsonl_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
