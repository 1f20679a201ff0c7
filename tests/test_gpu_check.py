"""scripts/gpu_check.py: its CPU dry run (every phase, gloo, tiny model) and its report logic.

The dry run takes ~45-65 s on 2 busy cores (three phase processes, each importing
DeepSpeed); it is what keeps the GPU script from rotting between GPU sessions.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_json(tmp_path: Path) -> None:
    """--dry-run: exit 0, one table, JSON with the device, every phase ok and every exactness check within tolerance."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=400, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert proc.stdout.count("== raco_ds gpu_check") == 1 and "PASSED" in proc.stdout, proc.stdout[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["passed"] is True
    phases = report["phases"]
    assert set(phases) == {"exactness", "gram", "steps"}
    assert all(p["status"] == "ok" for p in phases.values()), {k: p["error"] for k, p in phases.items()}

    exact = phases["exactness"]["records"]
    module = _module()
    assert {(r["precision"], r["stage"], r["shape"], r["mode"]) for r in exact} == {
        (*case, mode) for case in module.EXACT_CASES for mode in ("raco", "raco_onepass")
    }
    for r in exact:
        assert r["ok"] and max(r["gram_rel"], r["coef_abs"], r["update_rel"]) <= r["tolerance"], r
    fp32 = [r for r in exact if r["precision"] == "fp32"]
    assert max(r["update_rel"] for r in fp32) <= 1e-5  # on CPU the fp32 step is as exact as the hook's own tests

    gram = phases["gram"]["records"]
    assert {r["method"] for r in gram} >= {"auto", "fp32_chunks", "float64"}
    assert all(r["rel_err"] <= 1e-6 and r["ms"] > 0 and r["read_ms"] > 0 for r in gram), gram

    (steps,) = phases["steps"]["records"][:1]
    assert not steps["errors"] and set(steps["modes"]) == {"linear", "raco", "raco_onepass"}, steps
    assert steps["modes"]["linear"]["x_linear"] == 1.0
    assert all(m["ms"] > 0 and m["mfu"] is None for m in steps["modes"].values())  # no peak FLOP/s known on CPU
    assert set(steps["peak_gib"]) == set(steps["modes"])


def test_phase_over_budget_is_killed_and_keeps_what_it_finished(tmp_path: Path) -> None:
    """A worker over its budget is killed with its children; its finished records stay and its error is named."""
    module = _module()
    records, log = tmp_path / "sleepy.jsonl", tmp_path / "sleepy.log"
    hang = f"echo '{{\"kind\": \"gram\", \"k\": 2}}' > {records}; sleep 60 & wait"  # killing only bash would leave its sleep
    started = module.time.monotonic()
    outcome = module.run_budgeted(["bash", "-c", hang], 2, records, log)
    assert module.time.monotonic() - started < 10
    assert outcome["status"] == "timed_out" and "budget" in outcome["error"]
    assert outcome["records"] == [{"kind": "gram", "k": 2}]
    assert not module.passed({"sleepy": outcome})


def test_failed_worker_is_recorded_with_its_log(tmp_path: Path) -> None:
    module = _module()
    outcome = module.run_budgeted(["bash", "-c", "echo boom; exit 3"], 30, tmp_path / "r.jsonl", tmp_path / "l.log")
    assert outcome["status"] == "failed" and outcome["error"] == "exit status 3" and "boom" in outcome["log_tail"]
    assert outcome["records"] == []


def test_no_time_left_skips_the_phase(tmp_path: Path) -> None:
    module = _module()
    plan = module.plan_for("cpu", True, None)
    outcome = module.run_phase("gram", "gram", 1, plan, [], module.time.monotonic() + 1, tmp_path)
    assert outcome["status"] == "skipped" and not module.passed({"gram": outcome})


def test_table_shows_errors_and_failed_checks() -> None:
    module = _module()
    phases = {
        "exactness": {"status": "ok", "error": None, "records": [
            {"kind": "exactness", "world": 1, "precision": "fp32", "stage": 3, "shape": "shared", "k": 3,
             "mode": "raco", "gram_rel": 1e-3, "coef_abs": 0.0, "update_rel": 0.0, "ok": False, "tolerance": 1e-4},
            {"kind": "exactness", "world": 1, "precision": "bf16", "stage": 2, "shape": "shared", "k": 3,
             "mode": "raco_onepass", "error": "RuntimeError: boom"},
        ]},
        "steps": {"status": "failed", "error": "exit status 1", "records": []},
    }  # fmt: skip
    rows = module.table_rows(phases)
    assert [r[-1] for r in rows] == ["FAIL", "ERROR: RuntimeError: boom", "FAILED: exit status 1"]
    assert not module.passed(phases)


def test_cpu_needs_tiny() -> None:
    module = _module()
    with pytest.raises(SystemExit):
        module.parse_args(["--device", "cpu"])
    args = module.parse_args(["--dry-run"])
    assert (args.device, args.tiny) == ("cpu", True)


def test_model_flops_count_matmuls_and_attention() -> None:
    """6 x (P - input embedding) x tokens + 12 x layers x hidden x seq x tokens."""
    module = _module()
    spec = module.ModelSpec(vocab=100, hidden=8, layers=1, heads=2, kv_heads=1, seq=4)
    p = spec.num_params() - 100 * 8
    assert module._model_flops(spec, rows=3) == 6 * p * 12 + 12 * 1 * 8 * 4 * 12
