"""Which DeepSpeed configuration the RACO hook runs under, decided once and validated.

:class:`EngineLayout` is to the hook what torchtitan's ``ParallelDims`` is to a
trainer: one object, built from the engine at hook construction, that says which
ZeRO stage, optimizer wrapper, precision and offload setting are in force, and
refuses (with a ``ValueError`` naming the DeepSpeed config field and the fix)
every configuration the hook cannot run exactly. Nothing downstream inspects the
engine's config again: the shard strategy is chosen from this object alone.

Supported (each checked against a full-gradient oracle in tests/test_deepspeed_hook.py):

- ZeRO stage 0 (plain data parallel, fp32), 1, 2 and 3;
- fp32, and bf16 on ZeRO 1-3 (with fp32 or bf16 gradient accumulation; bf16
  accumulation is allowed but warned about);
- ``offload_optimizer.device: cpu`` on ZeRO 1-3;
- any ``gradient_accumulation_steps`` (= micro-batches per objective),
  ``gradient_clipping`` and LR scheduler (they act on the combined gradient).

Refused: fp16 (dynamic loss scaling would rescale each objective's gradient
differently), torch autocast, bf16 on ZeRO 0, NVMe or parameter offload,
pipeline / tensor / sequence / expert parallelism, ZenFlow, DeepCompile, and
``managed_gradient_accumulation: false``.
"""

from __future__ import annotations

import enum
import logging
import warnings
from dataclasses import dataclass

import torch

__all__ = ["EngineLayout", "OptimizerKind", "UnsupportedEngineError"]

logger = logging.getLogger(__name__)


class UnsupportedEngineError(ValueError):
    """The DeepSpeed engine's configuration is one the RACO hook cannot run exactly."""


class OptimizerKind(enum.Enum):
    """Which DeepSpeed optimizer wrapper holds the gradient, i.e. which shard strategy applies."""

    PLAIN = "plain"
    """ZeRO 0, fp32: the bare torch optimizer; gradients live in ``param.grad``."""
    ZERO_1_2 = "zero_1_2"
    """ZeRO 1/2 ``DeepSpeedZeroOptimizer`` (fp32, or bf16 without the BF16 optimizer)."""
    BF16_ZERO_1 = "bf16_zero_1"
    """ZeRO 1 with bf16 parameters and fp32 accumulation: DeepSpeed's ``BF16_Optimizer``."""
    ZERO_3 = "zero_3"
    """ZeRO 3 ``DeepSpeedZeroOptimizer_Stage3``."""


@dataclass(frozen=True)
class EngineLayout:
    """The validated description of a DeepSpeed engine, as far as the RACO hook cares."""

    stage: int
    """``zero_optimization.stage`` (0-3)."""
    kind: OptimizerKind
    """The optimizer wrapper that owns the gradient shard."""
    param_dtype: torch.dtype
    """Model parameter dtype (torch.float32 or torch.bfloat16)."""
    grad_accum_dtype: torch.dtype
    """Dtype in which DeepSpeed accumulates gradients (``data_types.grad_accum_dtype``)."""
    offload_optimizer: bool
    """``zero_optimization.offload_optimizer.device == "cpu"``."""
    world_size: int
    """Data-parallel world size (ranks that each own one shard)."""
    gradient_accumulation_steps: int
    """Micro-batches per objective per optimizer step."""
    gradient_clipping: float
    """``gradient_clipping`` (0 = off); DeepSpeed applies it to the combined gradient."""

    @property
    def grads_accumulate_in_low_precision(self) -> bool:
        """True when DeepSpeed sums micro-batch (and rank) gradients in bf16."""
        return self.grad_accum_dtype != torch.float32

    @property
    def partitions_gradients(self) -> bool:
        """True when each rank holds only its shard of the gradient (every stage but 0)."""
        return self.stage >= 1

    def describe(self) -> str:
        """One line for the startup log."""
        return (
            f"ZeRO-{self.stage} ({self.kind.value}), params {str(self.param_dtype).removeprefix('torch.')}, "
            f"grad accumulation {str(self.grad_accum_dtype).removeprefix('torch.')}, "
            f"offload_optimizer={'cpu' if self.offload_optimizer else 'none'}, dp world {self.world_size}, "
            f"{self.gradient_accumulation_steps} micro-batch(es) per objective, clipping {self.gradient_clipping}"
        )

    @classmethod
    def from_engine(cls, engine) -> EngineLayout:
        """Inspect ``engine`` (a ``deepspeed.DeepSpeedEngine``) once; raise on anything unsupported."""
        _reject_unsupported(engine)
        stage = int(engine.zero_optimization_stage())
        param_dtype, grad_accum_dtype = engine.get_data_types()
        offload = bool(engine.zero_cpu_offload())
        kind = _optimizer_kind(engine, stage)
        layout = cls(
            stage=stage,
            kind=kind,
            param_dtype=param_dtype,
            grad_accum_dtype=grad_accum_dtype,
            offload_optimizer=offload,
            world_size=int(engine.dp_world_size),
            gradient_accumulation_steps=int(engine.gradient_accumulation_steps()),
            gradient_clipping=float(engine.gradient_clipping() or 0.0),
        )
        if layout.grads_accumulate_in_low_precision:
            warnings.warn(
                "RacoHook: DeepSpeed accumulates gradients in bf16 (data_types.grad_accum_dtype is unset or "
                "'bf16'); each objective's gradient, and therefore the Gram and the RACO coefficients, then "
                'carry bf16 rounding. Set "data_types": {"grad_accum_dtype": "fp32"} in the DeepSpeed '
                "config for exact per-objective gradients.",
                stacklevel=3,
            )
        return layout


