"""RacoMegatron: RACO over megatron-core's DistributedDataParallel and optimizers.

Per optimizer step (DESIGN.md section 2, the distributed contract):

1. ``with raco.objective(k):`` run objective k's forward/backward, either with
   Megatron's pipeline schedule (``get_forward_backward_func()``; the schedule
   calls the model config's ``finalize_model_grads_func``, which this adapter
   wraps) or with ``raco.backward(loss)`` per micro-batch. On leaving the block
   the gradients are finalized once (DP reduce-scatter or all-reduce, tied
   embedding and sequence-parallel all-reduces), this rank's owned slices are
   copied into objective k's row of the shard stack, and the buffers are zeroed
   (``zero_grad_buffer``) for the next objective.
2. ``raco.step()``: local float64 Gram of the counted slices, one all-reduce
   of the K x K matrix over the optimizer's grad-stats group, the same solve on
   every rank (raco_ds.consensus), then sum_k a_k S[k] is written into the owned
   ``main_grad`` slices and Megatron's ``optimizer.step()`` runs (its loss-scale
   handling, clipping, Adam and parameter all-gather).

Everything Megatron-specific about *where* the shards are lives in
``_layout.py``; the step's sequence, bookkeeping and non-finite policy are
:class:`raco_ds.step.RacoStep`'s; the math lives in raco_ds.gram / consensus / solver.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.collectives import collective_device
from raco_ds.gram import local_gram
from raco_ds.megatron._layout import MegatronShardLayout, UnsupportedMegatronSetupError
from raco_ds.step import RacoStep, StepOptions
from raco_ds.step_stats import NonFiniteGradientError, RacoStepStats

__all__ = ["MegatronStepStats", "NonFiniteGradientError", "RacoMegatron"]


@dataclass
class MegatronStepStats(RacoStepStats):
    """RacoHook's step stats (same fields and tags, raco_ds.step_stats) plus Megatron's step outcome."""

    update_successful: bool = False
    """Megatron's ``optimizer.step()`` verdict (False when skipped, also by an fp16 overflow)."""
    grad_norm: float | None = None
    """Megatron's norm of the combined gradient before clipping (None when ``clip_grad`` is 0 or skipped)."""
    seconds_step: float = 0.0
    """Megatron's ``optimizer.step()`` (unscale, clip, Adam, parameter all-gather)."""

    def scalars(self) -> dict[str, float]:
        """RacoHook's tags plus ``raco/combined_grad_norm``, ``raco/update_successful``, ``time/optimizer_step``."""
        out = super().scalars()
        out["raco/update_successful"] = float(self.update_successful)
        if self.grad_norm is not None:
            out["raco/combined_grad_norm"] = float(self.grad_norm)
        out["time/optimizer_step"] = self.seconds_step
        return out


