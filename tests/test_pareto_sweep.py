"""Sweep orchestration: restartability with a fake, fast training command; outputs; bad settings.

The fake trainer is a small Python script that records each call, writes a result file into
its --output-dir and crashes on request (a "crash file" naming the point), so the restart rules
are tested without training anything. The end-to-end sweep on the real trainer is marked slow.
"""

import csv
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import pytest

from raco_ds.pareto import SweepConfig, SweepError, SweepPoint, run_sweep
from raco_ds.pareto.sweep import DONE_MARKER, EVAL_FILE

FAKE_TRAIN = textwrap.dedent(
    """
    import json, os, sys, time
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    out = args["--output-dir"]
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "calls.txt"), "a") as fh:
        fh.write(args["--aggregator"] + " " + args["--weights"] + "\\n")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "partial.bin"), "w").write("x")
    crash = os.path.join(here, "crash_" + args["--aggregator"] + "_" + args["--weights"])
    if os.path.exists(crash):
        mode = open(crash).read().strip()
        if mode == "once":
            os.remove(crash)
        if mode == "hang":
            time.sleep(60)
        sys.exit(3)
    w = [float(x) for x in args["--weights"].split(",")]
    json.dump({"weights": w, "aggregator": args["--aggregator"]}, open(os.path.join(out, "result.json"), "w"))
    """
)


