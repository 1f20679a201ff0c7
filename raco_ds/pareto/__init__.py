"""Pareto-front sweeps: weight grids, front metrics, plots, and restartable (aggregator x weights) sweeps.

``launchers/sweep.py`` is the command line; :func:`run_sweep` is the API. The math modules
(``grid``, ``metrics``) import nothing heavy; ``plot`` imports matplotlib when called and the
default evaluator (``evaluate``) imports torch/transformers on first use.

>>> from raco_ds.pareto import simplex_grid, hypervolume
>>> hypervolume([(0.5, 1.0), (1.0, 0.5)], (0.0, 0.0))
0.75
"""

from raco_ds.pareto.grid import DEFAULT_STEP, Weights, format_weights, parse_weights, simplex_grid, validate_weights
from raco_ds.pareto.metrics import (
    ACCURACY_REFERENCE,
    CHANCE_REFERENCE,
    Monotonicity,
    hypervolume,
    monotonicity,
    non_dominated,
    spearman,
)
from raco_ds.pareto.plot import plot_fronts
from raco_ds.pareto.sweep import (
    PointOutcome,
    SweepConfig,
    SweepError,
    SweepPoint,
    SweepResult,
    front_summary,
    run_sweep,
)

__all__ = [
    "ACCURACY_REFERENCE",
    "CHANCE_REFERENCE",
    "DEFAULT_STEP",
    "Monotonicity",
    "PointOutcome",
    "SweepConfig",
    "SweepError",
    "SweepPoint",
    "SweepResult",
    "Weights",
    "format_weights",
    "front_summary",
    "hypervolume",
    "monotonicity",
    "non_dominated",
    "parse_weights",
    "plot_fronts",
    "run_sweep",
    "simplex_grid",
    "spearman",
    "validate_weights",
]
