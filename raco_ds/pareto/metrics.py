"""Quality measures of a Pareto front: non-dominated points, hypervolume, rank correlation.

Every objective is *maximised* (preference accuracy, implicit-reward margin, a negated length).

Hypervolume
    The measure (area for K = 2) of the region dominated by the points and bounded below by a
    reference point r: the union over points p of the boxes [r_1, p_1] x ... x [r_K, p_K].
    Points that do not strictly exceed r in every coordinate add nothing. Exact for any K
    (slicing recursion, O(n^K log n): meant for the handful of points of a sweep).

    The sweeps (raco_ds.pareto.statistics) use one reference point for all aggregators of a
    sweep: the per-objective minimum of their per-weight means (the sweep's nadir), unless given.

Spearman
    Rank correlation, the steering statistic's core: does objective k's metric rise with w_k?

>>> hypervolume([(1.0, 2.0), (2.0, 1.0)], (0.0, 0.0))
3.0
>>> spearman([0, 0.5, 1], [0.1, 0.4, 0.3])
0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["hypervolume", "non_dominated", "spearman"]


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
