"""RACO inside a DeepSpeed engine: per-objective gradient shards, one K x K all-reduce, one step.

Usage (``gradient_accumulation_steps`` in the DeepSpeed config = micro-batches per objective)::

    hook = RacoHook(engine, weights=[0.3, 0.7], aggregator="raco", c=0.4, on_nonfinite="skip")
    for k in range(K):
        with hook.objective(k):
            for micro_batch in micro_batches[k]:
                hook.backward(loss_fn(engine, micro_batch, k))
    stats = hook.step()      # capture -> Gram all-reduce -> solve -> combine -> engine.step()

Shared-pair data (all K losses from one forward), once per micro-batch::

    hook.backward_shared(lambda: losses_fn(engine, micro_batch))   # or a list of K losses on ZeRO 0-2
    stats = hook.step()

Per optimizer step the hook:

1. lets DeepSpeed reduce each objective's gradient as usual (every objective ends
   on an accumulation boundary, which the hook sets), copies the rank's shard
   into a row of the hook's fp32 buffer and clears the engine's buffer (shards.py,
   one strategy per DeepSpeed optimizer family); the step's last objective stays
   in DeepSpeed's buffer, so the hook adds (K-1) x shard x 4 bytes (rows.py);
2. forms the local Gram in float64 (:func:`raco_ds.gram.local_gram`) and
   all-reduces it, solves, and checks that every rank got the same coefficients
   (:func:`raco_ds.consensus.solve_across_ranks`);
3. writes sum_k a_k S[k] into the engine's shard (in place) and calls ``engine.step()``, so
   DeepSpeed's clipping, LR schedule and offloaded optimizer act on the combined
   gradient.

A NaN/inf in any objective's gradient (on any rank) shows in the all-reduced
Gram's diagonal, so every rank skips the step identically: the engine's gradients
are dropped, ``engine.step()`` is not called (no optimizer update, no LR-schedule
tick, as DeepSpeed does for an fp16 overflow) and the stats name the objectives.
With ``on_nonfinite="raise"`` a :class:`NonFiniteGradientError` carrying those
stats is raised instead (after the same clean-up).

Shared forward under ZeRO-3: one forward and K backwards with ``retain_graph``
breaks ZeRO-3's parameter re-gathering (HOOKS.md), so there
:meth:`RacoHook.backward_shared` takes a callable and runs the forward once per
objective (logged once). ZeRO 0-2 run one forward and K backwards.

One forward and one backward for all K objectives (DESIGN.md section 6, onepass.py),
once per micro-batch::

    with hook.onepass() as op:
        for micro_batch in micro_batches:
            with op.record(rows=R):
                logits = op.forward(input_ids=..., attention_mask=...).logits
                op.backward(seed, coefficients)          # (K, R) row coefficients
    stats = hook.step()

Capture seam (what ``hook.onepass()`` uses, and any other external capture):
:meth:`RacoHook.capture_rows` (K shard rows, the last one DeepSpeed's own buffer
where it can be) and :attr:`RacoHook.shard_layout` (per-parameter slices, see
shards.py); the capture fills every row, calls :meth:`RacoHook.mark_captured`,
then ``hook.step()``.

The step itself (objective bookkeeping, Gram -> consensus -> write -> step, the
non-finite policy) is :class:`raco_ds.step.RacoStep`'s; this module says only
where DeepSpeed keeps the shards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from raco_ds.collectives import rank, world_size
from raco_ds.deepspeed.layout import EngineLayout
from raco_ds.deepspeed.onepass import DeepSpeedOnePass
from raco_ds.deepspeed.rows import ShardRows
from raco_ds.deepspeed.shards import ShardLayout, ShardStrategy, make_strategy, onepass_unsupported_reason
from raco_ds.step import RacoStep, StepOptions
from raco_ds.step_stats import NonFiniteGradientError, RacoStepStats

__all__ = ["NonFiniteGradientError", "RacoHook", "RacoStepStats"]

logger = logging.getLogger(__name__)

Losses = Sequence[torch.Tensor] | torch.Tensor


class RacoHook(RacoStep):
    """RACO's per-step gradient surgery on a ``deepspeed.DeepSpeedEngine`` (any ZeRO stage)."""

    def __init__(
        self,
        engine,
        weights: Sequence[float] | torch.Tensor,
        aggregator: str = "raco",
        c: float = 0.4,
        on_nonfinite: str = "skip",
        verify_coefficients: bool = True,
    ) -> None:
        """Validate the engine (``EngineLayout``), pick its shard strategy, allocate the K shard buffers.

        ``weights``: the user's preference weights w (K >= 1, non-negative, summing to 1).
        ``aggregator``: a name from ``raco_ds.solver.AGGREGATORS`` ("raco", "cagrad", "linear", "mgda").
        ``c``: RACO/CAGrad conflict radius in [0, 1).
        ``on_nonfinite``: "skip" (skip the step everywhere and report) or "raise".
        ``verify_coefficients``: check every step that all ranks computed identical coefficients.
        """
        super().__init__(StepOptions.validated(weights, aggregator, c, on_nonfinite), verify=verify_coefficients)
        self.engine = engine
        self.engine_layout: EngineLayout = EngineLayout.from_engine(engine)
        self.strategy: ShardStrategy = make_strategy(engine, self.engine_layout)
        # The last objective of a step stays in DeepSpeed's own buffer unless that buffer is bf16.
        self._rows = ShardRows(self.strategy, self.num_objectives,
                               not self.engine_layout.grads_accumulate_in_low_precision)
        self._check_shard_size()
        self._group = getattr(engine, "seq_data_parallel_group", None)
        self._onepass: DeepSpeedOnePass | None = None
        self._objective_micro_batches = 0  # backward() calls in the open objective(k) block
        self._shared_micro_batches = 0  # backward_shared() calls this step (every objective at once)
        self._logged_zero3_fallback = False
        if rank() == 0:
            logger.info(
                "RacoHook: %d objectives, aggregator %s (c=%.3g), %s; shard %d elements/rank, buffers %.1f MiB/rank",
                self.num_objectives, aggregator, self.c, self.engine_layout.describe(), self.shard_layout.numel,
                self.buffer_bytes / 2**20,
            )  # fmt: skip

    # -- what the one-pass capture plugs into -----------------------------------------------------
    @property
    def shard_layout(self) -> ShardLayout:
        """Where each parameter's owned slice sits in a row of :attr:`shard_buffer` (see shards.py)."""
        return self.strategy.shard_layout

    @property
    def shard_buffer(self) -> torch.Tensor:
        """(K, shard_numel) fp32: row k = objective k's shard, for an external (one-pass) capture to fill.

        Asking for it makes the hook keep all K rows from then on (K x shard memory
        instead of (K-1) x shard: the per-objective path leaves the last objective
        in DeepSpeed's buffer, see rows.py).
        """
        return self._rows.ensure_full()

    def capture_rows(self) -> list[torch.Tensor]:
        """K 1-D fp32 rows (row k = objective k's shard) for an external (one-pass) capture to fill.

        Where DeepSpeed keeps the rank's shard as one flat fp32 buffer (ZeRO-3) and the
        last objective may stay there (fp32 accumulation), the last row IS that buffer
        and the hook adds (K-1) x shard, as with K passes; otherwise these are the rows
        of :attr:`shard_buffer` (K x shard). Call between steps; the same rows serve
        every step.
        """
        return self._rows.capture_rows()

    def release_capture_rows(self) -> None:
        """Take back the rows of :meth:`capture_rows` (their capture stopped); K-pass capture may follow."""
        self._rows.release_capture_rows()

    @property
    def buffer_bytes(self) -> int:
        """Bytes the hook holds for per-objective shards on this rank."""
        buffer = self._rows.buffer
        return buffer.numel() * buffer.element_size()

    def mark_captured(self) -> None:
        """Declare every row of :meth:`capture_rows` (or :attr:`shard_buffer`) filled by an external capture, ready for step()."""
        self._rows.mark_captured()
        self._mark_all_captured()

    # -- one pass for all objectives (onepass.py) --------------------------------------------------
    def onepass_unsupported_reason(self) -> str | None:
        """None when :meth:`onepass` can run on this engine, else why (decided from the engine layout)."""
        return onepass_unsupported_reason(self.engine_layout)

    def attach_onepass(self, *, verify: bool = True, verify_every: int = 0, **scatter_options) -> DeepSpeedOnePass:
        """Hook the model for one-pass capture (once; :meth:`onepass` calls it with the defaults if needed).

        Raises ``ValueError`` where the engine has no one-pass scatter
        (:meth:`onepass_unsupported_reason`) and ``UnsupportedModuleError`` where a trainable
        parameter has no capture rule. ``verify`` / ``verify_every``: the capture's self-check
        against autograd (its first step, then every ``verify_every`` steps);
        ``scatter_options``: ``bucket_numel``, ``max_in_flight`` (see :class:`DeepSpeedOnePass`).
        """
        if self._onepass is not None:
            raise RuntimeError("one-pass capture is already attached to this hook; detach_onepass() first")
        if self._step_started():
            raise RuntimeError("attach_onepass() in the middle of a step; call hook.step() first")
        op = DeepSpeedOnePass(self.engine, self.num_objectives, self.strategy, verify=verify,
                              verify_every=verify_every, **scatter_options)  # fmt: skip
        # Bound to the hook's rows (the last one DeepSpeed's own buffer where possible), the K shards
        # are reduced straight into them during the backward.
        op.zero(shard_buffer=self._rows.capture_rows())
        self._onepass = op
        return op

    def detach_onepass(self) -> None:
        """Remove the one-pass capture's hooks and take its rows back; K-pass capture may follow."""
        if self._onepass is None:
            return
        self._onepass.remove()
        self._onepass = None
        self._rows.release_capture_rows()

    @contextlib.contextmanager
    def onepass(self) -> Iterator[DeepSpeedOnePass]:
        """One optimizer step's capture from one forward + one backward per micro-batch; then call :meth:`step`.

        Inside, per micro-batch: ``with op.record(rows=R):`` ``op.forward(...)`` and
        ``op.backward(seed, coefficients)``. Leaving the block finishes the capture (order
        check, non-finite objectives -> NaN rows, DeepSpeed's boundary state) and marks the
        rows captured; an exception inside discards the step (:meth:`discard_step`).
        """
        if self._step_started():
            raise RuntimeError("hook.onepass() in the middle of a step: call hook.step() (or discard_step()) first")
        op = self._onepass if self._onepass is not None else self.attach_onepass()
        op.zero()
        try:
            yield op
            op.finish()
        except BaseException:
            op.zero()
            self.discard_step()
            raise
        self.mark_captured()

    # -- per-objective passes (``with hook.objective(k)``, RacoStep) -------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backward one micro-batch of the current objective (inside ``with hook.objective(k)``)."""
        if self._active is None:
            raise RuntimeError(
                "hook.backward() outside `with hook.objective(k)`; use hook.backward_shared() for shared pairs"
            )
        m = self.engine_layout.gradient_accumulation_steps
        if self._objective_micro_batches >= m:
            raise RuntimeError(f"objective {self._active} got more than gradient_accumulation_steps={m} micro-batches")
        self.engine.set_gradient_accumulation_boundary(self._objective_micro_batches == m - 1)
        self.engine.backward(loss)
        self._objective_micro_batches += 1

    def _begin_objective(self, k: int) -> None:
        if self._shared_micro_batches:
            raise RuntimeError(f"objective {k} already has gradients this step (backward_shared); "
                               "call hook.step() first")
        self.strategy.begin_objective()
        self._objective_micro_batches = 0

    def _end_objective(self, k: int) -> None:
        m = self.engine_layout.gradient_accumulation_steps
        if self._objective_micro_batches != m:
            self.strategy.clear()
            raise RuntimeError(
                f"objective {k} ran {self._objective_micro_batches} micro-batch(es) but gradient_accumulation_steps "
                f"is {m}: it means micro-batches per objective, and each objective must end on an accumulation boundary"
            )
        if self._rows.can_stay_in_engine():
            self._rows.stay_in_engine(k)  # the step reads and combines it where DeepSpeed left it
        else:
            self._capture(k, accumulate=False)

    def _abort_objective(self, k: int) -> None:
        self.strategy.clear()

    def _capture_hint(self) -> str:
        m = self.engine_layout.gradient_accumulation_steps
        return (f"each objective needs its gradient_accumulation_steps={m} micro-batch(es), through "
                "`with hook.objective(k)`, hook.backward_shared() or hook.onepass()")

    # -- shared pairs: all K losses from one forward ------------------------------------------------
    def backward_shared(self, losses: Losses | Callable[[], Losses]) -> None:
        """Backward one micro-batch of shared-pair data for all K objectives.

        ``losses``: the K losses of one forward (ZeRO 0-2), or a callable that runs
        the forward and returns them (required under ZeRO-3, where it is called once
        per objective). Call it gradient_accumulation_steps times, then step().
        Each call reduces every objective at once (each backward is an accumulation
        boundary) and adds the shards into the hook's buffers.
        """
        if self._active is not None:
            raise RuntimeError("hook.backward_shared() inside `with hook.objective(k)`")
        m = self.engine_layout.gradient_accumulation_steps
        if any(self._captured):
            captured = [k for k, done in enumerate(self._captured) if done]
            raise RuntimeError(
                f"backward_shared after objective(s) {captured} were captured this step (each has its "
                f"gradient_accumulation_steps={m} micro-batch(es)); call hook.step() first "
                "(mixing with hook.objective() in one step is not supported)"
            )
        first = self._shared_micro_batches == 0
        if first and m > 1:
            self._rows.ensure_full()  # later micro-batches need the engine's buffer for every objective
        if self.engine_layout.stage == 3:
            if not callable(losses):
                raise ValueError(
                    "under ZeRO-3 backward_shared needs a callable that runs the forward and returns the K losses: "
                    "a second backward through one forward does not re-gather ZeRO-3 parameters (HOOKS.md), so the "
                    "hook runs one forward per objective"
                )
            if not self._logged_zero3_fallback and rank() == 0:
                logger.info("RacoHook: ZeRO-3 shared-pair path runs one forward per objective (no retain_graph)")
            self._logged_zero3_fallback = True
            for k in range(self.num_objectives):
                self._shared_one(k, self._checked(losses())[k], retain_graph=False, accumulate=not first)
        else:
            values = self._checked(losses() if callable(losses) else losses)
            for k in range(self.num_objectives):
                self._shared_one(k, values[k], retain_graph=k < self.num_objectives - 1, accumulate=not first)
        self._shared_micro_batches += 1
        if self._shared_micro_batches == m:
            self._shared_micro_batches = 0
            self._mark_all_captured()
    def _shared_one(self, k: int, loss: torch.Tensor, retain_graph: bool, accumulate: bool) -> None:
        if self._rows.in_engine is not None:
            raise RuntimeError("backward_shared after this step's last objective was left in the engine")
        self._timed(self.strategy.begin_objective)
        if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
            # engine.forward() resets ZeRO's per-backward hook bookkeeping; a second backward through
            # the same forward needs that reset too.
            self.engine.optimizer.clear_backward_seen_flag()
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(loss, retain_graph=retain_graph)
        if not accumulate and self._rows.can_stay_in_engine():
            self._rows.stay_in_engine(k)
        else:
            self._timed(lambda: self._capture(k, accumulate=accumulate))

    def _checked(self, losses: Losses) -> Sequence[torch.Tensor]:
        if len(losses) != self.num_objectives:
            raise ValueError(f"expected {self.num_objectives} losses, got {len(losses)}")
        return losses

    def _step_started(self) -> bool:
        return self._capture_started() or bool(self._shared_micro_batches)

    # -- the step (RacoStep.step: Gram -> all-reduce -> solve -> write -> engine.step()) ---------------
    def _local_gram(self) -> tuple[torch.Tensor, object]:
        return self._rows.gram(*self._gram_columns()), self._group

    def _gram_columns(self) -> tuple[int, int]:
        n = self.shard_layout.numel
        if not self.shard_layout.replicated:
            return 0, n
        # ZeRO 0: every rank holds the full gradient; each forms the Gram of its 1/N of the columns.
        world, me = world_size(self._group), rank(self._group)
        return n * me // world, n * (me + 1) // world

    def _write(self, coefficients: torch.Tensor) -> None:
        self._rows.combine_and_write(coefficients)
        self._rows.reset()

    def _optimizer_step(self, stats: RacoStepStats) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()

    def _discard(self) -> None:
        self._rows.reset()
        self.strategy.discard()
        self._shared_micro_batches = 0

    def _capture(self, k: int, accumulate: bool) -> None:
        self.strategy.capture(self._rows.row_for(k), accumulate=accumulate)
        self.strategy.clear()

    def _check_shard_size(self) -> None:
        # The buffers must hold the rank's shard only (K x shard), never K full gradients (except ZeRO 0,
        # whose shard is the full gradient). Allow each parameter's and each group's alignment padding.
        shard, world = self.shard_layout, self.engine_layout.world_size
        total = sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            for p in self.engine.module.parameters()
            if p.requires_grad
        )
        assert self._rows.buffer.shape[1] == shard.numel and self._rows.buffer.shape[0] <= self.num_objectives
        if self.engine_layout.partitions_gradients:
            bound = math.ceil(total / world) + len(shard.slices) + 64 * world
            assert shard.numel <= bound, f"shard of {shard.numel} elements exceeds 1/{world} of {total} (+padding)"
