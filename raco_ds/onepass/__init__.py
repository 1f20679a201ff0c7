"""One-pass capture: all K per-objective gradients from one forward and one backward.

See docs/onepass.md. Public names:

- :class:`OnePassCapture` -- hooks a model, forms (K, numel) gradients per parameter;
- :class:`RowCoefficients`, :func:`objective_row_coefficients`,
  :func:`shared_pair_coefficients`, :func:`coefficients_from_losses` -- the
  (K, R) row-coefficient matrix for the two data shapes;
- :func:`register_rule` -- add a module type;
- :meth:`OnePassCapture.self_check` / :class:`SelfCheck` -- verify one capture pass against autograd
  on a real batch (what static checks cannot see); :class:`OnePassMismatchError` when they differ;
- :class:`DeepSpeedOnePass` -- the same for a DeepSpeed engine, filling the hook's (K, shard) buffer
  (:func:`onepass_unsupported_reason` says when it cannot run there);
- :class:`GradientSink` / :class:`ShardScatter` -- streaming: each parameter's K gradients reduced into the
  rank's shard during the backward, as soon as complete;
- errors :class:`UnsupportedModuleError`, :class:`FusedKernelError`, :class:`CollectiveOrderError`.
"""

from ._capture import FusedKernelError, GradientSink, OnePassCapture, OnePassMismatchError, SelfCheck
from ._coefficients import (
    RowCoefficients,
    coefficients_from_losses,
    objective_row_coefficients,
    shared_pair_coefficients,
)
from ._deepspeed import DeepSpeedOnePass, onepass_unsupported_reason
from ._rules import UnsupportedModuleError, register_rule
from ._zero import (
    CollectiveOrderError,
    ShardScatter,
    finish_engine_backward,
    make_shard_scatter,
)

__all__ = [
    "CollectiveOrderError",
    "DeepSpeedOnePass",
    "FusedKernelError",
    "GradientSink",
    "OnePassCapture",
    "OnePassMismatchError",
    "RowCoefficients",
    "SelfCheck",
    "ShardScatter",
    "UnsupportedModuleError",
    "coefficients_from_losses",
    "finish_engine_backward",
    "make_shard_scatter",
    "objective_row_coefficients",
    "onepass_unsupported_reason",
    "register_rule",
    "shared_pair_coefficients",
]
