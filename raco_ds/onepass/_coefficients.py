"""Row-coefficient matrices for one-pass capture, and their grouping.

One backward of a scalar ``seed`` gives every row's activation gradient. The
K per-objective gradients follow by splitting each parameter's reduction over
rows with a (K, R) matrix C: G_k = sum_r C[k, r] * (row r's share of
d seed / d theta). This module builds C for the two data shapes and groups
rows whose coefficient columns are parallel, so that a Linear weight costs one
matmul per group instead of one per row (per-objective rows: K groups, i.e.
the cost of one dense gradient; shared pairs: one group per pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "RowCoefficients",
    "coefficients_from_losses",
    "objective_row_coefficients",
    "shared_pair_coefficients",
]


class CoefficientShape:
    """K and R of anything holding a (K, R) coefficient ``matrix``."""

    matrix: torch.Tensor

    @property
    def num_objectives(self) -> int:
        """K."""
        return self.matrix.shape[0]

    @property
    def num_rows(self) -> int:
        """R."""
        return self.matrix.shape[1]


@dataclass(frozen=True)
class RowCoefficients(CoefficientShape):
    """A (K, R) row-coefficient matrix and its grouping into parallel columns.

    Column r of ``matrix`` equals ``row_scale[r] * directions[:, row_group[r]]``;
    rows with an all-zero column have ``row_group == -1`` and are skipped.
    Build with :meth:`from_matrix`.
    """

    matrix: torch.Tensor
    """(K, R) float64: objective k's coefficient of row r."""
    row_group: torch.Tensor
    """(R,) long: the group of each row, -1 for a row no objective uses."""
    row_scale: torch.Tensor
    """(R,) float64: the row's column divided by its group direction."""
    directions: torch.Tensor
    """(K, J) float64: one coefficient direction per group."""
    group_rows: tuple[torch.Tensor, ...]
    """J index tensors: the rows of each group."""

    @property
    def num_groups(self) -> int:
        """J, the number of distinct (up to scale) nonzero columns."""
        return self.directions.shape[1]

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> RowCoefficients:
        """Group the columns of a (K, R) matrix that are exact multiples of each other.

        Each nonzero column is divided by its largest-magnitude entry (signed),
        and columns with bit-identical results share a group. Missed merges cost
        speed only, never exactness.

        >>> import torch
        >>> rc = RowCoefficients.from_matrix(torch.tensor([[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]]))
        >>> rc.num_groups, rc.row_group.tolist(), rc.row_scale.tolist()
        (1, [0, -1, 0], [0.5, 0.0, -1.0])
        """
        if matrix.dim() != 2:
            raise ValueError(f"row coefficients must be a (K, R) matrix, got shape {tuple(matrix.shape)}")
        c = matrix.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(c).all():
            raise ValueError("row coefficients contain inf/NaN; check the losses of this batch before the backward")
        r = c.shape[1]
        pivot = c.abs().argmax(dim=0)
        scale = c.gather(0, pivot.unsqueeze(0)).squeeze(0)  # signed largest entry of each column
        nonzero = scale != 0
        row_group = torch.full((r,), -1, dtype=torch.long)
        keys: dict[bytes, int] = {}
        dirs: list[torch.Tensor] = []
        members: list[list[int]] = []
        for row in torch.nonzero(nonzero).flatten().tolist():
            direction = c[:, row] / scale[row] + 0.0  # + 0.0 turns -0.0 into 0.0 so the bytes compare equal
            key = direction.numpy().tobytes()
            group = keys.get(key)
            if group is None:
                group = keys[key] = len(dirs)
                dirs.append(direction)
                members.append([])
            row_group[row] = group
            members[group].append(row)
        directions = torch.stack(dirs, dim=1) if dirs else torch.zeros(c.shape[0], 0, dtype=torch.float64)
        return cls(
            matrix=c,
            row_group=row_group,
            row_scale=torch.where(nonzero, scale, torch.zeros_like(scale)),
            directions=directions,
            group_rows=tuple(torch.tensor(m, dtype=torch.long) for m in members),
        )

    def scaled(self, factor: float) -> RowCoefficients:
        """The same grouping with every coefficient multiplied by ``factor`` (e.g. 1/accumulation steps)."""
        return RowCoefficients(
            matrix=self.matrix * factor,
            row_group=self.row_group,
            row_scale=self.row_scale,
            directions=self.directions * factor,
            group_rows=self.group_rows,
        )


def objective_row_coefficients(objective_of_row: torch.Tensor, num_objectives: int) -> torch.Tensor:
    """0/1 membership (K, R) for per-objective rows; seed = the sum of the K losses.

    Each objective's loss already carries its own normalisation (mean over its
    rows), so the backward of sum_k L_k seeds every row with exactly its share
    of d L_{own objective}/d theta, and C is pure membership. A row with
    objective -1 belongs to none.

    >>> objective_row_coefficients(torch.tensor([0, 1, 1, -1]), 2)
    tensor([[1., 0., 0., 0.],
            [0., 1., 1., 0.]], dtype=torch.float64)
    """
    owner = torch.as_tensor(objective_of_row).detach().cpu().long()
    if owner.dim() != 1:
        raise ValueError(f"objective_of_row must be (R,), got shape {tuple(owner.shape)}")
    if owner.numel() and (owner.max() >= num_objectives or owner.min() < -1):
        raise ValueError(f"objective_of_row must lie in [-1, {num_objectives - 1}], got {owner.tolist()}")
    k = torch.arange(num_objectives).unsqueeze(1)
    return (owner.unsqueeze(0) == k).to(torch.float64)


def shared_pair_coefficients(margin_jacobian: torch.Tensor) -> torch.Tensor:
    """(K, 2B) row coefficients for shared pairs; seed = the sum of the pair margins m (B,).

    Rows [0, B) are the A responses and rows [B, 2B) the B responses (the
    PreferenceBatch layout). Both rows of a pair take their pair's coefficient
    dL_k/dm_r: the minus sign of the B response is already inside the margin.
    ``margin_jacobian`` is (K, B), e.g. from ``raco_ds.losses.margin_jacobian``.

    >>> shared_pair_coefficients(torch.tensor([[0.1, -0.2]]))
    tensor([[ 0.1000, -0.2000,  0.1000, -0.2000]], dtype=torch.float64)
    """
    jac = margin_jacobian.detach().cpu().to(torch.float64)
    if jac.dim() != 2:
        raise ValueError(f"margin_jacobian must be (K, B), got shape {tuple(jac.shape)}")
    return torch.cat([jac, jac], dim=1)


def coefficients_from_losses(row_scores: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """(K, R) = d losses_k / d row_scores_r by autograd on the small graph scores -> losses.

    The general recipe for any loss built from per-row scores (e.g. summed
    response log-probs); seed = ``row_scores.sum()``. Only the graph between
    ``row_scores`` and ``losses`` is traversed, never the model.
    """
    if row_scores.dim() != 1 or losses.dim() != 1:
        raise ValueError(
            f"row_scores must be (R,) and losses (K,), got {tuple(row_scores.shape)} and {tuple(losses.shape)}"
        )
    rows = []
    for k in range(losses.shape[0]):
        if not losses[k].requires_grad:
            rows.append(torch.zeros_like(row_scores, dtype=torch.float64))
            continue
        (grad,) = torch.autograd.grad(losses[k], row_scores, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(row_scores) if grad is None else grad)
    return torch.stack([r.detach().to(torch.float64).cpu() for r in rows])
