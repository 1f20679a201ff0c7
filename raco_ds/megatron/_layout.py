"""Where each rank's owned gradient shard lives in megatron-core, and which of it counts.

All knowledge of megatron-core's optimizer internals is here:

- *owned*: the part of each parameter's ``main_grad`` (a view into the
  DistributedDataParallel gradient buffer) that this rank's optimizer reads at
  ``step()``. Under the DistributedOptimizer that is the parameter's slice of
  this data-parallel rank's range of each bucket (``_get_model_param_range_map``,
  the same map the optimizer's own ``_copy_model_grads_to_main_grads`` uses);
  under the non-distributed optimizers it is the whole ``main_grad``.
- *counted*: whether Megatron's own gradient norm counts the parameter: not a
  ``shared`` duplicate (the last pipeline stage's copy of tied embeddings), not a
  tensor-parallel duplicate (replicated parameters count on TP rank 0 only), and
  in 0.19 not a GTP-remat duplicate. Every owned element is written back; only
  counted elements enter the Gram, so sum over the grad-stats group of the
  local Grams is the Gram of the full gradients, exactly as
  ``get_grad_norm_fp32`` sums squared norms over that group.
- *group*: the optimizer's ``get_grad_stats_parallel_group()``. With the
  distributed optimizer dense and expert optimizers share it; with the
  non-distributed ones the expert optimizer has its own (expert TP x PP) group,
  and the parameters split into one section per group.

Version notes (read from megatron-core 0.16.1 and 0.19.2 sources):
``param_is_not_tensor_parallel_duplicate`` gained ``expert_tp_group`` and
``param_is_not_gtp_duplicate`` appeared in 0.19; both are used when present.
0.19's separate grad-norm groups (MTP parameters) leave Megatron's *main* norm
but are part of the gradient, so they are counted here (the Gram is of the whole
gradient; with MTP the Gram diagonal is the sum of Megatron's squared main and
group norms).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["MegatronShardLayout", "Segment", "StatsSection", "UnsupportedMegatronSetupError"]


class UnsupportedMegatronSetupError(ValueError):
    """The model or optimizer is not a megatron-core setup this adapter supports."""


@dataclass(frozen=True, eq=False)  # eq on a Parameter field would compare tensors
class Segment:
    """One parameter's owned slice of its ``main_grad`` (flattened coordinates)."""

    param: torch.nn.Parameter
    start: int
    end: int

    @property
    def numel(self) -> int:
        """Number of owned elements."""
        return self.end - self.start

    def view(self) -> torch.Tensor:
        """The owned slice of ``param.main_grad`` as a writable 1-D view."""
        return self.param.main_grad.view(-1)[self.start : self.end]


@dataclass(eq=False)
class StatsSection:
    """The owned segments reduced over one grad-stats group.

    ``segments`` lists the counted segments first, so that the first
    ``counted_numel`` elements of this section's shard are exactly what
    Megatron's gradient norm sums over.
    """

    group: dist.ProcessGroup | None
    """The optimizer's grad-stats group (None: the default world group)."""
    segments: list[Segment] = field(default_factory=list)
    counted_numel: int = 0

    @property
    def numel(self) -> int:
        """Owned elements in this section (counted and not)."""
        return sum(s.numel for s in self.segments)


