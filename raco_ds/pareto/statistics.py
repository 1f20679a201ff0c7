"""Sweep statistics with 95% confidence intervals: fronts over seeds, hypervolume, steering, roughness.

A sweep trains one model per (aggregator, weight vector, seed). Per aggregator this module
reports, each with a bootstrap percentile interval:

per-weight means
    Objective k's metric at weight vector w, averaged over the seeds (the front's points).
hypervolume
    Of those per-weight means (:func:`raco_ds.pareto.metrics.hypervolume`, maximisation), above
    a reference point fixed for the whole sweep so aggregators compare.
steering
    Spearman correlation of w_k with objective k's per-weight mean, per objective (1: more
    weight always buys more of that objective); the sweep's steering statistic.
roughness
    Of the training curves (:func:`curve_roughness`), mean over the aggregator's runs.

The bootstrap is two-level and paired. Items (held-out pairs, generated samples) are resampled
by cluster (their prompt group) with ONE set of cluster draws shared by every model and metric
(:mod:`raco_ds.evaluation.bootstrap`): all models were scored on the same items, so a
replicate moves them together. Within each weight vector the seeds are resampled with
replacement, which adds the run-to-run variation. A statistic's interval is the 2.5-97.5
percentile of its value over the replicates. Points without per-item values (an evaluator that
gives means only) contribute their mean to every replicate: then only seeds vary.

Metrics are "higher is better"; a metric spec with a leading "-" (e.g. "-gen/length_tokens"
for conciseness) is negated first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raco_ds.evaluation.bootstrap import NUM_RESAMPLES, Estimate, cluster_counts, interval, replicate_means
from raco_ds.pareto.grid import Weights
from raco_ds.pareto.metrics import hypervolume, spearman

__all__ = ["MetricSpec", "RunData", "curve_roughness", "sweep_statistics"]


@dataclass(frozen=True)
class MetricSpec:
    """Which flat metric stands for an objective, and its sign (so that higher is better)."""

    key: str
    """Flat metric name, e.g. "accuracy_disagree/helpful" or "gen/length_tokens"."""
    sign: float = 1.0
    """+1, or -1 for metrics where lower is better."""

    @classmethod
    def parse(cls, spec: str) -> MetricSpec:
        """From "key" or "-key".

        >>> MetricSpec.parse("-gen/length_tokens")
        MetricSpec(key='gen/length_tokens', sign=-1.0)
        """
        spec = spec.strip()
        if not spec.lstrip("-"):
            raise ValueError(f"metric spec {spec!r} is empty; e.g. accuracy/helpful or -gen/length_tokens")
        return cls(spec[1:], -1.0) if spec.startswith("-") else cls(spec, 1.0)

    def __str__(self) -> str:
        return ("-" if self.sign < 0 else "") + self.key


@dataclass
class RunData:
    """One trained point of a sweep: its identity, metrics, per-item values and curve roughness."""

    aggregator: str
    """Aggregator name."""
    weights: Weights
    """User weights."""
    seed: int
    """Training seed."""
    metrics: Mapping[str, float]
    """Flat metric means."""
    items: Mapping[str, Mapping[str, list]] = field(default_factory=dict)
    """Per-item values: key -> {"values": [...], "clusters": [...]}."""
    roughness: float = math.nan
    """Training-curve roughness (NaN: no curve)."""


def curve_roughness(series: Sequence[float]) -> float:
    """Root mean square of the second differences of a training curve (NaN below 3 points).

    Second differences cancel a steady trend, so what remains is the step-to-step jitter. On
    one seed's runs all aggregators see the same batches, so their roughness compares paired.

    >>> round(curve_roughness([1.0, 0.9, 0.8, 0.7]), 12)
    0.0
    >>> round(curve_roughness([1.0, 0.5, 1.0, 0.5]), 3)
    1.0
    """
    values = np.asarray([v for v in series if math.isfinite(v)], dtype=np.float64)
    if values.size < 3:
        return math.nan
    return float(np.sqrt(np.mean(np.diff(values, n=2) ** 2)))


def _mean_defined(values: np.ndarray) -> float:
    """Mean of the finite entries (NaN if none: e.g. Spearman of a constant metric)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _point_replicates(run: RunData, spec: MetricSpec, counts: Any) -> tuple[float, np.ndarray]:
    """(observed, replicates) of one run's signed metric."""
    item = run.items.get(spec.key)
    if item is not None and item["values"]:
        values = np.asarray(item["values"], dtype=np.float64)
        return spec.sign * float(values.mean()), spec.sign * replicate_means(values, item["clusters"], counts)
    value = spec.sign * float(run.metrics.get(spec.key, math.nan))
    return value, np.full(counts.counts.shape[0], value)


