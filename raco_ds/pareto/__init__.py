"""Pareto-front sweeps: weight grids, front metrics, plots, and restartable (aggregator x weights) sweeps.

``launchers/sweep.py`` is the command line; :func:`run_sweep` is the API. The math modules
(``grid``, ``metrics``) import nothing heavy; ``plot`` imports matplotlib when called and the
default evaluator (``evaluate``) imports torch/transformers on first use.

>>> from raco_ds.pareto import simplex_grid, hypervolume
>>> hypervolume([(0.5, 1.0), (1.0, 0.5)], (0.0, 0.0))
0.75
"""

from raco_ds.pareto.grid import DEFAULT_STEP, Weights, format_weights, parse_weights, simplex_grid, validate_weights
from raco_ds.pareto.metrics import hypervolume, non_dominated, spearman
from raco_ds.pareto.plot import plot_sweep
from raco_ds.pareto.statistics import MetricSpec, RunData, curve_roughness, sweep_statistics
from raco_ds.pareto.sweep import PointOutcome, SweepConfig, SweepError, SweepPoint, SweepResult, run_sweep

__all__ = [
    "DEFAULT_STEP",
    "MetricSpec",
    "PointOutcome",
    "RunData",
    "SweepConfig",
    "SweepError",
    "SweepPoint",
    "SweepResult",
    "Weights",
    "curve_roughness",
    "format_weights",
    "hypervolume",
    "non_dominated",
    "parse_weights",
    "plot_sweep",
    "run_sweep",
    "simplex_grid",
    "spearman",
    "sweep_statistics",
    "validate_weights",
]
