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
``_layout.py``; the math lives in raco_ds.gram / consensus / solver.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.collectives import collective_device
from raco_ds.consensus import StepSolution, solve_across_ranks

# The step stats and the non-finite error are shared with the DeepSpeed hook (raco_ds.step_stats),
# so that logging and error handling do not depend on the backend.
from raco_ds.step import StepOptions
from raco_ds.step_stats import NonFiniteGradientError, RacoStepStats
from raco_ds.gram import local_gram
from raco_ds.megatron._layout import MegatronShardLayout, UnsupportedMegatronSetupError

__all__ = ["MegatronStepStats", "NonFiniteGradientError", "RacoMegatron"]

@dataclass
class MegatronStepStats(RacoStepStats):
    """RacoHook's step stats (same fields and tags, raco_ds.deepspeed.hook) plus Megatron's step outcome."""

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


class RacoMegatron:
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
        options = StepOptions.validated(weights, aggregator, c, on_nonfinite)
        self.weights = options.weights
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
        self.aggregator, self.c, self.on_nonfinite = options.aggregator, options.c, options.on_nonfinite
        self.verify = verify
        self.layout = MegatronShardLayout.from_optimizer(optimizer)
        self._shards: list[torch.Tensor] = [
            torch.zeros(self.num_objectives, s.numel, dtype=self.layout.dtype, device=self.layout.device)
            for s in self.layout.sections
        ]
        self._captured = [False] * self.num_objectives
        self._active: int | None = None
        self._finalized = False
        self._seconds_capture = 0.0
        self._install_finalize_wrapper()

    # ------------------------------------------------------------------ properties

    @property
    def num_objectives(self) -> int:
        """K, the number of objectives (length of ``weights``)."""
        return self.weights.numel()

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

    # ------------------------------------------------------------------ per objective

    @contextlib.contextmanager
    def objective(self, k: int) -> Iterator[None]:
        """Accumulate objective k's gradient inside the block; capture its owned shard on exit."""
        if not 0 <= k < self.num_objectives:
            raise IndexError(f"objective {k} out of range for {self.num_objectives} objectives")
        if self._active is not None:
            raise RuntimeError(f"objective({k}) entered inside objective({self._active}); close that block first")
        if self._captured[k]:
            raise RuntimeError(f"objective {k} was already captured this step; call step() before capturing it again")
        if not any(self._captured):
            # Start of an optimizer step: Megatron's loop zeroes the buffers here.
            self._zero_grad_buffers()
        self._active, self._finalized = k, False
        try:
            yield
        except BaseException:
            self._active = None
            raise
        started = time.perf_counter()
        if not self._finalized:
            # raco.backward() path (no schedule ran finalize): reduce now, once.
            self._finalize_impl(self.chunks)
        self._capture(k)
        self._zero_grad_buffers()
        self._captured[k] = True
        self._active = None
        self._seconds_capture += time.perf_counter() - started

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

    def _zero_grad_buffers(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    @torch.no_grad()
    def _capture(self, k: int) -> None:
        for section, shard in zip(self.layout.sections, self._shards):
            offset = 0
            row = shard[k]
            for segment in section.segments:
                row[offset : offset + segment.numel].copy_(segment.view())
                offset += segment.numel

    # ------------------------------------------------------------------ step

    def _loss_scale(self) -> float:
        getter = getattr(self.optimizer, "get_loss_scale", None)
        return float(getter()) if getter is not None else 1.0

    def _has_grad_scaler(self) -> bool:
        subs = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return any(getattr(sub, "grad_scaler", None) is not None for sub in subs)

    def solve(self) -> tuple[StepSolution, dict[str, float]]:
        """Gram of the captured shards, reduced over the grad-stats group(s), and the solve."""
        missing = [k for k, done in enumerate(self._captured) if not done]
        if missing:
            raise RuntimeError(f"objectives {missing} were not captured this step; run `with raco.objective(k):` for each")
        timings = {}
        started = time.perf_counter()
        # Grads are held multiplied by the fp16 loss scale; the Gram is reported unscaled
        # (the coefficients of every aggregator are invariant to that scale anyway).
        inv_scale2 = 1.0 / self._loss_scale() ** 2
        grams = [local_gram(shard[:, : s.counted_numel]) * inv_scale2 for s, shard in zip(self.layout.sections, self._shards)]
        timings["gram"] = time.perf_counter() - started
        sections = self.layout.sections
        if len(sections) == 1:
            group = sections[0].group
            gram = grams[0]
        else:
            # Several grad-stats groups (non-distributed optimizer with expert parameters):
            # reduce each over its own group, as ChainedOptimizer.get_grad_norm does, then
            # average the identical-in-exact-arithmetic totals over the world so that every
            # rank solves bit-identical numbers.
            total = torch.zeros_like(grams[0])
            for section, part in zip(sections, grams):
                part = part.to(collective_device(section.group))
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=section.group)
                total += part.cpu()
            group, gram = None, total / dist.get_world_size()
        solution = solve_across_ranks(
            gram, self.weights, self.aggregator, self.c, group=group,
            device=collective_device(group), verify=self.verify,
        )
        timings["allreduce"] = solution.seconds_allreduce
        timings["solve"] = solution.seconds_solve
        return solution, timings

    @torch.no_grad()
    def write(self, coefficients: torch.Tensor) -> None:
        """Write sum_k coefficients[k] * S[k] into every owned ``main_grad`` slice (fp32 accumulation)."""
        for section, shard in zip(self.layout.sections, self._shards):
            a = coefficients.to(device=shard.device, dtype=torch.float32)
            combined = torch.zeros(shard.shape[1], dtype=torch.float32, device=shard.device)
            for k in range(shard.shape[0]):
                combined.add_(shard[k].float(), alpha=float(a[k]))
            offset = 0
            for segment in section.segments:
                segment.view().copy_(combined[offset : offset + segment.numel])
                offset += segment.numel

    def step(self) -> MegatronStepStats:
        """Solve, write the combination into the owned slices, run ``optimizer.step()``; reset for the next step."""
        solution, timings = self.solve()
        started = time.perf_counter()
        update_successful, grad_norm = False, None
        if solution.skipped:
            if self.on_nonfinite == "raise":
                # The buffers were zeroed after each capture; dropping the shards clears the step.
                stats = self._stats(solution, timings, False, None)
                self._reset()
                raise NonFiniteGradientError(stats)
            if self._has_grad_scaler():
                # fp16: hand Megatron the non-finite gradient so its scaler sees the
                # overflow, backs off and skips the update, as it would without RACO.
                self.write(torch.ones(self.num_objectives, dtype=torch.float64))
        else:
            self.write(solution.coefficients)
        timings["write"] = time.perf_counter() - started
        started = time.perf_counter()
        if not solution.skipped or self._has_grad_scaler():
            update_successful, grad_norm, _ = self.optimizer.step()
        timings["step"] = time.perf_counter() - started
        stats = self._stats(solution, timings, bool(update_successful), grad_norm)
        self._reset()
        return stats

    def _reset(self) -> None:
        self._captured = [False] * self.num_objectives
        self._seconds_capture = 0.0

    def _stats(self, solution: StepSolution, timings: dict[str, float], ok: bool, grad_norm) -> MegatronStepStats:
        return MegatronStepStats.from_solution(
            solution,
            update_successful=ok,
            grad_norm=None if grad_norm is None else float(grad_norm),
            seconds_capture=self._seconds_capture,
            seconds_gram=timings.get("gram", 0.0),
            seconds_write=timings.get("write", 0.0),
            seconds_step=timings.get("step", 0.0),
        )
