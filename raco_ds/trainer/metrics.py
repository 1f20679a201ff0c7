"""What the trainer logs: the scalars of a step, under the tag names in :data:`TAGS`, and ``metrics.jsonl``.

Tag names are listed in :data:`TAGS` so that tests and dashboards agree on them;
:mod:`raco_ds.trainer.trackers` sends them to TensorBoard and/or wandb. The run
folder's ``metrics.jsonl`` holds one line per step (:func:`append_jsonl`); a
resumed run first drops the lines a crashed run logged after its last
checkpoint (:func:`truncate_jsonl`).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from raco_ds.diskcache import atomic_file

__all__ = ["METRICS_FILE", "TAGS", "append_jsonl", "eval_scalars", "memory_scalars", "raco_scalars", "truncate_jsonl"]

METRICS_FILE = "metrics.jsonl"
"""The per-step scalars, one JSON object per line, in the run folder."""

TAGS = {
    "per_objective": ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward"),
    "train": "train/{metric}/{objective}",
    "eval": "eval/{metric}/{objective}",
    "gram": "raco/gram/{a}__{b}",
    "grad_norm": "raco/grad_norm/{objective}",
    "cosine": "raco/cosine/{a}__{b}",
    "coefficient": "raco/coefficient/{objective}",
    "dual": "raco/dual/{objective}",
    "dual_clipped": "raco/dual_clipped/{objective}",
    "clip_active": "raco/clip_active",
    "skipped": "raco/skipped",
    "nonfinite": "raco/nonfinite/{objective}",
    "combined_grad_norm": "train/grad_norm_combined",
    "lr": "train/lr",
    "tokens_per_s": "perf/tokens_per_s",
    "pass_time": "time/pass/{objective}",
    "passes_time": "time/passes",
    "scatter_time": "time/onepass_scatter",
    "hook_time": "time/hook",
    "hook_part_time": "time/hook_{part}",
    "step_time": "time/step",
    "rss": "memory/rss_gib",
    "peak_rss": "memory/peak_rss_gib",
    "cuda_max_allocated": "memory/cuda_max_allocated_gib",
}
"""Tag templates of every scalar the trainer writes."""


def _gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def memory_scalars() -> dict[str, float]:
    """Host RSS now and at peak (this process), and the accelerator's max allocated memory."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as handle:
            out[TAGS["rss"]] = _gib(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        pass
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out[TAGS["peak_rss"]] = _gib(peak_kib if sys.platform == "darwin" else peak_kib * 1024)
    if torch.cuda.is_available():
        out[TAGS["cuda_max_allocated"]] = _gib(torch.cuda.max_memory_allocated())
    return out


def raco_scalars(stats, names: Sequence[str]) -> dict[str, float]:
    """TensorBoard scalars of one :class:`~raco_ds.deepspeed.RacoStepStats`, tagged by objective name."""
    out: dict[str, float] = {TAGS["clip_active"]: float(stats.clip_active), TAGS["skipped"]: float(stats.skipped)}
    for i in stats.nonfinite_objectives:
        out[TAGS["nonfinite"].format(objective=names[i])] = 1.0
    k = len(names)
    for i, a in enumerate(names):
        out[TAGS["grad_norm"].format(objective=a)] = float(stats.grad_norms[i])
        for j in range(i, k):
            out[TAGS["gram"].format(a=a, b=names[j])] = float(stats.gram[i, j])
            if j > i:
                out[TAGS["cosine"].format(a=a, b=names[j])] = float(stats.cosines[i, j])
    for key, vector in (
        ("coefficient", stats.coefficients),
        ("dual", stats.dual),
        ("dual_clipped", stats.dual_clipped),
    ):
        if vector is not None:
            out.update({TAGS[key].format(objective=name): float(vector[i]) for i, name in enumerate(names)})
    if stats.coefficients is not None:
        # ||sum_k a_k g_k|| from the Gram alone: a^T H a (before DeepSpeed's clipping).
        a = stats.coefficients.to(torch.float64)
        out[TAGS["combined_grad_norm"]] = float((a @ stats.gram.to(torch.float64) @ a).clamp_min(0).sqrt())
    out[TAGS["hook_time"]] = float(stats.seconds_hook)
    for part in ("capture", "gram", "allreduce", "solve", "write"):
        out[TAGS["hook_part_time"].format(part=part)] = float(getattr(stats, f"seconds_{part}"))
    return out


def eval_scalars(result: Mapping[str, Sequence[float]], names: Sequence[str]) -> dict[str, float]:
    """Tagged scalars of held-out metrics ``{metric: [value per objective]}`` (pair counts left out)."""
    return {
        TAGS["eval"].format(metric=metric, objective=name): value
        for metric, values in result.items()
        if metric != "num_pairs"
        for name, value in zip(names, values)
    }


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one JSON line."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line torn by a crash mid-write
        return None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a crashed run may have logged steps it never checkpointed)."""
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= last_step]
        with atomic_file(path) as tmp:  # a crash now must not cost the lines kept
            tmp.write_text("".join(line + "\n" for line in kept))
