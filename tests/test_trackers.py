"""--logging.report_to: TensorBoard and wandb (offline) receive the same scalars under the same names."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from raco_ds.trainer.config import ConfigError, parse_args
from raco_ds.trainer.trackers import open_trackers

_STEPS = {
    0: {"eval/accuracy/helpful": 0.5, "eval/accuracy/harmless": 0.25},
    1: {"train/loss/helpful": 0.69, "raco/gram/helpful__harmless": -0.125, "raco/coefficient/harmless": 0.6},
    2: {"train/loss/helpful": 0.5, "raco/gram/helpful__harmless": 0.25, "raco/coefficient/harmless": math.nan},
}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(folder), "WANDB_SILENT": "true",
                       "WANDB_PROJECT": "raco-tests"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    return folder


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb 0.31 sends every key as a one-element nested_key


def _wandb_history(wandb_dir: Path) -> tuple[dict[int, dict[str, float]], dict[str, str]]:
    """Logged rows by step (without wandb's own _ keys), and the summary's text notes, read back from the
    offline run's .wandb file."""
    from wandb.proto import wandb_internal_pb2

    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    # A LevelDB-style log after a 7-byte header: 32 KiB blocks of records (checksum, length, type).
    position, block, pending, history, notes = 7, 32768, b"", {}, {}
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block  # a block's tail too short for a header is padding
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record, LAST ends it
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
        elif record.WhichOneof("record_type") == "summary":
            updates = {_key(item): item.value_json for item in record.summary.update}
            notes.update({key: json.loads(value) for key, value in updates.items() if key.startswith("text/")})
    return history, notes


def _tensorboard_scalars(log_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


def test_tensorboard_and_wandb_receive_the_same_scalar_names(tmp_path, offline_wandb):
    out = tmp_path / "run"
    out.mkdir()
    cfg = parse_args(["--logging.report_to", "tensorboard,wandb", "--output-dir", str(out),
                      "--logging.run_name", "both"])  # fmt: skip
    writer = open_trackers(cfg, out, rank=0)
    writer.text("capture", "onepass")
    for step, values in _STEPS.items():
        writer.scalars(values, step)
    writer.close()

    history, notes = _wandb_history(offline_wandb)
    board = _tensorboard_scalars(out / "tensorboard")
    assert {s: sorted(v) for s, v in history.items()} == {s: sorted(v) for s, v in board.items()}
    for step, values in _STEPS.items():
        assert set(values) == set(history[step]) == set(board[step])
        for tag, value in values.items():
            assert _same(history[step][tag], value) and _same(board[step][tag], value), (step, tag)
    assert notes == {"text/capture": "onepass"}
    assert (out / "wandb_run_id").read_text() in str(next(offline_wandb.glob("wandb/offline-run-*")))


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    cfg = parse_args(["--logging.report_to", "wandb"])
    first = open_trackers(cfg, tmp_path, rank=0)
    first.scalars({"train/loss/helpful": 1.0}, 1)
    first.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    second = open_trackers(cfg, tmp_path, rank=0, purge_step=2)
    second.scalars({"train/loss/helpful": 0.5}, 2)
    second.close()
    runs = sorted(offline_wandb.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in path.name for path in runs)
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize(
    ("argv", "made"),
    [([], ["tensorboard"]), (["--logging.report_to", "none"], []),
     (["--logging.tensorboard", "false"], [])],  # fmt: skip
)
def test_default_none_and_the_old_tensorboard_switch(tmp_path, argv, made):
    writer = open_trackers(parse_args(argv), tmp_path, rank=0)
    writer.scalars({"train/lr": 0.1}, 1)
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == made


def test_other_ranks_write_nothing(tmp_path, offline_wandb):
    writer = open_trackers(parse_args(["--logging.report_to", "tensorboard,wandb"]), tmp_path, rank=1)
    assert not writer.active
    writer.scalars({"train/lr": 0.1}, 1)
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == [offline_wandb.name] and not any(offline_wandb.iterdir())


@pytest.mark.parametrize(
    ("value", "message"),
    [("mlflow", r"names \['mlflow'\]; use one or more of \['tensorboard', 'wandb', 'none'\]"),
     ("none,wandb", "mixes none with trackers")],  # fmt: skip
)
def test_rejects_unknown_trackers(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--logging.report_to", value])


def test_a_missing_wandb_is_one_error_line_with_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"names wandb, but the wandb package is not installed; pip install wandb"):
        parse_args(["--logging.report_to", "tensorboard,wandb"])
    parse_args([])  # the default needs no wandb


def test_a_training_run_on_a_hub_layout_folder_logs_to_both(tmp_path, offline_wandb, monkeypatch):
    from trainer_runs import check, run_python

    from raco_ds.data.objectives import bundled_data_dir

    # PKU-SafeRLHF as its Hub repository lays it out (data/<model>/train.jsonl), read by load_dataset.
    repo = tmp_path / "PKU-SafeRLHF"
    (repo / "data" / "Alpaca-7B").mkdir(parents=True)
    sample = (bundled_data_dir() / "pku_saferlhf_sample.jsonl").read_text()
    (repo / "data" / "Alpaca-7B" / "train.jsonl").write_text(sample)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    out = tmp_path / "run"
    result = check(run_python("--preset", "tiny", "--data", "PKU-Alignment/PKU-SafeRLHF", "--data.data_dir", str(repo),
                              "--max-steps", "2", "--checkpointing.export", "false", "--output-dir", str(out),
                              "--logging.report_to", "tensorboard,wandb"))  # fmt: skip
    assert "data PKU-Alignment/PKU-SafeRLHF: 400 pairs" in result.stdout + result.stderr
    history, notes = _wandb_history(offline_wandb)
    board = _tensorboard_scalars(out / "tensorboard")
    assert sorted(history) == sorted(board) == [0, 1, 2]
    for step in board:
        assert sorted(history[step]) == sorted(board[step]), step
        assert all(_same(history[step][tag], value) for tag, value in board[step].items()), step
    assert "train/loss/harmless" in board[2] and "text/capture" in notes and "text/config" in notes
