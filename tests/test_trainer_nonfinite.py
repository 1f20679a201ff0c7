"""A NaN loss on the default path: the step is skipped identically on every rank and names the objective.

Fault injection through the trainer's own option (``--debug.inject_nonfinite STEP:OBJECTIVE``) on 2
CPU ranks under ZeRO-3, for both captures and both data shapes; the consecutive-skip limit; and
``on_nonfinite=raise``.
"""

from __future__ import annotations

import pytest
from multirank import run_ranks

pytestmark = pytest.mark.slow

_CASES = [(capture, data) for capture in ("onepass", "k_pass") for data in ("pku_saferlhf", "hh_rlhf")]


def _config(out: str, capture: str, data: str, *extra: str):
    from raco_ds.trainer.config import parse_args

    return parse_args([
        "--preset", "tiny", "--output-dir", out, "--capture", capture, "--data", data, "--max-steps", "3",
        "--debug.inject_nonfinite", "2:harmless", "--logging.progress_bar", "false", "--logging.tensorboard", "false",
        "--checkpointing.export", "false", "--data.num_train_pairs", "32", "--data.num_eval_pairs", "8", *extra,
    ])  # fmt: skip


def _skipped_steps(rank: int, world: int, root: str) -> dict:
    from raco_ds.trainer.loop import train

    seen = {}
    for capture, data in _CASES:
        result = train(_config(f"{root}/{capture}-{data}", capture, data))
        seen[f"{capture}/{data}"] = {
            "steps": result.step,
            "history": [(h["step"], h["raco/skipped"], sorted(k for k in h if k.startswith("raco/nonfinite/")))
                        for h in result.history],
        }  # fmt: skip
    return seen


def test_injected_nan_skips_the_step_on_every_rank_for_both_captures_and_data_shapes(tmp_path):
    results = run_ranks(_skipped_steps, 2, str(tmp_path))
    for case in results[0]:
        assert results[0][case]["steps"] == results[1][case]["steps"] == 3, case
        # Only rank 0 keeps the history; step 2 skipped, naming objective 1 (harmless) and nothing else.
        assert results[0][case]["history"] == [
            (1, 0.0, []), (2, 1.0, ["raco/nonfinite/harmless"]), (3, 0.0, []),
        ], case  # fmt: skip


def _stops_after_limit(rank: int, world: int, root: str) -> str:
    from raco_ds.trainer.loop import train
    from raco_ds.trainer.step_record import TooManySkippedSteps

    cfg = _config(root, "onepass", "pku_saferlhf", "--raco.max_consecutive_skips", "1",
                  "--checkpointing.save_every", "1")  # fmt: skip
    with pytest.raises(TooManySkippedSteps) as caught:
        train(cfg)
    return str(caught.value)


def test_consecutive_skips_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    messages = run_ranks(_stops_after_limit, 2, str(tmp_path))
    assert messages[0] == messages[1]
    assert "1 consecutive steps (2-2) skipped" in messages[0] and "['harmless']" in messages[0]
    assert "step_00000001" in messages[0] and "--resume" in messages[0]
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints == ["step_00000001"]  # nothing written for the skipped step, nothing deleted


def test_on_nonfinite_raise_names_the_objective(tmp_path):
    from trainer_runs import run_python

    result = run_python("--preset", "tiny", "--output-dir", str(tmp_path), "--max-steps", "2",
                        "--debug.inject_nonfinite", "2:1", "--raco.on_nonfinite", "raise")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: non-finite gradient in objective(s) [1]")
    assert "Traceback" not in result.stderr


def test_rejects_a_malformed_injection():
    from raco_ds.trainer.config import ConfigError, parse_args

    for bad, says in (("2", "STEP:OBJECTIVE"), ("0:helpful", "STEP >= 1"), ("2:honest", "neither one of")):
        with pytest.raises(ConfigError, match=says):
            parse_args(["--debug.inject_nonfinite", bad])
