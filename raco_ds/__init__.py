"""raco_ds: RACO multi-objective preference alignment for DeepSpeed and Megatron-core.

The math (``solver``, ``gram``, ``losses``) imports only torch; the framework
adapters (``RacoHook`` for DeepSpeed, ``RacoMegatron``) are imported on first
use so that solver users do not pay for DeepSpeed's import.

>>> import torch, raco_ds
>>> raco_ds.raco_coefficients(torch.eye(2, dtype=torch.float64), torch.tensor([0.5, 0.5]), c=0.0).tolist()
[0.5, 0.5]
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "solve_dual": "raco_ds.solver",
    "raco_coefficients": "raco_ds.solver",
    "aggregate": "raco_ds.solver",
    "Aggregation": "raco_ds.solver",
    "AGGREGATORS": "raco_ds.solver",
    "register_aggregator": "raco_ds.solver",
    "get_aggregator": "raco_ds.solver",
    "dual_gap": "raco_ds.solver",
    "SolverError": "raco_ds.solver",
    "validate_weights": "raco_ds.solver",
    "local_gram": "raco_ds.gram",
    "solve_across_ranks": "raco_ds.consensus",
    "StepSolution": "raco_ds.consensus",
    "preference_losses": "raco_ds.losses",
    "PreferenceLosses": "raco_ds.losses",
    "LOSSES": "raco_ds.losses",
    "register_loss": "raco_ds.losses",
    "get_loss": "raco_ds.losses",
    "pair_margins": "raco_ds.losses",
    "losses_from_margins": "raco_ds.losses",
    "margin_jacobian": "raco_ds.losses",
    "RacoHook": "raco_ds.deepspeed",
    "RacoStepStats": "raco_ds.deepspeed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raco_ds' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
