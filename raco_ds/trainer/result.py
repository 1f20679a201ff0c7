"""What a training run reports: :class:`RunResult`, and the console summary printed at its end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunResult", "format_summary"]


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
