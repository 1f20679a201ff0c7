"""Smoke tests: benchmarks/overhead.py, memory.py and scaling.py run with --quick and write valid JSON;
benchmarks/hook_overhead.py --captures runs on a tiny model.

The three scripts start at once (each launches its own gloo CPU ranks), so the
test takes about as long as the slowest of them (~1-1.5 min on 2 busy cores);
the --captures one takes ~15 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("overhead", "memory", "scaling")


@pytest.mark.slow
def test_benchmarks_quick_write_json(tmp_path: Path) -> None:
    """Each script exits 0, prints its table and writes JSON with its results and the machine it ran on."""
    running = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", "--json", str(tmp_path / f"{name}.json")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in SCRIPTS
    }
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in running.items()}
    for name, proc in running.items():
        assert proc.returncode == 0, f"{name}.py --quick failed:\n{outputs[name][-4000:]}"
        assert "==" in outputs[name], f"{name}.py printed no table"
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["benchmark"] == name
        assert {"date_utc", "cpu", "cores", "torch", "deepspeed"} <= set(payload["machine"])
        assert payload["config"]["quick"] is True

    overhead = json.loads((tmp_path / "overhead.json").read_text())["results"]["summary"]
    modes = {line["mode"] for line in overhead}
    assert {"linear", "raco"} <= modes
    assert all(line["ratio"] > 0 and math.isfinite(line["ratio"]) for line in overhead)

    memory = json.loads((tmp_path / "memory.json").read_text())["results"]["summary"]
    for line in memory:  # the hook's buffers are exactly (K-1) shards, up to ZeRO's padding
        assert 0.99 < line["hook_over_design"] < 1.1, line

    scaling = json.loads((tmp_path / "scaling.json").read_text())["results"]
    hook_calls = [c for c in scaling["collectives"] if c["mode"] == "raco" and c["phase"] == "hook"]
    gram = [c for c in hook_calls if c["op"] == "all_reduce" and c["N"] > 1]
    assert gram, "no all-reduce counted in the hook on more than one rank"
    for c in gram:  # the Gram (K*K float64) and the coefficient check (2K float64): nothing shard-sized
        assert c["bytes"] <= 8 * (c["K"] ** 2 + 2 * c["K"]), c


@pytest.mark.slow
def test_hook_overhead_captures_writes_ratios(tmp_path: Path) -> None:
    """hook_overhead.py --captures (weighted vs K passes vs one pass) runs on a tiny model and writes finite ratios."""
    out = tmp_path / "captures.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "hook_overhead.py"), "--captures", "--reps", "1", "--stages", "3",
        "--ks", "2", "--hidden", "32", "--layers", "1", "--vocab", "128", "--seq", "16", "--pairs", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"hook_overhead.py --captures failed:\n{proc.stdout[-4000:]}"
    assert "target: onepass <= 1.10x weighted at ZeRO-3, K=2" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "hook_overhead_captures"
    rows = payload["results"]
    assert {(r["stage"], r["shape"], r["k"]) for r in rows} == {(3, "shared", 2), (3, "objective_rows", 2)}
    for r in rows:
        ratios = [r["kpass_x"], r["onepass_x"], r["kpass_cpu_x"], r["onepass_cpu_x"], *r["onepass_x_iqr"]]
        assert all(math.isfinite(x) and x > 0 for x in ratios), r
        assert r["ms"]["weighted"] > 0 and r["onepass_reduce_ms"] >= 0, r
        assert 0 < r["peak_mib"]["onepass"] and 0 < r["peak_mib"]["k_full_gradients"], r
