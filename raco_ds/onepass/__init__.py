"""One-pass capture: all K per-objective gradients from one forward and one backward.

See docs/onepass.md. Public names:

- :class:`OnePassCapture` -- hooks a model, forms (K, numel) gradients per parameter;
- :class:`RowCoefficients`, :func:`objective_row_coefficients`,
  :func:`shared_pair_coefficients`, :func:`coefficients_from_losses` -- the
  (K, R) row-coefficient matrix for the two data shapes;
- :func:`register_rule` -- add a module type;
- :class:`ParameterView` -- how a framework that partitions parameters shows their full shape
  (:data:`PLAIN`: ordinary parameters);
- :meth:`OnePassCapture.self_check` / :class:`SelfCheck` -- verify one capture pass against autograd
  on a real batch (what static checks cannot see); :class:`OnePassMismatchError` when they differ;
- :class:`GradientSink` / :class:`ShardScatter` -- streaming: each parameter's K gradients reduced into the
  rank's shard during the backward, as soon as complete (:class:`PaddedPartitionScatter`,
  :class:`FlatPartitionScatter`), for a shard described by :class:`FlatPartition` records;
- errors :class:`UnsupportedModuleError`, :class:`FusedKernelError`, :class:`CollectiveOrderError`.

This package knows no training framework. Under DeepSpeed, one pass is a method
of the RACO hook (``RacoHook.onepass``, ``raco_ds.deepspeed.onepass``), which
builds the scatter from the hook's shard layout.
"""

from ._capture import FusedKernelError, GradientSink, OnePassCapture, OnePassMismatchError, SelfCheck
from ._coefficients import (
    RowCoefficients,
    coefficients_from_losses,
    objective_row_coefficients,
    shared_pair_coefficients,
)
from ._params import PLAIN, ParameterView
from ._rules import UnsupportedModuleError, register_rule
from ._scatter import (
    BUCKET_NUMEL,
    MAX_IN_FLIGHT,
    CollectiveOrderError,
    FlatPartition,
    FlatPartitionScatter,
    PaddedPartitionScatter,
    ShardRowsLike,
    ShardScatter,
    as_shard_rows,
)

__all__ = [
    "BUCKET_NUMEL",
    "MAX_IN_FLIGHT",
    "CollectiveOrderError",
    "FlatPartition",
    "FlatPartitionScatter",
    "FusedKernelError",
    "GradientSink",
    "OnePassCapture",
    "OnePassMismatchError",
    "PLAIN",
    "PaddedPartitionScatter",
    "ParameterView",
    "RowCoefficients",
    "SelfCheck",
    "ShardRowsLike",
    "ShardScatter",
    "UnsupportedModuleError",
    "as_shard_rows",
    "coefficients_from_losses",
    "objective_row_coefficients",
    "register_rule",
    "shared_pair_coefficients",
]
