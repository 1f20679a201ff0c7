"""PLACEHOLDER: being written (issue 2). Public surface only; see the contract in the helper prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Aggregation:
    """An aggregator's answer for one Gram."""

    coefficients: torch.Tensor
    dual: torch.Tensor | None = None
    dual_clipped: torch.Tensor | None = None

    @property
    def clip_active(self) -> bool:
        if self.dual is None or self.dual_clipped is None:
            return False
        return bool((self.dual_clipped < self.dual).any())


Aggregator = Callable[[torch.Tensor, torch.Tensor, float], Aggregation]
AGGREGATORS: dict[str, Aggregator] = {"linear": lambda gram, weights, c: Aggregation(weights.to(torch.float64).clone())}


def aggregate(name: str, gram: torch.Tensor, weights: torch.Tensor, c: float = 0.4) -> Aggregation:
    return AGGREGATORS[name](gram, weights, c)
