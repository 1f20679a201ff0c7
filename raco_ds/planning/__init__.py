"""Preflight memory planning for raco_ds jobs (used by launchers/plan.py and benchmarks/project.py).

The formulas live in :mod:`raco_ds.planning.memory`; this package re-exports
its public names so callers write ``from raco_ds.planning import plan_memory``.
"""

from raco_ds.planning.memory import (
    GIB,
    PRESETS,
    JobShape,
    MemoryPlan,
    ModelShape,
    activation_bytes_per_layer,
    activation_bytes,
    logits_bytes,
    plan_memory,
    suggest_fixes,
)

__all__ = [
    "GIB",
    "PRESETS",
    "JobShape",
    "MemoryPlan",
    "ModelShape",
    "activation_bytes_per_layer",
    "activation_bytes",
    "logits_bytes",
    "plan_memory",
    "suggest_fixes",
]
