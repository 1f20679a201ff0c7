"""RACO for DeepSpeed engines: :class:`RacoHook` (hook.py), the validated engine layout
(layout.py) and one gradient-shard strategy per DeepSpeed optimizer family (shards.py)."""

from raco_ds.deepspeed.hook import NonFiniteGradientError, RacoHook, RacoStepStats
from raco_ds.deepspeed.layout import EngineLayout, UnsupportedEngineError
from raco_ds.deepspeed.shards import ParamSlice, ShardLayout

__all__ = [
    "EngineLayout",
    "NonFiniteGradientError",
    "ParamSlice",
    "RacoHook",
    "RacoStepStats",
    "ShardLayout",
    "UnsupportedEngineError",
]