class RacoMegatron(RacoStep):
    """RACO for megatron-core: per-objective owned-shard capture, Gram consensus, write-back, step.

    Args:
        model: the DistributedDataParallel-wrapped model chunk, or the list of
            chunks (virtual pipeline stages) the schedule receives.
        optimizer: the optimizer from ``megatron.core.optimizer.get_megatron_optimizer``
            over those chunks (distributed or not, chained dense + expert).
        weights: user weights w on the simplex, one per objective.
        aggregator: a raco_ds.solver aggregator name ("raco", "cagrad", "linear", "mgda").
        c: conflict radius in [0, 1).
        on_nonfinite: "skip" (no update this step; under fp16 loss scaling the
            non-finite gradient is handed to Megatron so its scaler backs off) or
            "raise" (NonFiniteGradientError).
        verify: check that every rank computed identical coefficients.

    Usage (pipeline schedule)::

        raco = RacoMegatron(model, optimizer, weights=[0.3, 0.7])
        for k in range(raco.num_objectives):
            with raco.objective(k):
                forward_backward_func(forward_step_func=step_fn(k), data_iterator=data[k],
                                      model=model, num_microbatches=m, ...)
        stats = raco.step()

    or, without a schedule, ``raco.backward(loss)`` once per micro-batch inside
    the ``objective`` block.
    """

    stats_type = MegatronStepStats

    def __init__(
        self,
        model: Any | Sequence[Any],
        optimizer: Any,
        weights: Sequence[float] | torch.Tensor,
        aggregator: str = "raco",
        c: float = 0.4,
        on_nonfinite: str = "skip",
        verify: bool = True,
    ) -> None:
        super().__init__(StepOptions.validated(weights, aggregator, c, on_nonfinite), verify=verify)
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        for chunk in self.chunks:
            if not (hasattr(chunk, "zero_grad_buffer") and hasattr(chunk, "buffers") and hasattr(chunk, "no_sync")):
                raise UnsupportedMegatronSetupError(
                    f"model chunk of type {type(chunk).__name__} is not megatron-core's "
                    "DistributedDataParallel; wrap each chunk in "
                    "megatron.core.distributed.DistributedDataParallel(config, ddp_config, module)"
                )
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "get_grad_stats_parallel_group"):
            raise UnsupportedMegatronSetupError(
                f"optimizer of type {type(optimizer).__name__} is not a megatron-core optimizer; build it with "
                "megatron.core.optimizer.get_megatron_optimizer(OptimizerConfig(...), model_chunks)"
            )
        self.optimizer = optimizer
        self.shard_layout = MegatronShardLayout.from_optimizer(optimizer)
        """This rank's owned ``main_grad`` slices, by grad-stats group (_layout.py)."""
        self._shards: list[torch.Tensor] = [
            torch.zeros(self.num_objectives, s.numel, dtype=self.shard_layout.dtype, device=self.shard_layout.device)
            for s in self.shard_layout.sections
        ]
        self._finalized = False
        self._install_finalize_wrapper()

    @property
    def shards(self) -> list[torch.Tensor]:
        """Per grad-stats section, the (K, n) stack of captured owned slices (counted columns first)."""
        return self._shards

    # ------------------------------------------------------------------ finalize

    def _install_finalize_wrapper(self) -> None:
        # The schedules call config.finalize_model_grads_func after the last backward;
        # wrapping it tells the adapter the gradients of the current objective are final.
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.utils import get_model_config

        config = get_model_config(self.chunks[0])
        original = config.finalize_model_grads_func
        if getattr(original, "_raco_wrapper", False):
            original = original._raco_original
        self._finalize_impl: Callable[..., Any] = original or finalize_model_grads

        def finalize(*args: Any, **kwargs: Any) -> Any:
            result = self._finalize_impl(*args, **kwargs)
            if self._active is not None:
                self._finalized = True
            return result

        finalize._raco_wrapper = True  # type: ignore[attr-defined]
        finalize._raco_original = original  # type: ignore[attr-defined]
        config.finalize_model_grads_func = finalize

    # ------------------------------------------------------------------ per objective (``with raco.objective(k)``)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss for the active objective (scaled by the loss scale).

        Gradients accumulate locally (``no_sync``); they are reduced once when the
        ``objective`` block closes. Average over micro-batches yourself (divide
        each loss by their number), as Megatron's schedules do.
        """
        if self._active is None:
            raise RuntimeError("backward() outside an objective block; wrap it in `with raco.objective(k):`")
        scale = getattr(self.optimizer, "scale_loss", None)
        scaled = scale(loss) if scale is not None else loss
        with contextlib.ExitStack() as stack:
            for chunk in self.chunks:
                stack.enter_context(chunk.no_sync())
            scaled.backward()

    def _begin_objective(self, k: int) -> None:
        if not any(self._captured):
            # Start of an optimizer step: Megatron's loop zeroes the buffers here.
            self._zero_grad_buffers()
        self._finalized = False

    def _end_objective(self, k: int) -> None:
        if not self._finalized:
            # raco.backward() path (no schedule ran finalize): reduce now, once.
            self._finalize_impl(self.chunks)
        self._capture(k)
        self._zero_grad_buffers()

    def _abort_objective(self, k: int) -> None:
        self._zero_grad_buffers()

    def _zero_grad_buffers(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    @torch.no_grad()
    def _capture(self, k: int) -> None:
        for section, shard in zip(self.shard_layout.sections, self._shards):
            offset = 0
            row = shard[k]
            for segment in section.segments:
                row[offset : offset + segment.numel].copy_(segment.view())
                offset += segment.numel

    # ------------------------------------------------------------------ step (RacoStep.step)

    def _loss_scale(self) -> float:
        getter = getattr(self.optimizer, "get_loss_scale", None)
        return float(getter()) if getter is not None else 1.0

    def _has_grad_scaler(self) -> bool:
        subs = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return any(getattr(sub, "grad_scaler", None) is not None for sub in subs)

    def _local_gram(self) -> tuple[torch.Tensor, object]:
        # Grads are held multiplied by the fp16 loss scale; the Gram is reported unscaled
        # (the coefficients of every aggregator are invariant to that scale anyway).
        inv_scale2 = 1.0 / self._loss_scale() ** 2
        sections = self.shard_layout.sections
        grams = [local_gram(shard[:, : s.counted_numel]) * inv_scale2 for s, shard in zip(sections, self._shards)]
        if len(sections) == 1:
            return grams[0], sections[0].group
        # Several grad-stats groups (non-distributed optimizer with expert parameters):
        # reduce each over its own group, as ChainedOptimizer.get_grad_norm does, then
        # average the identical-in-exact-arithmetic totals over the world so that every
        # rank solves bit-identical numbers.
        total = torch.zeros_like(grams[0])
        for section, part in zip(sections, grams):
            part = part.to(collective_device(section.group))
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=section.group)
            total += part.cpu()
        return total / dist.get_world_size(), None

    @torch.no_grad()
    def _write(self, coefficients: torch.Tensor) -> None:
        """Write sum_k coefficients[k] * S[k] into every owned ``main_grad`` slice (fp32 accumulation)."""
        for section, shard in zip(self.shard_layout.sections, self._shards):
            a = coefficients.to(device=shard.device, dtype=torch.float32)
            combined = torch.zeros(shard.shape[1], dtype=torch.float32, device=shard.device)
            for k in range(shard.shape[0]):
                combined.add_(shard[k].float(), alpha=float(a[k]))
            offset = 0
            for segment in section.segments:
                segment.view().copy_(combined[offset : offset + segment.numel])
                offset += segment.numel

    def _optimizer_step(self, stats: MegatronStepStats) -> None:
        started = time.perf_counter()
        update_successful, grad_norm, _ = self.optimizer.step()
        stats.seconds_step = time.perf_counter() - started
        stats.update_successful = bool(update_successful)
        stats.grad_norm = None if grad_norm is None else float(grad_norm)

    def _skip(self, stats: MegatronStepStats) -> None:
        if not self._has_grad_scaler():
            return  # the buffers were zeroed after each capture: nothing to drop
        # fp16: hand Megatron the non-finite gradient so its scaler sees the
        # overflow, backs off and skips the update, as it would without RACO.
        started = time.perf_counter()
        self._write(torch.ones(self.num_objectives, dtype=torch.float64))
        stats.seconds_write = time.perf_counter() - started
        self._optimizer_step(stats)

    def _discard(self) -> None:
        # The captured rows are overwritten by the next step's captures; only the buffers need clearing.
        self._zero_grad_buffers()
