"""Quality measures of a Pareto front: non-dominated points, hypervolume, weight monotonicity.

Every objective is *maximised* (preference accuracy, implicit-reward margin).

Hypervolume
    The measure (area for K = 2) of the region dominated by the points and bounded below by a
    reference point r: the union over points p of the boxes [r_1, p_1] x ... x [r_K, p_K].
    Points that do not strictly exceed r in every coordinate add nothing. Exact for any K
    (slicing recursion, O(n^K log n): meant for the handful of points of a sweep).

    Reference point used by the sweeps (:data:`ACCURACY_REFERENCE`, :data:`CHANCE_REFERENCE`):
    for preference accuracy, r = (0, ..., 0), the metric's lower bound, so every point counts
    and the hypervolume lies in [0, 1]; and r = (0.5, ..., 0.5), chance level, which only
    credits a front for the part of it that beats guessing on every objective. For other
    metrics the caller passes r (e.g. the initial model's values).

Monotonicity
    Does the front follow the user's weights? For each objective k, the Spearman rank
    correlation between w_k and objective k's metric over the sweep's points (1: more weight
    always buys more of that objective); the score is the mean over objectives where it is
    defined (NaN when w_k or the metric is constant).

>>> hypervolume([(1.0, 2.0), (2.0, 1.0)], (0.0, 0.0))
3.0
>>> spearman([0, 0.5, 1], [0.1, 0.4, 0.3])
0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ACCURACY_REFERENCE",
    "CHANCE_REFERENCE",
    "Monotonicity",
    "hypervolume",
    "monotonicity",
    "non_dominated",
    "spearman",
]

ACCURACY_REFERENCE = 0.0
"""Hypervolume reference coordinate for accuracies: their lower bound (every point counts)."""

CHANCE_REFERENCE = 0.5
"""Hypervolume reference coordinate for accuracies at chance level (only above-chance area counts)."""


def _as_points(points: Sequence[Sequence[float]], where: str = "points") -> list[tuple[float, ...]]:
    pts = [tuple(float(x) for x in p) for p in points]
    if pts and len({len(p) for p in pts}) != 1:
        raise ValueError(f"{where} have different lengths {sorted({len(p) for p in pts})}; give every point K values")
    return pts


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates (maximisation).

    q dominates p when q >= p in every coordinate and q > p in one. Points with a NaN
    coordinate are never on the front. Duplicates are all kept.

    >>> non_dominated([(0.5, 0.5), (0.6, 0.4), (0.4, 0.4), (0.5, 0.5)])
    [0, 1, 3]
    """
    pts = _as_points(points)
    finite = [all(math.isfinite(x) for x in p) for p in pts]
    keep = []
    for i, p in enumerate(pts):
        if not finite[i]:
            continue
        dominated = any(
            finite[j] and all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p))
            for j, q in enumerate(pts)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return keep


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by ``points`` above ``reference`` (maximisation), see the module doc.

    >>> hypervolume([(0.5, 0.5)], (0.0, 0.0))
    0.25
    >>> hypervolume([(1.0, 1.0, 1.0), (2.0, 0.5, 0.5)], (0.0, 0.0, 0.0))
    1.25
    """
    ref = tuple(float(x) for x in reference)
    if not ref or not all(math.isfinite(x) for x in ref):
        raise ValueError(f"hypervolume reference point {list(ref)} must be K finite numbers, e.g. (0.0, 0.0) for accuracies")
    pts = _as_points(points)
    if pts and len(pts[0]) != len(ref):
        raise ValueError(f"points have {len(pts[0])} coordinates but the reference point {list(ref)} has {len(ref)}")
    # Only points strictly above r everywhere contribute; NaN comparisons are False, so NaN drops too.
    useful = [p for p in pts if all(a > b for a, b in zip(p, ref))]
    return _slice_volume(useful, ref)


def _slice_volume(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Volume of the union of boxes [ref, p] by slicing along the last coordinate."""
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    ordered = sorted(points, key=lambda p: p[-1], reverse=True)
    total = 0.0
    for i, p in enumerate(ordered):
        below = ordered[i + 1][-1] if i + 1 < len(ordered) else ref[-1]
        height = p[-1] - below
        if height > 0:
            # Between `below` and p[-1] in the last coordinate, exactly points 0..i reach the slice.
            total += height * _slice_volume([q[:-1] for q in ordered[: i + 1]], ref[:-1])
    return total


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (what Spearman's rho uses)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of x and y (Pearson correlation of average ranks).

    NaN when either is constant, has fewer than 2 entries, or contains NaN.

    >>> spearman([1, 2, 3], [30, 20, 10])
    -1.0
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs equally long inputs, got {len(x)} and {len(y)}")
    xs, ys = [float(v) for v in x], [float(v) for v in y]
    if len(xs) < 2 or not all(math.isfinite(v) for v in xs + ys):
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


@dataclass(frozen=True)
class Monotonicity:
    """How well a sweep's metrics follow its weights."""

    per_objective: tuple[float, ...]
    """Spearman(w_k, metric_k) over the points, one per objective (NaN where undefined)."""
    score: float
    """Mean of the defined per-objective correlations (NaN if none is defined)."""


def monotonicity(weights: Sequence[Sequence[float]], metrics: Sequence[Sequence[float]]) -> Monotonicity:
    """Spearman correlation of w_k with objective k's metric over points, per objective and averaged.

    ``weights[i]`` and ``metrics[i]`` are point i's weight vector and per-objective metric.

    >>> monotonicity([(0, 1), (0.5, 0.5), (1, 0)], [(0.1, 0.9), (0.5, 0.6), (0.9, 0.2)]).score
    1.0
    """
    w, m = _as_points(weights, "weights"), _as_points(metrics, "metrics")
    if len(w) != len(m):
        raise ValueError(f"got {len(w)} weight vectors but {len(m)} metric vectors; pass one of each per point")
    if not w:
        return Monotonicity(per_objective=(), score=math.nan)
    if len(w[0]) != len(m[0]):
        raise ValueError(f"weights have {len(w[0])} objectives but metrics have {len(m[0])}")
    per = tuple(spearman([p[k] for p in w], [p[k] for p in m]) for k in range(len(w[0])))
    defined = [r for r in per if math.isfinite(r)]
    return Monotonicity(per_objective=per, score=sum(defined) / len(defined) if defined else math.nan)
