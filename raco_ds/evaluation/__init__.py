"""Evaluation that shows whether the weights steer: per-pair preference metrics split by
(dis)agreement, generation with judges, and cluster-bootstrap confidence intervals.

The math modules (``bootstrap``, ``preference``) need only numpy/torch; ``generation`` and
``judges`` load transformers models when called.
"""

from raco_ds.evaluation.bootstrap import (
    CONFIDENCE,
    ClusterCounts,
    Estimate,
    ItemValues,
    cluster_counts,
    estimate,
    estimates,
    interval,
)
from raco_ds.evaluation.preference import SUBSETS, preference_items

__all__ = [
    "CONFIDENCE",
    "SUBSETS",
    "ClusterCounts",
    "Estimate",
    "ItemValues",
    "cluster_counts",
    "estimate",
    "estimates",
    "interval",
    "preference_items",
]
