"""What one RACO optimizer step saw and did, shared by every framework adapter.

The DeepSpeed hook and the Megatron adapter report the same numbers under the
same TensorBoard tags, so both return a :class:`RacoStepStats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from raco_ds.consensus import StepSolution

__all__ = ["NonFiniteGradientError", "RacoStepStats"]


@dataclass
class RacoStepStats:
    """What one RACO optimizer step saw and did (identical on every rank, timings aside)."""

    gram: torch.Tensor
    """(K, K) float64 Gram of the full per-objective gradients (all-reduced)."""
    coefficients: torch.Tensor | None
    """(K,) float64 a: the update direction is sum_k a_k g_k; None when the step was skipped."""
    dual: torch.Tensor | None
    """(K,) the dual p on the simplex (raco / cagrad), else None."""
    dual_clipped: torch.Tensor | None
    """(K,) p~ = min(p, w) (raco), p (cagrad), else None."""
    clip_active: bool
    """True when the RACO clip changed p somewhere."""
    grad_norms: torch.Tensor
    """(K,) float64 norms of the per-objective gradients."""
    cosines: torch.Tensor
    """(K, K) float64 pairwise cosine similarities."""
    skipped: bool
    """True when the step was not applied (non-finite gradient)."""
    nonfinite_objectives: list[int] = field(default_factory=list)
    """Objectives whose gradient held a NaN or inf on some rank."""
    seconds_capture: float = 0.0
    """Copying shards out of, and clearing, the engine's buffers (summed over the step's objectives)."""
    seconds_gram: float = 0.0
    """The local float64 Gram."""
    seconds_allreduce: float = 0.0
    """The K x K all-reduce."""
    seconds_solve: float = 0.0
    """The aggregator's solve plus the cross-rank agreement check."""
    seconds_write: float = 0.0
    """Forming sum_k a_k S[k] and writing it into the engine."""

    @classmethod
    def from_solution(cls, solution: StepSolution, **fields: Any) -> RacoStepStats:
        """The stats of ``solution`` (the cross-rank solve), plus the adapter's own ``fields`` (timings, ...)."""
        aggregation = solution.aggregation
        return cls(
            gram=solution.gram,
            coefficients=None if aggregation is None else aggregation.coefficients,
            dual=None if aggregation is None else aggregation.dual,
            dual_clipped=None if aggregation is None else aggregation.dual_clipped,
            clip_active=False if aggregation is None else bool(aggregation.clip_active),
            grad_norms=solution.grad_norms,
            cosines=solution.cosines,
            skipped=solution.skipped,
            nonfinite_objectives=list(solution.nonfinite_objectives),
            seconds_allreduce=solution.seconds_allreduce,
            seconds_solve=solution.seconds_solve,
            **fields,
        )

    @property
    def seconds_hook(self) -> float:
        """Everything the hook adds to a plain engine step."""
        return (
            self.seconds_capture + self.seconds_gram + self.seconds_allreduce + self.seconds_solve + self.seconds_write
        )

    def scalars(self) -> dict[str, float]:
        """Flat ``{tag: value}`` for TensorBoard: raco/coef/k, raco/gram/i_j, raco/cos/i_j, time/hook_* ..."""
        out: dict[str, float] = {"raco/skipped": float(self.skipped), "raco/clip_active": float(self.clip_active)}
        k = self.gram.shape[0]
        for name, vector in (("coef", self.coefficients), ("dual", self.dual), ("dual_clipped", self.dual_clipped)):
            if vector is not None:
                out.update({f"raco/{name}/{i}": float(vector[i]) for i in range(k)})
        out.update({f"raco/grad_norm/{i}": float(self.grad_norms[i]) for i in range(k)})
        for i in range(k):
            for j in range(i, k):
                out[f"raco/gram/{i}_{j}"] = float(self.gram[i, j])
                if j > i:
                    out[f"raco/cos/{i}_{j}"] = float(self.cosines[i, j])
        for i in self.nonfinite_objectives:
            out[f"raco/nonfinite/{i}"] = 1.0
        for part in ("capture", "gram", "allreduce", "solve", "write"):
            out[f"time/hook_{part}"] = getattr(self, f"seconds_{part}")
        out["time/hook_total"] = self.seconds_hook
        return out


class NonFiniteGradientError(FloatingPointError):
    """Some objective's gradient holds a NaN or inf (``on_nonfinite="raise"``); ``.stats`` has the details."""

    def __init__(self, stats: RacoStepStats) -> None:
        super().__init__(
            f"non-finite gradient in objective(s) {stats.nonfinite_objectives}; the step was not applied and the "
            f"engine's gradients were cleared. Pass on_nonfinite='skip' to skip such steps instead."
        )
        self.stats = stats
