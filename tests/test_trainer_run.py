"""Single-process runs of launchers/train.py (ZeRO-3, one CPU rank, tiny model, real data):
bit-identical resume, HF export that reloads with the same logits, and launcher-level refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trainer_runs import check, deterministic, metrics, run_python, start_python

COMMON = ["--preset", "tiny", "--max-steps", "6", "--checkpointing.save_every", "3", "--logging.eval_every", "0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    check(run_python(*COMMON, "--output-dir", str(out)))
    return out


def test_resumed_run_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    first = check(run_python(*COMMON, "--output-dir", str(out), "--checkpointing.stop_after_steps", "3"))
    assert "stopped after step 3" in first.stdout
    assert not (out / "export").exists()
    second = check(run_python(*COMMON, "--output-dir", str(out), "--resume"))
    assert "resumed from" in second.stdout and "at step 3" in second.stdout

    reference, resumed = metrics(uninterrupted), metrics(out)
    assert sorted(resumed) == sorted(reference) == list(range(1, 7))
    for step in range(1, 7):
        assert deterministic(resumed[step]) == deterministic(reference[step]), f"step {step} differs"
    assert not math.isnan(reference[6]["train/loss/helpful"])

    from safetensors.torch import load_file

    a = load_file(uninterrupted / "export" / "model.safetensors")
    b = load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((out / "eval_after.json").read_text()) == json.loads(
        (uninterrupted / "eval_after.json").read_text()
    )


def test_export_reloads_in_transformers_with_the_same_logits(uninterrupted):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from raco_ds.models import load_model

    exported = AutoModelForCausalLM.from_pretrained(uninterrupted / "export").eval()
    # The oracle: DeepSpeed's own consolidation of the final ZeRO-3 checkpoint, in a fresh model.
    oracle = AutoModelForCausalLM.from_config(exported.config).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(uninterrupted / "checkpoints" / "step_00000006"), tag="ds")
    missing, unexpected = oracle.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    initial = load_model("tiny").eval()

    ids = torch.randint(0, exported.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = exported(ids).logits
        assert torch.equal(logits, oracle(ids).logits)
        assert not torch.allclose(logits, initial(ids).logits)  # training moved the weights
    assert (uninterrupted / "export" / "tokenizer.json").is_file()


def test_k_pass_capture_matches_the_default_one_pass(uninterrupted, tmp_path):
    out = tmp_path / "k_pass"
    result = check(run_python(*COMMON, "--output-dir", str(out), "--capture", "k_pass"))
    assert "capture k_pass" in result.stdout
    one, k = metrics(uninterrupted), metrics(out)
    for step in range(1, 7):
        for tag in ("train/loss/helpful", "train/loss/harmless", "raco/coefficient/helpful", "raco/coefficient/harmless",
                    "raco/gram/helpful__harmless", "raco/gram/harmless__harmless"):  # fmt: skip
            assert k[step][tag] == pytest.approx(one[step][tag], rel=1e-4, abs=1e-6), (step, tag)
        # K passes time each objective's pass; one pass times its reduce-scatter instead
        assert "time/pass/helpful" in k[step] and "time/onepass_scatter" in one[step]


def test_rejects_ds_config_that_disagrees_with_the_cli(tmp_path):
    bad = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json").read_text())
    bad["train_micro_batch_size_per_gpu"] = 8
    bad["gradient_accumulation_steps"] = 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = run_python("--preset", "tiny", "--ds_config", str(path), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train_micro_batch_size_per_gpu=8 but --optimisation.micro_batch_size=4" in result.stderr
    assert "gradient_accumulation_steps=3 but --optimisation.gradient_accumulation_steps=1" in result.stderr
    assert 'set it to "auto" in bad.json' in result.stderr


def test_refuses_to_overwrite_or_resume_wrongly(uninterrupted):
    again = run_python(*COMMON, "--output-dir", str(uninterrupted))
    assert again.returncode == 2 and "pass --resume to continue that run" in again.stderr
    other = run_python(
        *COMMON,
        "--output-dir",
        str(uninterrupted),
        "--resume",
        "--data",
        "helpsteer",
        "--objectives",
        "helpfulness,concise",
    )
    assert other.returncode == 2
    assert "trained with K=2 objectives ['helpful', 'harmless']" in other.stderr
    assert "--objectives helpful,harmless" in other.stderr


def test_stop_signal_checkpoints_and_exits_for_requeue(tmp_path):
    import signal

    from raco_ds.preemption import EXIT_REQUEUE
    from raco_ds.trainer.checkpoint import find_latest, read_trainer_state

    out = tmp_path / "preempted"
    process = start_python("--preset", "tiny", "--max-steps", "100000", "--output-dir", str(out))
    try:
        for line in process.stdout:  # wait until training is about to start, then warn like SLURM does
            if "reference log-probs of" in line:
                process.send_signal(signal.SIGUSR1)
                break
        output = process.communicate(timeout=240)[0]
    finally:
        process.kill()
    assert process.returncode == EXIT_REQUEUE, output[-3000:]
    latest = find_latest(out / "checkpoints")
    assert latest is not None and read_trainer_state(latest).step >= 1
    assert "stopped after step" in output


def test_rejects_unknown_options_before_starting_anything():
    result = run_python("--optimisation.max_step", "3")
    assert result.returncode == 2 and "did you mean --optimisation.max_steps" in result.stderr