def _fail(field: str, found: str, fix: str) -> None:
    raise UnsupportedEngineError(f"RacoHook does not support {field} = {found}: {fix}")


def _reject_unsupported(engine) -> None:
    # Order: the most fundamental mismatch first, so the user fixes one thing at a time.
    if engine.optimizer is None or type(engine.optimizer).__name__ == "DummyOptim":
        _fail(
            "the engine's optimizer", "None", "pass an 'optimizer' section (or an optimizer) to deepspeed.initialize."
        )
    if type(engine).__name__ == "PipelineEngine":
        _fail(
            "pipeline parallelism",
            "on",
            "RACO needs every objective's full gradient per step; use a plain DeepSpeedEngine.",
        )
    if engine.mpu is not None:
        _fail(
            "mpu (tensor/model parallelism)",
            "set",
            "use the Megatron adapter, which applies Megatron's grad-norm rules to the Gram.",
        )
    if getattr(engine, "sequence_parallel_size", 1) != 1:
        _fail(
            "sequence_parallel_size", str(engine.sequence_parallel_size), "run RacoHook with sequence parallelism off."
        )
    if getattr(engine, "has_moe_layers", False):
        _fail("MoE layers", "present", "expert-parallel gradients are not part of the dense shard the hook captures.")
    if engine.fp16_enabled():
        _fail(
            "fp16.enabled",
            "true",
            'dynamic loss scaling rescales and skips per objective. Use "bf16": {"enabled": true} with '
            '"data_types": {"grad_accum_dtype": "fp32"}, or fp32.',
        )
    if engine.torch_autocast_enabled():
        _fail("torch_autocast.enabled", "true", 'use "bf16": {"enabled": true} instead of torch autocast.')
    if not engine.managed_gradient_accumulation():
        _fail("managed_gradient_accumulation", "false", "remove it; the hook sets accumulation boundaries itself.")
    if getattr(engine, "zenflow", False):
        _fail("zero_optimization.zenflow", "on", "remove the zenflow section.")
    if engine.is_deepcompile_enabled():
        _fail("compile.deepcompile", "true", "run without DeepCompile.")
    stage = int(engine.zero_optimization_stage())
    if stage == 0 and engine.bfloat16_enabled():
        _fail(
            "bf16.enabled with zero_optimization.stage 0",
            "true",
            "DeepSpeed then accumulates in bf16 only; use zero_optimization.stage >= 1 with "
            '"data_types": {"grad_accum_dtype": "fp32"}, or fp32 at stage 0.',
        )
    offload = engine.zero_offload_optimizer()
    if offload is not None and str(getattr(offload.device, "value", offload.device)) not in ("cpu", "none"):
        _fail(
            "zero_optimization.offload_optimizer.device",
            str(offload.device),
            'use "cpu" (NVMe swapping is not supported).',
        )
    if offload is not None and getattr(offload, "ratio", 1.0) != 1.0:
        _fail(
            "zero_optimization.offload_optimizer.ratio",
            str(offload.ratio),
            "remove it (partial offload is not supported).",
        )
    if engine.zero_cpu_offload() and getattr(engine.optimizer, "low_precision_master_weights_and_grads", False):
        _fail(
            "low-precision master weights and gradients",
            "on",
            "keep fp32 master weights (the default) with offload_optimizer.",
        )
    param_offload = engine.zero_offload_param()
    if param_offload is not None and str(getattr(param_offload.device, "value", param_offload.device)) != "none":
        _fail(
            "zero_optimization.offload_param.device",
            str(param_offload.device),
            "remove offload_param (untested with the hook).",
        )


def _optimizer_kind(engine, stage: int) -> OptimizerKind:
    name = type(engine.optimizer).__name__
    expected = {
        0: {"PLAIN"},
        1: {"DeepSpeedZeroOptimizer", "BF16_Optimizer"},
        2: {"DeepSpeedZeroOptimizer"},
        3: {"DeepSpeedZeroOptimizer_Stage3"},
    }[stage]
    if name == "BF16_Optimizer" and stage == 1:
        return OptimizerKind.BF16_ZERO_1
    if stage == 0:
        if not isinstance(engine.optimizer, torch.optim.Optimizer):
            _fail(
                "the stage-0 optimizer wrapper", name, "use fp32 at zero_optimization.stage 0 (no fp16/bf16 wrapper)."
            )
        return OptimizerKind.PLAIN
    if name not in expected:
        _fail(
            f"the ZeRO-{stage} optimizer", name, f"expected one of {sorted(expected)}; is this a DeepSpeed 0.19 engine?"
        )
    return OptimizerKind.ZERO_3 if stage == 3 else OptimizerKind.ZERO_1_2
