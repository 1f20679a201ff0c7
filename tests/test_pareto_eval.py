"""Held-out evaluation (raco_ds.pareto.evaluate, launchers/eval.py) on the tiny model and the bundled data."""

import importlib.util
import json
from pathlib import Path

import pytest

from raco_ds.pareto.evaluate import EvalReport, format_report, resolve_run

REPO = Path(__file__).resolve().parents[1]


def _eval_launcher():
    spec = importlib.util.spec_from_file_location("eval_launcher", REPO / "launchers" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_initial_model_against_itself_has_zero_margins_and_kl(tmp_path):
    from raco_ds.models import resolve_model_path

    out = tmp_path / "m.json"
    code = _eval_launcher().main(
        ["--model", resolve_model_path("tiny"), "--preset", "tiny", "--data.num_eval_pairs", "8", "--output", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["objectives"] == ["helpful", "harmless"] and report["num_eval_pairs"] == 8
    assert m["num_pairs"] == [8, 8]
    # policy == reference: every implicit reward is exactly 0, so no pair is strictly preferred.
    assert m["margin"] == [0.0, 0.0] and m["kl_proxy"] == [0.0, 0.0] and m["accuracy"] == [0.0, 0.0]
    assert all(0.0 <= v <= 1.0 for v in m["likelihood_accuracy"])


def test_eval_launcher_names_a_missing_model_folder(tmp_path, capsys):
    assert _eval_launcher().main(["--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_resolve_run_finds_export_and_config(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    assert resolve_run(run) == (run / "export", run / "config.yaml")
    assert resolve_run(run / "export") == (run / "export", run / "config.yaml")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert resolve_run(bare) == (bare, None)
    (tmp_path / "noexport").mkdir()
    (tmp_path / "noexport" / "config.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match="without export"):
        resolve_run(tmp_path / "noexport")


def test_report_flattens_and_formats():
    report = EvalReport(objectives=["a", "b"], metrics={"accuracy": [0.5, 0.75]})
    assert report.flat() == {"accuracy/a": 0.5, "accuracy/b": 0.75}
    assert "0.7500" in format_report(report)


def test_eval_launcher_generates_judges_and_writes_samples_with_intervals(tmp_path):
    from raco_ds.models import resolve_model_path

    out, samples = tmp_path / "m.json", tmp_path / "gen.jsonl"
    code = _eval_launcher().main([
        "--model", resolve_model_path("tiny"), "--preset", "tiny", "--data.num_eval_pairs", "8", "--output", str(out),
        "--generate", "--num-prompts", "3", "--max-new-tokens", "6", "--judges", "length_tokens,implicit_reward",
        "--samples", str(samples), "--sample", "--gen-seed", "1",
    ])
    assert code == 0
    report = json.loads(out.read_text())
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 3 and all(0 <= s["response_tokens"] <= 6 for s in lines)
    assert [s["scores"]["length_tokens"] for s in lines] == [s["response_tokens"] for s in lines]
    assert all(s["scores"]["implicit_reward"] == 0.0 for s in lines)  # the model is its own reference
    length = report["intervals"]["gen/length_tokens"]
    assert length["n"] == 3 and length["low"] <= length["value"] <= length["high"]
    assert report["intervals"]["accuracy_disagree/helpful"]["n"] == report["num_conflict_pairs"]
    assert report["generation"]["decoding"].startswith("sampled")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from trainer_runs import check, run_python

    out = tmp_path_factory.mktemp("runs") / "run"
    check(run_python("--preset", "tiny", "--max-steps", "2", "--data.num_eval_pairs", "8", "--output-dir", str(out)))
    return out


def _counting_scorer(monkeypatch) -> list[int]:
    """Count the forward passes over held-out pairs the evaluator makes (one list entry per call)."""
    import raco_ds.trainer.eval as trainer_eval

    calls: list[int] = []
    real = trainer_eval.score_pairs

    def counted(engine, dataset, indices, *args, **kwargs):
        calls.append(len(indices))
        return real(engine, dataset, indices, *args, **kwargs)

    monkeypatch.setattr(trainer_eval, "score_pairs", counted)
    return calls


def test_a_run_folder_is_evaluated_from_the_scores_the_run_saved(tiny_run, tmp_path, monkeypatch):
    import shutil

    from raco_ds.pareto.evaluate import HeldOutEvaluator

    assert (tiny_run / "reference_logps.safetensors").is_file() and (tiny_run / "heldout_logps.safetensors").is_file()
    calls = _counting_scorer(monkeypatch)
    reused = HeldOutEvaluator().evaluate(tiny_run)
    assert calls == []  # neither the reference nor the trained model is run again

    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    (bare / "reference_logps.safetensors").unlink()
    (bare / "heldout_logps.safetensors").unlink()
    rescored = HeldOutEvaluator().evaluate(bare)
    assert calls == [8, 8]  # the reference, then the trained model
    for name, values in reused.metrics.items():
        assert values == pytest.approx(rescored.metrics[name], abs=1e-6), name
    assert [v for v in reused.item_values["accuracy/helpful"].values] == rescored.item_values["accuracy/helpful"].values


def test_saved_held_out_scores_are_not_used_for_other_weights(tiny_run, tmp_path, monkeypatch):
    import os
    import shutil

    from raco_ds.pareto.evaluate import HeldOutEvaluator

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, copy_function=shutil.copy2)  # copy2 keeps the mtimes the key holds
    weights = next((run / "export").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # export rewritten
    calls = _counting_scorer(monkeypatch)
    HeldOutEvaluator().evaluate(run)
    assert calls == [8]  # the saved reference still holds; the trained model's scores are recomputed


def test_a_planted_pickle_in_a_run_folder_is_never_run(tiny_run, tmp_path, monkeypatch):
    import shutil

    import torch

    from raco_ds.pareto.evaluate import HeldOutEvaluator

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, copy_function=shutil.copy2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("heldout_logps.safetensors", "reference_logps.safetensors", "heldout_logps.pt"):
        torch.save(Evil(), run / name)
    calls = _counting_scorer(monkeypatch)
    HeldOutEvaluator().evaluate(run)
    assert calls == [8, 8] and not marker.exists()


def test_saved_held_out_scores_are_not_used_in_another_dtype(tiny_run, monkeypatch):
    from raco_ds.pareto.evaluate import HeldOutEvaluator
    from raco_ds.trainer.config import load_config, run_config_root

    cfg = load_config(tiny_run / "config.yaml", root=run_config_root(tiny_run / "config.yaml"))
    cfg.model.dtype = "bf16"
    calls = _counting_scorer(monkeypatch)
    HeldOutEvaluator().evaluate(tiny_run, cfg=cfg)
    assert calls == [8, 8]  # the run's fp32 scores (reference and trained model) are not mixed with bf16 ones


def test_a_fresh_run_in_an_old_run_folder_removes_that_runs_results(tiny_run, tmp_path):
    import shutil

    from trainer_runs import check, run_python

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = check(run_python("--preset", "tiny", "--max-steps", "1", "--data.num_eval_pairs", "8",
                              "--weights", "0.9,0.1", "--checkpointing.export", "false", "--output-dir", str(run)))
    assert not (run / "export").exists() and not (run / "heldout_logps.safetensors").exists()
    assert (run / "eval_after.json").is_file()  # this run's
    assert "held an earlier run's results; removed export, heldout_logps.safetensors" in result.stderr + result.stdout
    with pytest.raises(FileNotFoundError, match="without export"):
        resolve_run(run)  # nothing evaluates the earlier run's model as this run's
