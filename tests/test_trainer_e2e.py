"""End to end through the real launcher: ``deepspeed --num_gpus 2 launchers/train.py`` on 2 CPU ranks
(ZeRO-3, tiny model, the bundled PKU-SafeRLHF pairs). One launch, shared by every check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_runs import check, metrics, run_deepspeed

pytestmark = pytest.mark.slow

NAMES = ("helpful", "harmless")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "tiny"
    args = ["--ds_config", "ds_configs/zero3.json", "--preset", "tiny", "--output-dir", str(out)]
    result = check(run_deepspeed(2, *args, "--checkpointing.save_final", "true"))
    return out, result


def _event_tags(out: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def test_event_files_hold_every_tag(run):
    out, _ = run
    tags = _event_tags(out)
    expected = {"raco/clip_active", "raco/skipped", "train/grad_norm_combined", "train/lr", "perf/tokens_per_s",
                "time/step", "time/passes", "time/hook", "memory/rss_gib", "memory/peak_rss_gib"}  # fmt: skip
    expected |= {f"time/hook_{part}" for part in ("capture", "gram", "allreduce", "solve", "write")}
    for name in NAMES:
        expected |= {f"train/{m}/{name}" for m in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")}
        expected |= {f"eval/{m}/{name}" for m in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward",
                                                  "likelihood_accuracy")}  # fmt: skip
        expected |= {f"raco/{v}/{name}" for v in ("grad_norm", "coefficient", "dual", "dual_clipped")}
    expected.add("time/onepass_scatter")  # the default capture on ZeRO-3 (per-objective pass times: k_pass)
    expected |= {"raco/gram/helpful__helpful", "raco/gram/helpful__harmless", "raco/gram/harmless__harmless",
                 "raco/cosine/helpful__harmless"}  # fmt: skip
    missing = sorted(expected - set(tags))
    assert not missing, f"missing tags {missing}; have {sorted(tags)}"
    steps = [event.step for event in tags["train/loss/helpful"]]
    assert steps == list(range(1, 9))
    # evaluation before (step 0), every 4 steps, and after the last step
    assert [event.step for event in tags["eval/accuracy/helpful"]] == [0, 4, 8]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in tags["raco/coefficient/harmless"])


def test_both_ranks_trained_and_rank0_reported(run):
    out, result = run
    assert "held-out evaluation after 8 steps" in result.stdout
    assert result.stdout.count("held-out evaluation after") == 1  # console summary on rank 0 only
    assert "ZeRO-3" in result.stdout and "dp world 2" in result.stdout and "capture onepass" in result.stdout
    assert "shm_comm_op built" not in result.stdout + result.stderr  # the CPU inference-only op is skipped
    per_step = metrics(out)
    assert sorted(per_step) == list(range(1, 9))
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file: rank 0 only writes
    assert (out / "checkpoints" / "step_00000008" / "COMPLETE").is_file()


def test_zero3_export_matches_deepspeeds_consolidation(run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    out, _ = run
    exported = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    oracle = AutoModelForCausalLM.from_config(exported.config).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / "step_00000008"), tag="ds")
    oracle.load_state_dict(state, strict=False)
    ids = torch.randint(0, exported.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, oracle(ids).logits)
