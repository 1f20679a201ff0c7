"""What one optimizer step records: per-objective metrics, tokens, timings, and runs of skipped steps.

A capture strategy (raco_ds.trainer.capture) fills a :class:`StepRecord` as it
runs the step's passes; :func:`step_scalars` turns it and the hook's
``RacoStepStats`` into the step's tagged scalars; :class:`SkipCounter` stops
the run when too many steps in a row were skipped for non-finite gradients.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.trainer.metrics import TAGS, memory_scalars, raco_scalars

__all__ = ["SkipCounter", "StepRecord", "TooManySkippedSteps", "progress_text", "step_scalars"]

_PER_OBJECTIVE = TAGS["per_objective"]  # loss, accuracy, margin, chosen_reward, rejected_reward


class StepRecord:
    """Per-objective metric sums of one step (pair-weighted), tokens and pass times."""

    def __init__(self, k: int) -> None:
        """An empty record for ``k`` objectives."""
        self.sums = torch.zeros(k, len(_PER_OBJECTIVE) + 1, dtype=torch.float64)  # metrics..., pairs
        self.tokens = 0
        self.pass_seconds = [float("nan")] * k  # per objective; NaN where passes are not per objective
        self.passes_seconds = 0.0  # forward + backward of the step (all objectives), up to hook.step()
        self.scatter_seconds = float("nan")  # one-pass capture's reduce-scatter into the hook's buffer

    def add(self, out: Any, objectives: range | list[int]) -> None:
        """Add a micro-batch's PreferenceLosses for ``objectives``."""
        values = [out.losses.detach(), out.accuracy, out.margin, out.chosen_reward, out.rejected_reward]
        n = out.num_pairs.to(torch.float64)
        for k in objectives:
            if n[k] > 0:
                self.sums[k, :-1] += torch.stack([v[k].double().cpu() for v in values]) * n[k]
                self.sums[k, -1] += n[k]

    def reduced(self, world: int) -> tuple[torch.Tensor, int]:
        """Metric means per objective over all ranks ((K, 5), NaN without pairs) and the total tokens."""
        flat = torch.cat([self.sums.flatten(), torch.tensor([float(self.tokens)], dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(flat)
        sums = flat[:-1].view_as(self.sums)
        pairs = sums[:, -1:]
        means = torch.where(pairs > 0, sums[:, :-1] / pairs.clamp_min(1), torch.full_like(sums[:, :-1], float("nan")))
        return means, int(flat[-1])


def step_scalars(names: list[str], record: StepRecord, means: torch.Tensor, stats: Any, *, lr: float, tokens: int,
                 seconds: float) -> dict[str, float]:  # fmt: skip
    """Every scalar of one step, tagged as in metrics.TAGS (``means``, ``tokens``: :meth:`StepRecord.reduced`)."""
    scalars: dict[str, float] = {}
    for k, name in enumerate(names):
        for m, metric in enumerate(_PER_OBJECTIVE):
            scalars[TAGS["train"].format(metric=metric, objective=name)] = float(means[k, m])
        if not math.isnan(record.pass_seconds[k]):
            scalars[TAGS["pass_time"].format(objective=name)] = record.pass_seconds[k]
    scalars.update(raco_scalars(stats, names))
    scalars[TAGS["lr"]] = lr
    scalars[TAGS["tokens_per_s"]] = tokens / seconds
    scalars[TAGS["step_time"]] = seconds
    scalars[TAGS["passes_time"]] = record.passes_seconds
    if not math.isnan(record.scatter_seconds):
        scalars[TAGS["scatter_time"]] = record.scatter_seconds
    scalars.update(memory_scalars())
    return scalars


def progress_text(names: list[str], means: torch.Tensor, stats: Any, seconds: float) -> str:
    """The progress bar's postfix: each objective's loss, the coefficients and the step time."""
    losses = " ".join(f"{name}={means[k, 0]:.3f}" for k, name in enumerate(names))
    coefficients = "skipped" if stats.coefficients is None else ",".join(f"{float(a):.2f}" for a in stats.coefficients)
    return f"{losses} a={coefficients} {seconds:.1f}s/step"


class TooManySkippedSteps(RuntimeError):
    """``raco.max_consecutive_skips`` steps in a row were skipped for non-finite gradients."""


class SkipCounter:
    """Counts steps skipped in a row for non-finite gradients and stops the run past the limit."""

    def __init__(self, limit: int, names: list[str]) -> None:
        """``limit``: raco.max_consecutive_skips (0: never stop); ``names``: the objectives."""
        self.limit, self.names = limit, names
        self.steps: list[int] = []
        self.objectives: set[int] = set()

    def count(self, step: int, stats: Any, checkpoints: Path) -> None:
        """Note ``step``'s outcome; raise :class:`TooManySkippedSteps` at the limit (no checkpoint is written)."""
        if not stats.skipped:
            self.steps, self.objectives = [], set()
            return
        self.steps.append(step)
        self.objectives.update(stats.nonfinite_objectives)  # the hook has logged the step's objectives
        if self.limit and len(self.steps) >= self.limit:
            from raco_ds.trainer.checkpoint import find_latest

            latest = find_latest(checkpoints)
            raise TooManySkippedSteps(
                f"{len(self.steps)} consecutive steps ({self.steps[0]}-{self.steps[-1]}) skipped for non-finite "
                f"gradients in {sorted(self.names[k] for k in self.objectives)}; stopping "
                + (f"(the last checkpoint, {latest}, is untouched; resume from it with --resume). " if latest
                   else "(no checkpoint was written). ")
                + "Lower optimisation.lr, check those objectives' data, or raise raco.max_consecutive_skips"
            )  # fmt: skip
