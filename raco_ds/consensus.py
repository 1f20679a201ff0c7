"""From each rank's local Gram to one set of coefficients that every rank agrees on.

This is the whole of RACO's communication beyond the ordinary gradient
reductions: one all-reduce of the K x K Gram (float64), a solve that every rank
performs identically, and a cheap check that they really are identical (a
mismatch is a bug to detect, not to hope away).

Non-finite gradients: a NaN or inf in objective k's shard on any rank makes row
k of the reduced Gram non-finite on every rank, so every rank reaches the same
skip decision without an extra collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from raco_ds.collectives import is_distributed
from raco_ds.solver import Aggregation, aggregate

__all__ = ["StepSolution", "CoefficientMismatchError", "solve_across_ranks"]


class CoefficientMismatchError(RuntimeError):
    """Ranks computed different coefficients from the same all-reduced Gram."""


@dataclass
class StepSolution:
    """What one optimizer step's solve produced, identical on every rank."""

    gram: torch.Tensor
    """(K, K) float64: the all-reduced Gram of the full per-objective gradients."""
    aggregation: Aggregation | None
    """The aggregator's answer; None when the step is skipped for non-finite gradients."""
    nonfinite_objectives: list[int] = field(default_factory=list)
    """Indices of objectives whose gradient holds a NaN or inf (on any rank)."""
    seconds_allreduce: float = 0.0
    seconds_solve: float = 0.0

    @property
    def skipped(self) -> bool:
        """True when some objective's gradient is not finite and the step must not be applied."""
        return bool(self.nonfinite_objectives)

    @property
    def coefficients(self) -> torch.Tensor:
        """(K,) float64 coefficients a of the update direction sum_k a_k g_k."""
        if self.aggregation is None:
            raise RuntimeError(f"step skipped: non-finite gradient in objectives {self.nonfinite_objectives}")
        return self.aggregation.coefficients

    @property
    def grad_norms(self) -> torch.Tensor:
        """(K,) float64 norms of the per-objective gradients."""
        return self.gram.diagonal().clamp_min(0).sqrt()

    @property
    def cosines(self) -> torch.Tensor:
        """(K, K) float64 pairwise cosine similarities (0 where a gradient is zero)."""
        norms = self.grad_norms
        outer = norms[:, None] * norms[None, :]
        return torch.where(outer > 0, self.gram / outer.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def _assert_identical(coefficients: torch.Tensor, group) -> None:
    # One all-reduce(MAX) of [a, -a] yields max and -min of every entry across ranks.
    both = torch.cat([coefficients, -coefficients]).to(torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    k = coefficients.numel()
    spread = both[:k] + both[k:]
    if bool((spread != 0).any()):
        raise CoefficientMismatchError(
            f"ranks disagree on the RACO coefficients (max spread {spread.max().item():.3e}); "
            f"local coefficients {coefficients.tolist()}. Every rank must solve the same all-reduced Gram."
        )


def solve_across_ranks(
    local_gram: torch.Tensor,
    weights: torch.Tensor,
    aggregator: str = "raco",
    c: float = 0.4,
    group=None,
    device: torch.device | str = "cpu",
    verify: bool = True,
) -> StepSolution:
    """All-reduce ``local_gram`` over ``group``, solve, and check that every rank agrees.

    ``device`` is where the collective runs (the backend's device: "cpu" for
    gloo, the rank's CUDA device for NCCL). Without an initialised process
    group of more than one rank this is a purely local solve.

    >>> import torch
    >>> s = solve_across_ranks(torch.eye(2, dtype=torch.float64), torch.tensor([0.5, 0.5]), "linear")
    >>> s.coefficients.tolist()
    [0.5, 0.5]
    """
    gram = local_gram.to(device=device, dtype=torch.float64).contiguous()
    started = time.perf_counter()
    if is_distributed(group):
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
    gram = gram.cpu()
    reduced = time.perf_counter()

    # A non-finite entry of g_k always shows on the diagonal H_kk; off-diagonal
    # entries would also flag the objectives it was paired with.
    finite = torch.isfinite(gram.diagonal())
    if not bool(finite.all()):
        bad = [int(i) for i in torch.nonzero(~finite).flatten()]
        return StepSolution(gram, None, bad, seconds_allreduce=reduced - started)

    aggregation = aggregate(aggregator, gram, weights.to(torch.float64).cpu(), c)
    if verify and is_distributed(group):
        _assert_identical(aggregation.coefficients.to(device), group)
    solved = time.perf_counter()
    return StepSolution(gram, aggregation, [], seconds_allreduce=reduced - started, seconds_solve=solved - reduced)
