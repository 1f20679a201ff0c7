"""One-pass capture on a DeepSpeed engine: all K objectives' gradient shards from one forward + one backward.

The public path is a method of the hook, so no caller wires the sequence by hand::

    hook = RacoHook(engine, weights)
    hook.attach_onepass(verify_every=100)          # optional: options; refuses an uncovered model
    with hook.onepass() as op:                     # one optimizer step: binds the hook's rows, zeroes them
        for micro_batch in micro_batches:          # gradient_accumulation_steps of them
            with op.record(rows=R):
                logits = op.forward(input_ids=..., attention_mask=...).logits   # engine.module
                ...the seed and the (K, R) row coefficients...
                op.backward(seed, coefficients)    # streams each parameter's K gradients into the shard rows
    stats = hook.step()                            # Gram -> solve -> write -> engine.step()

Leaving the ``with`` block finishes the capture once: the ranks' collective
order is checked, an objective with a non-finite row coefficient gets NaN rows
(so every rank skips the step), DeepSpeed is left as after a boundary backward
(``ShardStrategy.finish_external_backward``) and the hook's rows are marked
captured. An exception inside the block (e.g. the self-check's
:class:`~raco_ds.onepass.OnePassMismatchError`) discards the step; the hook is
then ready for another one-pass step or for K passes (after
:meth:`RacoHook.detach_onepass`).

This module is the DeepSpeed side only: the capture, the rules and the streaming
scatter are framework-free (``raco_ds.onepass``); which scatter fills the shard
and what DeepSpeed needs afterwards come from the hook's shard strategy
(shards.py), and whether one pass runs at all from its ``EngineLayout``
(:func:`~raco_ds.deepspeed.shards.onepass_unsupported_reason`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from raco_ds.collectives import collective_device, is_distributed
from raco_ds.deepspeed.layout import EngineLayout
from raco_ds.deepspeed.shards import ShardStrategy, make_strategy, onepass_unsupported_reason
from raco_ds.onepass import (
    BUCKET_NUMEL,
    MAX_IN_FLIGHT,
    OnePassCapture,
    ParameterView,
    RowCoefficients,
    SelfCheck,
    ShardRowsLike,
    ShardScatter,
    as_shard_rows,
)

__all__ = ["DeepSpeedOnePass", "ZERO3_PARAMETERS"]

ZERO3_PARAMETERS = ParameterView(
    full_shape=lambda p: tuple(getattr(p, "ds_shape", p.shape)),
    values_absent=lambda p: hasattr(p, "ds_id") or p.device.type == "meta",
)
"""ZeRO-3 parameters as one-pass capture must see them: ``ds_shape`` is the full shape, and a parameter
with a ``ds_id`` is partitioned (its values are gathered only inside its module's forward)."""


class DeepSpeedOnePass:
    """The model-side capture and the streaming scatter of one DeepSpeed engine (built once, used every step).

    Normally built by :meth:`RacoHook.attach_onepass`; build it directly only to
    exercise the pieces (tests, benchmarks).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (ZeRO-1/2/3, fp32 or bf16, with or without optimizer offload).
        num_objectives: K.
        strategy: the hook's ``ShardStrategy`` (shards.py): the shard layout and the scatter come from it;
            built from the engine when omitted.
        shard_buffer: where the backward streams the K shards: ``hook.capture_rows()`` (K-1 rows of
            the hook's buffer and DeepSpeed's own gradient buffer: the hook then adds (K-1) x shard,
            as with K passes), or any (K, shard_numel) tensor. Optional: without it the adapter keeps
            its own K shard rows and :meth:`scatter_into` copies them out (one extra K x shard transient).
        bucket_numel: full-parameter elements per objective per collective (memory vs. number of
            collectives: a rank holds about K x ((max_in_flight + 1) x this + the largest parameter)
            of full-size gradients).
        max_in_flight: reductions that may run asynchronously while the backward goes on (on NCCL
            they overlap its compute); each costs one bucket's staging. 0: every reduction waits.
        verify, verify_every: :class:`OnePassCapture`'s self-check against autograd, at the first
            :meth:`forward` and every ``verify_every`` steps; each parameter's worst error over all
            ranks decides, so every rank raises :class:`OnePassMismatchError` together or none does.

    During the backward each parameter's (K, numel) gradients are reduced
    (averaged over ranks) into the rank's (K, shard) rows as soon as every use
    of the parameter has contributed, then freed (``raco_ds.onepass._scatter``);
    unused parameters are reduced as zeros at the end of the backward, in
    registration order.

    The forward goes through ``engine.module``, not ``engine``: DeepSpeed's
    forward hangs hooks on the outputs that start its own backward epilogue,
    which would try to reduce gradients that one-pass capture never asks
    autograd to produce. ZeRO-3 parameter gathering is per module and is unaffected.
    """

    def __init__(self, engine, num_objectives: int, strategy: ShardStrategy | None = None, *,
                 shard_buffer: ShardRowsLike | None = None, bucket_numel: int = BUCKET_NUMEL,
                 max_in_flight: int = MAX_IN_FLIGHT, verify: bool = True, verify_every: int = 0) -> None:
        if strategy is None:
            strategy = make_strategy(engine, EngineLayout.from_engine(engine))
        reason = onepass_unsupported_reason(strategy.engine_layout)
        if reason is not None:
            raise ValueError(f"one-pass capture cannot run on this engine: {reason}")
        self.engine = engine
        self.strategy = strategy
        self.shard_layout = strategy.shard_layout
        self.capture = OnePassCapture(engine.module, num_objectives, verify=verify, verify_every=verify_every,
                                      parameter_view=ZERO3_PARAMETERS)
        self.capture.agree = self._agree
        device = torch.device(getattr(engine, "device", self.shard_layout.device))
        self.scatter: ShardScatter = strategy.onepass_scatter.build(
            self.capture, self.shard_layout.partitions, self.shard_layout.numel, device=device,
            bucket_numel=bucket_numel, max_in_flight=max_in_flight,
        )  # fmt: skip
        self.scatter.target_factory = self._new_target
        self.capture.stream_to(self.scatter)
        self.gradient_accumulation_steps = strategy.engine_layout.gradient_accumulation_steps
        self.scale = 1.0 / float(self.gradient_accumulation_steps)
        self.shard_buffer = shard_buffer
        """The bound target (a (K, shard_numel) tensor or K rows), or None (the adapter's own rows are used)."""
        self.micro_batches = 0
        """Backwards since the last :meth:`zero` (one per micro-batch)."""

    @property
    def num_objectives(self) -> int:
        """K."""
        return self.capture.num_objectives

    @contextlib.contextmanager
    def record(self, rows: int | None = None) -> Iterator[DeepSpeedOnePass]:
        """One micro-batch: run :meth:`forward` and :meth:`backward` inside."""
        with self.capture.record(rows):
            yield self

    def forward(self, *args, **kwargs):
        """The model's forward (``engine.module``), to be called inside :meth:`record`."""
        return self.engine.module(*args, **kwargs)

    def backward(self, seed: torch.Tensor, coefficients: torch.Tensor | RowCoefficients) -> None:
        """Backward of ``seed`` with (K, R) row coefficients, scaled like ``engine.backward`` (1/accumulation steps).

        Each parameter's K gradients are reduced into the step's shard rows during this backward.
        """
        self.capture.backward(seed, coefficients, self.scale)
        self.micro_batches += 1

    def _agree(self, result: SelfCheck) -> SelfCheck:
        """Each parameter's worst self-check error over all ranks, so every rank reaches the same verdict."""
        if not is_distributed():
            return result
        group = getattr(self.engine, "seq_data_parallel_group", None)
        device = collective_device(group)
        errors = torch.nan_to_num(result.errors, nan=math.inf).to(device)
        flags = torch.tensor([float(result.inconclusive), float(result.error is not None)], dtype=torch.float64,
                             device=device)  # fmt: skip
        packed = torch.cat([errors, flags])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        result.errors, result.inconclusive = packed[:-2].cpu(), bool(packed[-2] > 0)
        if packed[-1] > 0 and result.error is None:
            result.error = "another rank's capture pass failed on its batch (see that rank's log)"
        return result

    def _new_target(self) -> tuple[ShardRowsLike, bool]:
        # The step's first backward binds (and zeroes) the target; later micro-batches add into it.
        if self.shard_buffer is not None:
            return self.shard_buffer, False
        layout = self.shard_layout
        return torch.empty(self.num_objectives, layout.numel, dtype=torch.float32, device=layout.device), False

    def finish(self) -> None:
        """Finish the step's capture into the bound ``shard_buffer`` (what ``RacoHook.onepass`` runs on exit)."""
        if self.shard_buffer is None:
            raise RuntimeError("DeepSpeedOnePass.finish() needs a bound shard_buffer; use scatter_into(out)")
        m = self.gradient_accumulation_steps
        if self.micro_batches != m:
            raise RuntimeError(
                f"the one-pass step ran {self.micro_batches} micro-batch(es) but gradient_accumulation_steps is {m}: "
                "call op.backward() once per micro-batch, gradient_accumulation_steps times per step"
            )
        self.scatter_into(self.shard_buffer)

    def scatter_into(self, out: ShardRowsLike, *, accumulate: bool = False) -> None:
        """Finish the step's capture: ``out`` (K, shard_numel) holds each objective's averaged shard afterwards.

        The reductions already happened during the backwards. This checks that every
        rank issued them in the same order (one tiny all-reduce), copies the shards
        into ``out`` unless the backward streamed into ``out`` itself (the bound
        ``shard_buffer``: nothing to copy), gives every objective with a non-finite
        row coefficient NaN rows (so every rank skips the step), and leaves DeepSpeed
        as after a boundary backward (``ShardStrategy.finish_external_backward``, once
        per step), so the hook's usual write-back and ``engine.step()`` follow unchanged.
        ``accumulate`` adds into ``out`` instead (not possible for the bound buffer,
        which the step's first backward zeroed).
        """
        target = self.scatter.target
        self.scatter.check_order()
        rows = as_shard_rows(out, self.num_objectives, self.shard_layout.numel)
        if target is None:  # no backward since the last step: nothing was captured
            if not accumulate:
                for row in rows:
                    row.zero_()
        elif all(_same_tensor(a, b) for a, b in zip(target, rows)):
            if accumulate:
                raise ValueError("scatter_into(accumulate=True) into the bound shard_buffer: it was zeroed by the "
                                 "step's first backward; bind another buffer or pass accumulate=False")
        else:
            for row, captured in zip(rows, target):
                if accumulate:
                    row.add_(captured)
                else:
                    row.copy_(captured)
        for k in self.capture.nonfinite_objectives:
            rows[k].fill_(float("nan"))  # the Gram's diagonal then makes every rank skip the step
        self.scatter.unbind()
        self.strategy.finish_external_backward()

    def zero(self, shard_buffer: ShardRowsLike | None = None) -> None:
        """Start an optimizer step (or drop one half-way): forget what was captured; bind ``shard_buffer`` if given."""
        if shard_buffer is not None:
            self.shard_buffer = shard_buffer
        self.capture.zero()
        self.scatter.discard()
        self.micro_batches = 0

    def remove(self) -> None:
        """Remove the capture hooks from the model."""
        self.capture.remove()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
