"""User errors are one `error:` line naming the file (row, field) and a fix that works, with exit 2 and no
traceback unless --debug; each suggested fix is run. Data: non-UTF-8 bytes, an empty file, a null label.
DeepSpeed config: the precision hints. Export: NaN weights are refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from trainer_runs import check, run_python

from raco_ds.data.formats import parse_shared
from raco_ds.data.objectives import get_preset
from raco_ds.data.records import RowRef
from raco_ds.trainer.config import ConfigError, parse_args
from raco_ds.trainer.ds_config import fill_ds_config

TINY = ["--preset", "tiny", "--max-steps", "1", "--logging.eval_every", "0", "--checkpointing.export", "false",
        "--objectives", "preference", "--weights", "1", "--data.num_train_pairs", "8", "--data.num_eval_pairs", "4"]  # fmt: skip


def _trl_rows(n: int) -> list[bytes]:
    return [
        json.dumps({"prompt": f"question {i}?", "chosen": f"a good answer {i}", "rejected": f"bad {i}"}).encode()
        for i in range(n)
    ]


def _error_line(result) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_non_utf8_row_names_file_and_row_and_the_suggested_skip_works(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = _trl_rows(24)
    rows[6] = rows[6].replace(b"bad 6", b"caf\xe9 6")  # latin-1, not UTF-8
    data.write_bytes(b"\n".join(rows) + b"\n")
    failed = run_python(*TINY, "--data", str(data), "--output-dir", str(tmp_path / "a"))
    line = _error_line(failed)
    assert "Traceback" not in failed.stderr
    assert line.startswith(f"error: {data}:7:<encoding>: not UTF-8 (byte 0xe9")
    assert "--data.skip_invalid true" in line
    debug = run_python(*TINY, "--data", str(data), "--output-dir", str(tmp_path / "b"), "--debug")
    assert "Traceback" in debug.stderr and _error_line(debug) == line
    fixed = check(run_python(*TINY, "--data", str(data), "--output-dir", str(tmp_path / "c"),
                             "--data.skip_invalid", "true"))  # fmt: skip
    assert "skipped 1 malformed rows" in fixed.stdout + fixed.stderr


def test_empty_data_file_names_the_file(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    line = _error_line(run_python(*TINY, "--data", str(data), "--output-dir", str(tmp_path / "out")))
    assert line.startswith(f"error: {data}: no rows (the file is empty)") and "tie" not in line


def test_null_label_is_reported_as_null_not_missing():
    spec = get_preset("pku_saferlhf")
    row = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": None, "safer_response_id": 0}
    (error,) = list(parse_shared(spec, [(RowRef("f.jsonl", 3), row)]))
    assert str(error).startswith("f.jsonl:3:better_response_id: 'better_response_id' is null")
    assert "missing" not in str(error)


@pytest.mark.parametrize("section, dtype", [("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp16", "bf16")])
def test_precision_hints_of_the_ds_config_work_when_followed(section, dtype):
    raw = {section: {"enabled": dtype != "bf16" or section == "fp16"}}
    args = ["--model.dtype", dtype]
    with pytest.raises(ConfigError) as err:
        fill_ds_config(raw, parse_args(args), world_size=1, hidden_size=8, name="my.json")
    text = str(err.value)
    assert 'set it to "auto" in my.json' in text
    suggested = re.search(r"or pass (--model\.dtype \w+)", text)
    if suggested:  # the command-line fix
        filled = fill_ds_config(raw, parse_args(suggested.group(1).split()), world_size=1, hidden_size=8)
    else:  # fp16 has no command-line fix: the config edit the message gives
        assert "set it to false" in text and "--model.dtype bf16 gives half precision" in text
        filled = fill_ds_config({section: {"enabled": False}}, parse_args(args), world_size=1, hidden_size=8)
    assert filled[section]["enabled"] in (True, False)
    auto = fill_ds_config({section: {"enabled": "auto"}}, parse_args(args), world_size=1, hidden_size=8)
    assert auto[section]["enabled"] is (section == "bf16" and dtype == "bf16")


def test_export_refuses_non_finite_weights(tmp_path):
    from raco_ds.models import load_model
    from raco_ds.trainer.export import ExportError, export_hf

    model = load_model("tiny")
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[:3] = float("nan")
    with pytest.raises(ExportError, match=rf"refusing to write {tmp_path / 'export'}: 1 weight tensors hold NaN.*"
                                          rf"{re.escape(name)} \(3 values\)"):  # fmt: skip
        export_hf(model, None, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / ".tmp-export").exists()


def test_user_error_lines_name_the_path_and_a_fix():
    import errno

    from raco_ds.user_errors import user_error_line

    line = user_error_line(PermissionError(errno.EACCES, "Permission denied", "/runs/x/.raco.lock"))
    assert line == (
        "error: /runs/x/.raco.lock: Permission denied; give this user write access to it, or pass another --output-dir"
    )
    assert user_error_line(KeyError("a bug")) is None
    assert user_error_line(ConfigError("bad value; fix it")) == "error: bad value; fix it"
