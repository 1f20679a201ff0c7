"""``deepspeed --num_gpus 2 launchers/train.py --preset tiny --model.lora.r 4`` on 2 CPU ranks (ZeRO-3): one-pass
capture on the adapters, bit-identical resume, the adapter and merged exports, and launchers/eval.py on the adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import REPO, check, deterministic, metrics, run_deepspeed

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

ARGS = ["--ds_config", "ds_configs/zero3.json", "--preset", "tiny", "--model.lora.r", "4", "--max-steps", "4",
        "--checkpointing.save_every", "2", "--checkpointing.keep_last", "0", "--logging.eval_every", "0",
        "--logging.progress_bar", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, check(run_deepspeed(2, *ARGS, "--output-dir", str(out))).stdout


def test_trains_the_adapters_with_one_pass_capture(run):
    out, log = run
    assert "LoRA r=4 alpha=16 dropout=0 on 14 layers of all blocks" in log
    assert "capture onepass" in log and "one-pass gradients match autograd" in log
    assert "K passes" not in log
    history = metrics(out)
    assert sorted(history) == [1, 2, 3, 4]
    assert all(history[s]["train/loss/helpful"] == history[s]["train/loss/helpful"] for s in history)  # finite
    config = json.loads((out / "export_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["r"] == 4 and config["peft_type"] == "LORA"


def test_resume_from_the_step_2_checkpoint_is_bit_identical(run, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for later in ("checkpoints/step_00000004", "export", "export_adapter", "eval_after.json"):
        path = resumed / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    log = check(run_deepspeed(2, *ARGS, "--output-dir", str(resumed), "--resume")).stdout
    assert "at step 2" in log
    reference, again = metrics(out), metrics(resumed)
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):
        assert deterministic(again[step]) == deterministic(reference[step]), step

    from safetensors.torch import load_file

    for file in ("export_adapter/adapter_model.safetensors", "export/model.safetensors"):
        a, b = load_file(out / file), load_file(resumed / file)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), file


def test_adapter_folder_loads_in_peft_and_equals_the_merged_export(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raco_ds.models import load_model

    out, _ = run
    adapter = PeftModel.from_pretrained(load_model("tiny"), str(out / "export_adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    base = load_model("tiny").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = adapter(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, base(input_ids=ids).logits)  # training moved the adapters


def test_eval_launcher_takes_the_adapter_folder(run, tmp_path):
    out, _ = run
    report = tmp_path / "adapter_eval.json"
    result = subprocess.run([sys.executable, "launchers/eval.py", "--model", str(out / "export_adapter"), "--output",
                             str(report)], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trainer = json.loads((out / "eval_after.json").read_text())
    launcher = json.loads(report.read_text())["metrics"]
    for metric in ("margin", "accuracy"):
        torch.testing.assert_close(torch.tensor(launcher[metric]), torch.tensor(trainer[metric]), rtol=0, atol=1e-4)
