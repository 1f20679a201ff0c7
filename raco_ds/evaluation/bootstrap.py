"""Bootstrap confidence intervals for means over evaluation items, resampled by cluster.

Evaluation items are not independent: HelpSteer's derived pairs share a prompt, and a prompt's
sampled generations share it too. So items carry a cluster id (their prompt group, see
:func:`raco_ds.trainer.data.leakage_groups`) and the bootstrap resamples whole clusters
(the cluster bootstrap); with one item per cluster it is the ordinary bootstrap.

One resample is a vector of counts over the cluster ids (how often each was drawn). Applying
the same counts to every metric of every model keeps the comparisons paired: two models
evaluated on the same items see the same resampled item set in each replicate, which is what
makes differences between them (and statistics of whole sweeps) tighter than their
separate intervals suggest.

>>> import numpy as np
>>> counts = cluster_counts(["a", "b", "c"], num_resamples=4000, seed=0)
>>> est = estimate(np.array([0.0, 1.0, 1.0]), np.array(["a", "b", "c"]), counts)
>>> round(est.value, 3), est.low < est.value < est.high
(0.667, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "CONFIDENCE",
    "NUM_RESAMPLES",
    "ClusterCounts",
    "Estimate",
    "ItemValues",
    "cluster_counts",
    "estimate",
    "estimates",
    "interval",
    "replicate_means",
]

CONFIDENCE = 0.95
"""Two-sided coverage of every reported interval."""

NUM_RESAMPLES = 2000
"""Bootstrap replicates by default (the percentile interval's tails then hold 50 replicates each)."""


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap percentile interval."""

    value: float
    """The statistic on the data as observed."""
    low: float
    """Lower end of the 95% interval."""
    high: float
    """Upper end of the 95% interval."""
    n: int
    """Items (or points) the statistic is computed from."""

    def to_dict(self) -> dict[str, float]:
        """JSON-able form."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class ItemValues:
    """One metric's value per evaluation item, with each item's bootstrap cluster (its prompt group)."""

    values: list[float]
    """Per-item values; the metric is their mean."""
    clusters: list[str]
    """Per-item cluster ids (items of one cluster are resampled together)."""

    def to_dict(self) -> dict[str, list]:
        """JSON-able form."""
        return {"values": self.values, "clusters": self.clusters}

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> ItemValues:
        """Inverse of :meth:`to_dict`."""
        return cls([float(v) for v in data["values"]], [str(c) for c in data["clusters"]])


@dataclass(frozen=True)
class ClusterCounts:
    """Bootstrap resamples of a set of clusters: ``counts[b, j]`` = draws of cluster ``ids[j]`` in replicate b."""

    ids: tuple[str, ...]
    """The cluster ids, in column order."""
    counts: np.ndarray
    """(num_resamples, num_clusters) draw counts; each row sums to the number of clusters."""

    def columns(self, clusters: Sequence[str]) -> np.ndarray:
        """Column index of each item's cluster (KeyError names an unknown cluster)."""
        where = {c: j for j, c in enumerate(self.ids)}
        return np.array([where[str(c)] for c in clusters], dtype=np.int64)


def cluster_counts(ids: Sequence[str], *, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> ClusterCounts:
    """Draw ``num_resamples`` bootstrap resamples (with replacement) of the distinct ``ids``."""
    unique = tuple(dict.fromkeys(str(i) for i in ids))
    if not unique:
        raise ValueError("cannot bootstrap an empty set of items; evaluate on at least one item")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unique), size=(num_resamples, len(unique)))
    counts = np.zeros((num_resamples, len(unique)), dtype=np.int64)
    np.add.at(counts, (np.arange(num_resamples)[:, None], draws), 1)
    return ClusterCounts(unique, counts)


def replicate_means(values: np.ndarray, clusters: Sequence[str], counts: ClusterCounts) -> np.ndarray:
    """The item mean in every replicate (NaN where a replicate drew none of the items' clusters)."""
    values = np.asarray(values, dtype=np.float64)
    weights = counts.counts[:, counts.columns(clusters)]  # (B, items): each item counts as often as its cluster
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights @ values / np.maximum(total, 1), np.nan)


def interval(value: float, replicates: np.ndarray, n: int) -> Estimate:
    """The percentile interval of ``replicates`` around the observed ``value`` (NaN replicates dropped)."""
    finite = replicates[np.isfinite(replicates)]
    if not finite.size or not np.isfinite(value):
        return Estimate(float(value), float("nan"), float("nan"), n)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high), n)


def estimate(values: np.ndarray, clusters: Sequence[str], counts: ClusterCounts) -> Estimate:
    """Mean of ``values`` with its cluster-bootstrap 95% interval (NaN for no items)."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    return interval(float(values.mean()), replicate_means(values, clusters, counts), int(values.size))


def estimates(items: dict[str, ItemValues], *, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> dict[str, Estimate]:
    """Every metric's mean with its interval, all from one shared set of cluster resamples."""
    ids = [c for item in items.values() for c in item.clusters]
    if not ids:
        return {key: Estimate(float("nan"), float("nan"), float("nan"), 0) for key in items}
    counts = cluster_counts(ids, num_resamples=num_resamples, seed=seed)
    return {key: estimate(np.asarray(item.values), item.clusters, counts) for key, item in items.items()}