@dataclass
class MegatronShardLayout:
    """Every owned gradient slice of this rank, split by grad-stats group."""

    sections: list[StatsSection]
    dtype: torch.dtype
    device: torch.device
    distributed_optimizer: bool

    @classmethod
    def from_optimizer(cls, optimizer) -> MegatronShardLayout:
        """Read the layout from a megatron-core optimizer (Chained, Distributed, Float16, FP32)."""
        sections: dict[int, tuple[dist.ProcessGroup | None, list[Segment], list[Segment]]] = {}
        subs = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        any_distributed = False
        for sub in subs:
            if getattr(sub, "is_stub_optimizer", False):
                continue
            segments, distributed = _owned_segments(sub)
            any_distributed |= distributed
            group = sub.get_grad_stats_parallel_group()
            key = _group_key(group, sections)
            if key not in sections:
                sections[key] = (group, [], [])
            _, counted, uncounted = sections[key]
            for segment in segments:
                (counted if _counted_in_grad_norm(segment.param, sub) else uncounted).append(segment)
        result = []
        dtypes, devices = set(), set()
        for group, counted, uncounted in sections.values():
            for s in counted + uncounted:
                dtypes.add(s.param.main_grad.dtype)
                devices.add(s.param.main_grad.device)
            result.append(StatsSection(group, counted + uncounted, sum(s.numel for s in counted)))
        if not result:
            raise UnsupportedMegatronSetupError(
                "the optimizer owns no parameters on this rank; build it with "
                "megatron.core.optimizer.get_megatron_optimizer over the DDP-wrapped model chunks"
            )
        if len(dtypes) > 1:
            # The shards are stacked into one (K, n) tensor per section; mixed grad dtypes
            # would need one per dtype. Megatron's fp32 grad accumulation gives one dtype.
            raise UnsupportedMegatronSetupError(
                f"gradient buffers hold several dtypes {sorted(map(str, dtypes))}; set "
                "DistributedDataParallelConfig(grad_reduce_in_fp32=True) so every main_grad is fp32"
            )
        return cls(result, dtypes.pop(), devices.pop(), any_distributed)


def _group_key(group, sections: dict) -> int:
    # ChainedOptimizer compares grad-stats groups with ==; do the same.
    for key, (existing, _, _) in sections.items():
        if existing == group:
            return key
    return len(sections)


def _owned_segments(sub) -> tuple[list[Segment], bool]:
    """The owned slices of one (non-chained) megatron optimizer, and whether it is distributed."""
    if hasattr(sub, "_get_model_param_range_map") and hasattr(sub, "model_fp32_groups"):
        if getattr(getattr(sub, "ddp_config", None), "use_megatron_fsdp", False):
            raise UnsupportedMegatronSetupError(
                "Megatron-FSDP is not supported by RacoMegatron; use DistributedDataParallel "
                "with use_distributed_optimizer=True"
            )
        segments = []
        for groups in (sub.model_float16_groups, sub.model_fp32_groups):
            for group in groups:
                for param in group:
                    rng = sub._get_model_param_range_map(param)["param"]
                    segments.append(Segment(param, rng.start, rng.end))
        return segments, True
    if hasattr(sub, "float16_groups"):  # Float16OptimizerWithFloat16Params
        params = [p for groups in (sub.float16_groups, sub.fp32_from_fp32_groups) for g in groups for p in g]
    else:  # FP32Optimizer: the inner optimizer holds the model parameters themselves
        params = [p for g in sub.optimizer.param_groups for p in g["params"]]
    segments = []
    for param in params:
        if not hasattr(param, "main_grad"):
            raise UnsupportedMegatronSetupError(
                "a parameter has no main_grad: wrap every model chunk in "
                "megatron.core.distributed.DistributedDataParallel before building the optimizer"
            )
        segments.append(Segment(param, 0, param.numel()))
    return segments, False


def _counted_in_grad_norm(param: torch.nn.Parameter, sub) -> bool:
    """Megatron's own grad-norm filter (``get_main_grads_for_grad_norm`` in 0.16,
    ``_filter_grads_for_norm`` in 0.19), applied to the model parameter: the
    optimizer's shard parameters carry copies of exactly these attributes."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import param_is_not_shared

    if not param_is_not_shared(param):
        return False
    is_not_tp_duplicate = tensor_parallel.param_is_not_tensor_parallel_duplicate
    kwargs = {"tp_group": getattr(sub, "tp_group", None)}
    if "expert_tp_group" in inspect.signature(is_not_tp_duplicate).parameters:  # 0.19+
        kwargs["expert_tp_group"] = getattr(sub, "expert_tp_group", None)
    if not is_not_tp_duplicate(param, **kwargs):
        return False
    is_not_gtp_duplicate = getattr(tensor_parallel, "param_is_not_gtp_duplicate", None)  # 0.19+
    return is_not_gtp_duplicate is None or bool(is_not_gtp_duplicate(param))