class FakeEvaluator:
    """Metrics that follow the weights (a made-up, monotone front); counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, point: SweepPoint, train_dir: Path) -> dict[str, float]:
        self.calls += 1
        result = json.loads((train_dir / "result.json").read_text())
        w1, w2 = result["weights"]
        bonus = 0.05 if point.aggregator == "raco" else 0.0
        return {
            "accuracy/helpful": 0.5 + 0.3 * w1 + bonus,
            "accuracy/harmless": 0.5 + 0.3 * w2 + bonus,
            "margin/helpful": w1,
            "margin/harmless": w2,
        }


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)

    def make(**overrides) -> SweepConfig:
        options = {
            "output_dir": str(tmp_path / "sweep"),
            "aggregators": ["raco", "linear"],
            "weights": [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]],
            "train_command": [sys.executable, str(script)],
            "train_args": ["--preset", "tiny"],
            "objectives": ["helpful", "harmless"],
        }
        options.update(overrides)
        return SweepConfig(**options)

    def calls() -> list[str]:
        path = tmp_path / "calls.txt"
        return path.read_text().splitlines() if path.exists() else []

    def crash(aggregator: str, weights: str, mode: str = "always") -> None:
        (tmp_path / f"crash_{aggregator}_{weights}").write_text(mode)

    make.calls, make.crash, make.root = calls, crash, tmp_path
    return make


def test_sweep_trains_every_point_then_skips_finished_ones(fake):
    cfg = fake()
    evaluator = FakeEvaluator()
    result = run_sweep(cfg, evaluator)
    assert [o.status for o in result.outcomes] == ["trained"] * 6
    assert len(fake.calls()) == 6 and evaluator.calls == 6
    for point in cfg.points():
        marker = json.loads((point.folder(cfg.output_dir) / DONE_MARKER).read_text())
        assert marker["aggregator"] == point.aggregator and marker["weights"] == list(point.weights)

    again = run_sweep(cfg, evaluator)
    assert [o.status for o in again.outcomes] == ["skipped"] * 6
    assert len(fake.calls()) == 6  # nothing trained again
    assert evaluator.calls == 6  # and the cached evaluations were reused
    assert again.outcomes[0].metrics == result.outcomes[0].metrics


def test_crashed_point_is_retried_from_scratch(fake):
    cfg = fake()
    run_sweep(cfg, FakeEvaluator())
    # Simulate a crash of one point: no marker, a stale partial output left behind.
    folder = SweepPoint("linear", (0.5, 0.5)).folder(cfg.output_dir)
    (folder / DONE_MARKER).unlink()
    (folder / "train" / "result.json").unlink()
    (folder / "train" / "stale.bin").write_text("from the crashed attempt")
    result = run_sweep(cfg, FakeEvaluator())
    statuses = {(o.point.aggregator, o.point.weights): o.status for o in result.outcomes}
    assert statuses.pop(("linear", (0.5, 0.5))) == "trained"
    assert set(statuses.values()) == {"skipped"}
    assert fake.calls()[6:] == ["linear 0.5,0.5"]
    assert not (folder / "train" / "stale.bin").exists()  # partial output was wiped before the retry
    assert (folder / DONE_MARKER).exists()


def test_crash_within_a_call_is_retried_up_to_max_attempts(fake):
    fake.crash("raco", "0.5,0.5", "once")
    result = run_sweep(fake(max_attempts=2), FakeEvaluator())
    outcome = next(o for o in result.outcomes if o.point == SweepPoint("raco", (0.5, 0.5)))
    assert outcome.status == "trained" and outcome.attempts == 2
    log = (SweepPoint("raco", (0.5, 0.5)).folder(fake().output_dir) / "train.log").read_text()
    assert log.count("=====") == 2  # both attempts are in the point's log


def test_failed_point_is_reported_and_retried_by_the_next_call(fake):
    fake.crash("linear", "1.0,0.0")
    cfg = fake(max_attempts=1)
    result = run_sweep(cfg, FakeEvaluator())
    assert [o.point for o in result.failed] == [SweepPoint("linear", (1.0, 0.0))]
    assert not (SweepPoint("linear", (1.0, 0.0)).folder(cfg.output_dir) / DONE_MARKER).exists()
    rows = list(csv.DictReader(result.files["csv"].read_text().splitlines()))
    assert [r["status"] for r in rows].count("failed") == 1
    # The failed point is left out of its front, the others still have summaries.
    assert sum(result.summary["linear"]["num_seeds"]) == 2 and sum(result.summary["raco"]["num_seeds"]) == 3

    (fake.root / "crash_linear_1.0,0.0").unlink()
    again = run_sweep(cfg, FakeEvaluator())
    assert not again.failed
    assert fake.calls()[-1] == "linear 1.0,0.0" and len(fake.calls()) == 7


def test_timeout_kills_the_attempt_and_counts_as_a_crash(fake):
    fake.crash("raco", "0.0,1.0", "hang")
    cfg = fake(aggregators=["raco"], weights=[[0.0, 1.0]], timeout_s=1.0, max_attempts=1)
    result = run_sweep(cfg, FakeEvaluator())
    assert result.failed and "timeout" in (cfg.points()[0].folder(cfg.output_dir) / "train.log").read_text()


def test_outputs_csv_json_png_and_summary(fake):
    result = run_sweep(fake(), FakeEvaluator())
    rows = list(csv.DictReader(result.files["csv"].read_text().splitlines()))
    assert len(rows) == 6
    assert {"aggregator", "weights", "w/helpful", "w/harmless", "accuracy/helpful", "margin/harmless"} <= set(rows[0])
    data = json.loads(result.files["json"].read_text())
    assert data["objectives"] == ["helpful", "harmless"] and len(data["points"]) == 6
    raco, linear = data["summary"]["raco"], data["summary"]["linear"]
    for summary in (raco, linear):  # the fake metrics follow the weights exactly
        assert [s["value"] for s in summary["steering"]] == pytest.approx([1.0, 1.0])
    assert raco["hypervolume"]["value"] > linear["hypervolume"]["value"]  # the fake raco front is shifted outwards
    assert "reference point" in data["hypervolume_note"]
    assert result.files["png"].read_bytes()[:4] == b"\x89PNG"


def test_eval_is_redone_when_a_point_is_retrained(fake):
    cfg = fake(aggregators=["raco"], weights=[[0.5, 0.5]])
    evaluator = FakeEvaluator()
    run_sweep(cfg, evaluator)
    folder = cfg.points()[0].folder(cfg.output_dir)
    (folder / DONE_MARKER).unlink()  # crash after eval.json was written
    run_sweep(cfg, evaluator)
    assert evaluator.calls == 2
    assert json.loads((folder / EVAL_FILE).read_text())["finished_at"] == json.loads((folder / DONE_MARKER).read_text())["finished_at"]


def test_eval_is_redone_when_the_evaluation_settings_change(fake):
    cfg = fake(aggregators=["raco"], weights=[[0.5, 0.5]])
    evaluator = FakeEvaluator()
    evaluator.settings = {"judges": ["length_tokens"], "num_prompts": 48}
    run_sweep(cfg, evaluator)
    run_sweep(cfg, evaluator)
    assert evaluator.calls == 1  # same model, same settings: the cached eval.json
    evaluator.settings = {"judges": ["length_tokens"], "num_prompts": 32}
    run_sweep(cfg, evaluator)
    assert evaluator.calls == 2
    saved = json.loads((cfg.points()[0].folder(cfg.output_dir) / EVAL_FILE).read_text())
    assert saved["settings"] == {"judges": ["length_tokens"], "num_prompts": 32}


def test_held_out_evaluator_settings_name_every_generation_option():
    from raco_ds.evaluation.generation import GenerationConfig
    from raco_ds.pareto.evaluate import GenerationEval, HeldOutEvaluator

    def settings(**generation):
        return json.dumps(HeldOutEvaluator(generation=GenerationEval(**generation)).settings, sort_keys=True)

    base = settings()
    assert json.dumps(HeldOutEvaluator().settings) != base  # pairs only vs pairs and generations
    for changed in ({"num_prompts": 8}, {"judges": ["implicit_reward"]}, {"config": GenerationConfig(max_new_tokens=7)},
                    {"config": GenerationConfig(sample=True, seed=3)}):  # fmt: skip
        assert settings(**changed) != base, changed


def test_rejects_a_restart_with_another_train_command_or_changed_training_files(fake, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = fake(aggregators=["raco"], weights=[[1.0, 0.0]], train_args=["--data", str(data)])
    run_sweep(cfg, FakeEvaluator())
    run_sweep(cfg, FakeEvaluator())  # unchanged: a restart is fine
    with pytest.raises(SweepError, match="train_command="):
        run_sweep(dataclasses.replace(cfg, train_command=[sys.executable, "-c", "pass"]), FakeEvaluator())
    data.write_text('{"prompt": "a", "chosen": "c", "rejected": "b"}\n')
    with pytest.raises(SweepError, match=f"training read {data}, and the content changed"):
        run_sweep(cfg, FakeEvaluator())


def test_rejects_a_restart_with_different_training_settings(fake):
    run_sweep(fake(aggregators=["raco"], weights=[[1.0, 0.0]]), FakeEvaluator())
    with pytest.raises(SweepError, match="train_args=.*new --output-dir"):
        run_sweep(fake(aggregators=["raco"], weights=[[1.0, 0.0]], train_args=["--preset", "main"]), FakeEvaluator())
    # Growing the grid or the aggregator list is allowed.
    result = run_sweep(fake(aggregators=["raco", "cagrad"], weights=[[1.0, 0.0], [0.0, 1.0]]), FakeEvaluator())
    assert [o.status for o in result.outcomes] == ["skipped", "trained", "trained", "trained"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train_args": ["--weights", "0.5,0.5"]}, "sweep's weights setting"),
        ({"train_args": ["--raco.aggregator=linear"]}, "sweep's aggregators setting"),
        ({"aggregators": []}, "aggregators="),
        ({"weights": [[0.5, 0.6]]}, r"weights\[0\]"),
        ({"weights": [[0.5, 0.5], [0.5, 0.5]]}, "repeats a vector"),
        ({"weights": None, "grid_step": 0.3}, "does not divide 1"),
        ({"metrics": ["accuracy/helpful"]}, "one per objective"),
        ({"seeds": [0, 0]}, "seeds="),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_rejects_bad_sweep_settings(fake, overrides, message):
    with pytest.raises(ValueError, match=message):
        fake(**overrides)


def test_a_failing_evaluation_marks_the_point_failed_and_is_retried(fake):
    cfg = fake(aggregators=["raco"], weights=[[0.0, 1.0], [1.0, 0.0]])
    good = FakeEvaluator()

    def flaky(point, train_dir):
        if point.weights == (1.0, 0.0):
            raise RuntimeError("broken export")
        return good(point, train_dir)

    result = run_sweep(cfg, flaky)
    assert [o.status for o in result.outcomes] == ["trained", "failed"]
    again = run_sweep(cfg, good)  # trained already: only the evaluation runs again
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"] and again.outcomes[1].metrics
    assert len(fake.calls()) == 2


def _sweep_launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_launcher", Path(__file__).resolve().parents[1] / "launchers" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_launcher_parses_options_and_train_args(tmp_path, capsys):
    launcher = _sweep_launcher()
    cfg, _ = launcher.config_from_args([
        "--output-dir", str(tmp_path), "--aggregators", "raco,linear", "--weights", "0,1;1,0", "--threads", "1",
        "--train-command", "deepspeed --num_gpus 2 launchers/train.py", "--", "--preset", "tiny", "--max-steps", "3",
    ])
    assert cfg.aggregators == ["raco", "linear"] and cfg.weights == [[0.0, 1.0], [1.0, 0.0]]
    assert cfg.train_args == ["--preset", "tiny", "--max-steps", "3"]
    assert cfg.train_command == ["deepspeed", "--num_gpus", "2", "launchers/train.py"]
    assert cfg.env == {"OMP_NUM_THREADS": "1"}
    assert launcher.main(["--output-dir", str(tmp_path), "--", "--aggregator", "mgda"]) == 2
    assert "sweep's aggregators setting" in capsys.readouterr().err


def test_sweep_launcher_table_lists_points_and_fronts(fake):
    cfg = fake()
    table = _sweep_launcher().summary_table(cfg, run_sweep(cfg, FakeEvaluator()))
    assert table.count("| raco | ") == 4 and "| hypervolume |" in table  # 3 points + 1 summary row


# ---------------------------------------------------------------------------
# End to end on the real trainer (tiny preset, 2 steps per point).


@pytest.mark.slow
def test_end_to_end_tiny_sweep(tmp_path):
    cfg = SweepConfig(
        output_dir=str(tmp_path / "sweep"),
        aggregators=["raco"],
        objectives=["helpful", "harmless"],
        weights=[[0.0, 1.0], [1.0, 0.0]],
        train_args=[
            "--preset", "tiny", "--ds_config", "ds_configs/zero1.json", "--max-steps", "2",
            "--logging.progress_bar", "false", "--logging.tensorboard", "false",
        ],
        timeout_s=600,
    )
    from raco_ds.evaluation.generation import GenerationConfig
    from raco_ds.pareto.evaluate import GenerationEval, HeldOutEvaluator

    generation = GenerationEval(num_prompts=4, config=GenerationConfig(max_new_tokens=8))
    result = run_sweep(cfg, HeldOutEvaluator(generation=generation))
    assert not result.failed, [o.point.name for o in result.failed]
    for outcome in result.outcomes:  # judged generations and per-item values for the bootstrap
        assert 0 < outcome.metrics["gen/length_tokens"] <= 8
        assert len(outcome.items["gen/length_tokens"]["values"]) == 4
        assert len(outcome.items["accuracy/helpful"]["values"]) == 16
        assert (outcome.point.folder(cfg.output_dir) / "generations.jsonl").read_text().count("\n") == 4
    hv = result.summary["raco"]["hypervolume"]  # (steering over 2 weights may tie: NaN, so check the volume)
    assert hv["low"] <= hv["value"] <= hv["high"]
    for outcome in result.outcomes:
        m = outcome.metrics
        for name in ("helpful", "harmless"):
            assert 0.0 <= m[f"accuracy/{name}"] <= 1.0
            assert m[f"num_pairs/{name}"] == 16  # the tiny preset's held-out split
            for metric in ("margin", "kl_proxy"):
                assert m[f"{metric}/{name}"] == pytest.approx(m[f"{metric}/{name}"])  # finite, not NaN
        # Same numbers as the trainer's own held-out evaluation of that run.
        own = json.loads((outcome.point.folder(cfg.output_dir) / "train" / "eval_after.json").read_text())
        assert [m["accuracy/helpful"], m["accuracy/harmless"]] == pytest.approx(own["accuracy"])
        assert [m["margin/helpful"], m["margin/harmless"]] == pytest.approx(own["margin"], abs=1e-6)
    assert result.files["png"].read_bytes()[:4] == b"\x89PNG"
    assert set(result.summary) == {"raco"}

    again = run_sweep(cfg)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"]
