"""Weight grids on the simplex: the user-weight vectors a Pareto sweep trains one model for.

For K = 2 the default grid is w_1 in {0, 0.25, 0.5, 0.75, 1} (w_2 = 1 - w_1); for K >= 3 it is
the regular simplex grid: every w with w_k a multiple of ``step`` and sum_k w_k = 1
((n + K - 1) choose (K - 1) points for n = 1 / step; 15 points for K = 3, step 0.25).

Weights are built from integer counts divided by n, so they sum to 1 up to one rounding and the
same grid is reproduced exactly on every call (point names and restart markers depend on it).

>>> simplex_grid(2, 0.25)
[(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1.0, 0.0)]
>>> len(simplex_grid(3, 0.25))
15
>>> format_weights((0.25, 0.75))
'0.25,0.75'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DEFAULT_STEP", "Weights", "format_weights", "parse_weights", "simplex_grid", "validate_weights"]

Weights = tuple[float, ...]
"""One user-weight vector on the simplex (K entries >= 0 summing to 1)."""

DEFAULT_STEP = 0.25
"""Grid spacing of the default sweep (5 points for K = 2, 15 for K = 3)."""

_SUM_TOL = 1e-6  # the solver's own tolerance on sum(w) = 1


def simplex_grid(num_objectives: int, step: float = DEFAULT_STEP) -> list[Weights]:
    """Every weight vector with entries in {0, step, 2 step, ..., 1} summing to 1.

    Ordered by w_1 ascending, then w_2, ... (for K = 2: from "all on objective 2" to "all on
    objective 1"). ``1 / step`` must be a whole number (0.25, 0.1, 1/3 ...).

    >>> simplex_grid(3, 0.5)
    [(0.0, 0.0, 1.0), (0.0, 0.5, 0.5), (0.0, 1.0, 0.0), (0.5, 0.0, 0.5), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)]
    """
    if num_objectives < 1:
        raise ValueError(f"num_objectives must be >= 1, got {num_objectives}; a sweep needs at least one objective")
    if not (isinstance(step, (int, float)) and math.isfinite(step) and 0 < step <= 1):
        raise ValueError(f"grid step must be in (0, 1], got {step!r}; e.g. 0.25 gives w_1 in {{0, 0.25, ..., 1}}")
    n = round(1.0 / step)
    if abs(n * step - 1.0) > 1e-9:
        raise ValueError(
            f"grid step {step!r} does not divide 1 (1 / step = {1.0 / step:.6g}); "
            "pick a step with a whole number of intervals, e.g. 0.25, 0.2 or 0.1"
        )
    return [tuple(c / n for c in counts) for counts in _compositions(n, num_objectives)]


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """All tuples of ``parts`` non-negative integers summing to ``total``, lexicographic."""
    if parts == 1:
        return [(total,)]
    return [(first, *rest) for first in range(total + 1) for rest in _compositions(total - first, parts - 1)]


def validate_weights(weights: Sequence[float], num_objectives: int | None = None, where: str = "weights") -> Weights:
    """Check one weight vector (finite, >= 0, sums to 1, K entries) and return it as a tuple.

    Raises ValueError naming ``where`` and the fix.

    >>> validate_weights([0.3, 0.7])
    (0.3, 0.7)
    """
    w = tuple(float(x) for x in weights)
    if num_objectives is not None and len(w) != num_objectives:
        raise ValueError(f"{where}={list(w)} has {len(w)} entries for {num_objectives} objectives; pass one per objective")
    if not w or any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"{where}={list(w)} must be finite and >= 0; user weights lie on the simplex")
    if abs(sum(w) - 1.0) > _SUM_TOL:
        raise ValueError(f"{where}={list(w)} sums to {sum(w):.6g}, not 1; divide each weight by the sum")
    return w


def format_weights(weights: Sequence[float]) -> str:
    """A short, stable text form (``"0.25,0.75"``): CLI value, plot label and point-folder name part.

    >>> format_weights((1 / 3, 2 / 3))
    '0.3333,0.6667'
    """
    return ",".join(f"{x:.4g}" for x in weights)


def parse_weights(text: str, num_objectives: int | None = None) -> list[Weights]:
    """Parse ``"0,1;0.5,0.5;1,0"`` (vectors separated by ';', entries by ',') into validated weights.

    >>> parse_weights("0,1;0.5,0.5")
    [(0.0, 1.0), (0.5, 0.5)]
    """
    out = []
    for i, chunk in enumerate(c for c in text.split(";") if c.strip()):
        try:
            values = [float(x) for x in chunk.split(",")]
        except ValueError:
            raise ValueError(f"weights entry {i} {chunk!r} is not a comma-separated list of numbers, e.g. 0.25,0.75") from None
        out.append(validate_weights(values, num_objectives, where=f"weights[{i}]"))
    if not out:
        raise ValueError(f"no weight vectors in {text!r}; pass e.g. '0,1;0.5,0.5;1,0'")
    return out
