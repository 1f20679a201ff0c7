"""Helpers for tests that run launchers/train.py in a subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from multirank import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launchers" / "train.py"
FAULT_INJECT = REPO / "tests" / "fault_inject.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)  # never inherit a launcher environment from the test runner
    return env


def run_python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python launchers/train.py ARGS`` as one process (a world of one)."""
    return subprocess.run(
        [sys.executable, str(TRAIN), "--logging.progress_bar", "false", *args],
        check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def run_with_fault(spec: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python launchers/train.py ARGS`` with one fault injected (tests/fault_inject.py SPEC)."""
    return subprocess.run(
        [sys.executable, str(FAULT_INJECT), spec, "--", "--logging.progress_bar", "false", *args],
        check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def run_deepspeed(num_ranks: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N launchers/train.py ARGS`` on CPU ranks, on a free port."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return subprocess.run(
        [*launcher, "--num_gpus", str(num_ranks), "--master_port", str(free_port()), str(TRAIN), *args],
        check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the run's output tail when it did not exit 0."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def deterministic(record: dict[str, float]) -> dict[str, float]:
    """The scalars that must repeat exactly (no timings, throughput or memory)."""
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/", "memory/"))}


def start_python(*args: str) -> subprocess.Popen:
    """``python launchers/train.py ARGS`` started in the background, stdout as a line stream."""
    return subprocess.Popen(
        [sys.executable, str(TRAIN), "--logging.progress_bar", "false", *args],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
