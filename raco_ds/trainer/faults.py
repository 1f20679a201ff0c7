"""Fault injection (``--debug.inject_nonfinite``): a NaN loss whose gradient is NaN for its objective only.

A real non-finite loss (overflowing logits, a log of 0) has a non-finite
gradient too, so the injected one must as well. Multiplying a loss by NaN does
not do it: autograd then sends 0 * NaN = NaN into every other objective's
gradient through the graph they share, which no real fault does.
"""

from __future__ import annotations

import torch

__all__ = ["with_nan_loss"]


class _NanLoss(torch.autograd.Function):
    """Entry ``k`` of a loss vector becomes NaN; its gradient is NaN wherever its upstream gradient is nonzero."""

    @staticmethod
    def forward(ctx, losses: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.k = k
        out = losses.clone()
        out[k] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.clone()
        # Objective k's own backward (upstream 1) gets NaN; another objective's (upstream 0) stays clean.
        if bool(grad[ctx.k] != 0):
            grad[ctx.k] = float("nan")
        return grad, None


def with_nan_loss(losses: torch.Tensor, k: int) -> torch.Tensor:
    """``losses`` (K,) with objective ``k``'s loss NaN and NaN in its gradient only.

    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> y = with_nan_loss(x * 3, 1)
    >>> torch.autograd.grad(y[0], x)[0].tolist(), y[1].isnan().item()
    ([3.0, 0.0], True)
    """
    return _NanLoss.apply(losses, k)
