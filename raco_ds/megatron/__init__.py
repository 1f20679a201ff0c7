"""RACO for megatron-core (DistributedDataParallel + distributed or plain optimizer; TP, PP, DP, experts).

Needs ``megatron-core`` (0.16.x on Python 3.11, 0.19.x on Python 3.12): install
the ``megatron`` extra, ``pip install -e .[megatron]``. See docs/megatron.md.
"""

from raco_ds.megatron._adapter import (
    MegatronStepStats,
    NonFiniteGradientError,
    RacoMegatron,
)
from raco_ds.megatron._layout import (
    MegatronShardLayout,
    Segment,
    StatsSection,
    UnsupportedMegatronSetupError,
)

__all__ = [
    "MegatronShardLayout",
    "MegatronStepStats",
    "NonFiniteGradientError",
    "RacoMegatron",
    "Segment",
    "StatsSection",
    "UnsupportedMegatronSetupError",
]