def sweep_statistics(
    runs: Sequence[RunData],
    metrics: Sequence[MetricSpec],
    *,
    reference: Sequence[float] | None = None,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """Per-aggregator statistics (see the module docstring) and the hypervolume reference used.

    Args:
        runs: the evaluated points (any number of seeds per weight vector).
        metrics: one metric per objective, in weight order.
        reference: hypervolume reference point (signed metrics); None: the sweep's nadir, the
            per-objective minimum of every aggregator's per-weight means.
    Returns:
        ({aggregator: {"weights": [...], "means": [[Estimate per objective] per weight],
        "num_seeds": [...], "hypervolume": Estimate, "steering": [Estimate per objective],
        "steering_mean": Estimate, "roughness": Estimate}}, reference).
    """
    rng = np.random.default_rng(seed)
    clusters = [c for run in runs for spec in metrics for c in run.items.get(spec.key, {}).get("clusters", [])]
    counts = cluster_counts(clusters or ["all"], num_resamples=num_resamples, seed=seed)

    # Per aggregator and weight vector: observed mean over seeds and its (B,) replicates, per objective.
    table: dict[str, dict[Weights, tuple[np.ndarray, np.ndarray, int]]] = {}
    for aggregator in dict.fromkeys(r.aggregator for r in runs):
        table[aggregator] = {}
        for weights in sorted({r.weights for r in runs if r.aggregator == aggregator}):
            group = [r for r in runs if r.aggregator == aggregator and r.weights == weights]
            per_run = [[_point_replicates(r, spec, counts) for spec in metrics] for r in group]
            observed = np.array([[obs for obs, _ in row] for row in per_run]).mean(axis=0)  # (K,)
            reps = np.array([[rep for _, rep in row] for row in per_run])  # (S, K, B)
            draws = rng.integers(0, len(group), size=(num_resamples, len(group)))  # seeds, with replacement
            resampled = reps[draws, :, np.arange(num_resamples)[:, None]].mean(axis=1)  # (B, K)
            table[aggregator][weights] = (observed, resampled, len(group))

    if reference is None:
        reference = [float(min(obs[k] for rows in table.values() for obs, _, _ in rows.values()))
                     for k in range(len(metrics))]
    reference = [float(x) for x in reference]

    out: dict[str, dict[str, Any]] = {}
    for aggregator, rows in table.items():
        weights = list(rows)
        observed = np.array([rows[w][0] for w in weights])  # (W, K)
        resampled = np.stack([rows[w][1] for w in weights], axis=1)  # (B, W, K)
        means = [[interval(observed[i, k], resampled[:, i, k], rows[w][2]) for k in range(len(metrics))]
                 for i, w in enumerate(weights)]
        hv = interval(hypervolume(observed, reference),
                      np.array([hypervolume(rep, reference) for rep in resampled]), len(weights))
        columns = [[w[k] for w in weights] for k in range(len(metrics))]
        steer_observed = np.array([spearman(columns[k], observed[:, k]) for k in range(len(metrics))])
        steer_reps = np.array([[spearman(columns[k], rep[:, k]) for k in range(len(metrics))] for rep in resampled])
        steering = [interval(steer_observed[k], steer_reps[:, k], len(weights)) for k in range(len(metrics))]
        steering_mean = interval(_mean_defined(steer_observed), np.array([_mean_defined(r) for r in steer_reps]),
                                 len(weights))
        rough = np.array([r.roughness for r in runs if r.aggregator == aggregator and math.isfinite(r.roughness)])
        roughness = Estimate(math.nan, math.nan, math.nan, 0) if not rough.size else interval(
            float(rough.mean()), rough[rng.integers(0, rough.size, size=(num_resamples, rough.size))].mean(axis=1),
            int(rough.size))
        out[aggregator] = {
            "weights": [list(w) for w in weights],
            "means": means,
            "num_seeds": [rows[w][2] for w in weights],
            "hypervolume": hv,
            "steering": steering,
            "steering_mean": steering_mean,
            "roughness": roughness,
        }
    return out, reference
