"""What every backend's RACO step takes, validated once: weights, aggregator, conflict radius, non-finite policy.

``RacoHook`` (DeepSpeed) and ``RacoMegatron`` differ in where the shards live
(capture, local Gram, write-back, the optimizer step); the options they take are
the same and are checked here, with one set of messages, at construction.

>>> StepOptions.validated([0.25, 0.75], "raco", 0.4).num_objectives
2
>>> StepOptions.validated([0.5, 0.5], "raco", 1.0)
Traceback (most recent call last):
...
ValueError: c (the conflict radius) must be in [0, 1), got 1.0; the paper's default is 0.4 (0 = the weighted sum)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raco_ds.solver import AGGREGATORS, validate_weights

__all__ = ["ON_NONFINITE", "StepOptions"]

ON_NONFINITE = ("skip", "raise")
"""What a step does when some objective's gradient is NaN/inf on any rank: skip it everywhere, or raise."""


@dataclass(frozen=True)
class StepOptions:
    """The validated options of a RACO step, shared by every backend."""

    weights: torch.Tensor
    """User weights w (float64, on the simplex), one per objective."""
    aggregator: str
    """A name registered in ``raco_ds.solver.AGGREGATORS``."""
    c: float
    """Conflict radius in [0, 1)."""
    on_nonfinite: str
    """One of :data:`ON_NONFINITE`."""

    @property
    def num_objectives(self) -> int:
        """K."""
        return int(self.weights.numel())

    @classmethod
    def validated(cls, weights: Sequence[float] | torch.Tensor, aggregator: str = "raco", c: float = 0.4,
                  on_nonfinite: str = "skip") -> StepOptions:
        """Check every option; a ``ValueError`` says what was found and how to fix it."""
        checked = validate_weights(weights)
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; registered: {sorted(AGGREGATORS)} "
                             "(add one with raco_ds.solver.register_aggregator)")
        if not 0.0 <= float(c) < 1.0:
            raise ValueError(f"c (the conflict radius) must be in [0, 1), got {c}; "
                             "the paper's default is 0.4 (0 = the weighted sum)")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        return cls(checked, aggregator, float(c), on_nonfinite)
