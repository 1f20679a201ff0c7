"""What the trainer logs: the scalars of a step, under the tag names in :data:`TAGS`.

Tag names are listed in :data:`TAGS` so that tests and dashboards agree on them;
:mod:`raco_ds.trainer.trackers` sends them to TensorBoard and/or wandb.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Sequence

import torch

__all__ = ["TAGS", "memory_scalars", "raco_scalars"]

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
