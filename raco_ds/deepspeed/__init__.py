"""RACO for DeepSpeed engines: :class:`RacoHook` (hook.py), the validated engine layout
(layout.py), one gradient-shard strategy per DeepSpeed optimizer family (shards.py) and
one-pass capture on an engine (onepass.py, used through ``RacoHook.onepass()``).

The only package that knows DeepSpeed's internals."""

from raco_ds.deepspeed.hook import NonFiniteGradientError, RacoHook, RacoStepStats
from raco_ds.deepspeed.layout import EngineLayout, UnsupportedEngineError
from raco_ds.deepspeed.onepass import DeepSpeedOnePass
from raco_ds.deepspeed.shards import ParamSlice, ShardLayout, onepass_unsupported_reason

__all__ = [
    "DeepSpeedOnePass",
    "EngineLayout",
    "NonFiniteGradientError",
    "ParamSlice",
    "RacoHook",
    "RacoStepStats",
    "ShardLayout",
    "UnsupportedEngineError",
    "onepass_unsupported_reason",
]
