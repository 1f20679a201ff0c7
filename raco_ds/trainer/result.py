"""What a training run reports: :class:`RunResult`, and the console summary printed at its end."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PREVIOUS_RESULTS", "RunResult", "clear_previous_results", "format_summary"]

logger = logging.getLogger("raco_ds.trainer")

PREVIOUS_RESULTS = ("export", "export_adapter", "heldout_logps.safetensors", "eval_before.json", "eval_after.json")
"""What a finished run leaves in its folder that describes that run's model: a fresh run in the same
folder removes them first, so that nothing (launchers/eval.py, a sweep) reads an earlier run's model
or scores as this run's."""


def clear_previous_results(out: Path) -> None:
    """Remove :data:`PREVIOUS_RESULTS` from ``out`` before a fresh (not resumed) run writes there."""
    removed = []
    for name in PREVIOUS_RESULTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.info("%s held an earlier run's results; removed %s (a fresh run starts here)", out, ", ".join(removed))


@dataclass
class RunResult:
    """What a finished (or stopped) run reports back to the launcher (identical on every rank)."""

    step: int
    """Optimizer steps completed."""
    objectives: list[str]
    """Objective names."""
    eval_before: dict[str, list[float]] | None
    """Held-out metrics before training ({metric: [per objective]})."""
    eval_after: dict[str, list[float]] | None
    """Held-out metrics after the last step."""
    output_dir: Path
    """The run folder."""
    export_dir: Path | None = None
    """The HF export folder (None when export is off)."""
    stopped_early: bool = False
    """True when the run checkpointed and stopped before max_steps (signal or stop_after_steps)."""
    seconds: float = 0.0
    """Wall time of train()."""
    history: list[dict[str, float]] = field(default_factory=list)
    """The per-step scalars logged in this process (also in <output_dir>/metrics.jsonl)."""
    intervals: dict[str, Any] = field(default_factory=dict)
    """Held-out accuracy/margin after training with bootstrap 95% intervals, per objective on all,
    disagreeing and agreeing pairs ({"<metric><subset>/<objective>": Estimate})."""


def format_summary(result: RunResult) -> str:
    """The console table: held-out per-objective metrics before and after training."""
    before, after = result.eval_before, result.eval_after
    if after is None:
        return "no held-out evaluation"
    rows = [
        ("accuracy", "reward accuracy (implicit reward, preferred > other)"),
        ("likelihood_accuracy", "likelihood accuracy (mean log-prob, preferred > other)"),
        ("margin", "reward margin"),
        ("loss", "loss"),
    ]
    pairs = after.get("num_pairs", [])
    lines = [f"held-out evaluation after {result.step} steps ({'/'.join(str(int(p)) for p in pairs)} pairs)",
             f"  {'objective':<12}{'metric':<56}{'before':>9}{'after':>9}"]  # fmt: skip
    for k, name in enumerate(result.objectives):
        for key, label in rows:
            b = f"{before[key][k]:9.3f}" if before else f"{'-':>9}"
            lines.append(f"  {name if key == 'accuracy' else '':<12}{label:<56}{b}{after[key][k]:9.3f}")
    lines.append(
        "  (reward accuracy is 0 before training by construction: the reference is the initial model, so every "
        "implicit reward starts at 0;\n   likelihood accuracy is the model's own preference, comparable before and after)"
    )
    if result.intervals:
        from raco_ds.trainer.eval import format_intervals

        lines.append("held-out after training, mean [95% bootstrap interval over prompts] (n = pairs); "
                     "both are 0 before training. Learning shows where an interval excludes 0 (margin) or 0.5 "
                     "(accuracy):")
        lines.append(format_intervals(result.intervals, result.objectives, ("margin", "accuracy")))
    lines.append(
        f"run folder: {result.output_dir}" + (f"; HF export: {result.export_dir}" if result.export_dir else "")
    )
    lines.append("next: the same comparison over weights, aggregators and seeds, with generation judges: "
                 "python launchers/sweep.py --help (recorded runs: benchmarks/quality/README.md)")
    return "\n".join(lines)
