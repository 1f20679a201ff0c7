"""One-pass capture for a DeepSpeed engine: the piece the RACO hook's capture seam plugs in.

``DeepSpeedOnePass`` ties together the model-side capture (:class:`OnePassCapture`,
one forward + one backward per micro-batch) and the communication
(:class:`ShardScatter`, which reduces each parameter's K-stacked gradients into the rank's shard
during the backward, as soon as they are complete)
and fills a (K, shard_numel) buffer laid out like the hook's shard buffer.
It forms gradients only: the Gram, the solve and the write-back stay in the hook.

Which engines it runs on is decided once, at construction
(:func:`onepass_unsupported_reason`); elsewhere the caller falls back to K
passes and logs the reason once.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch

import torch.distributed as dist

from ._capture import OnePassCapture, SelfCheck
from ._coefficients import RowCoefficients
from ._zero import (
    _BUCKET_NUMEL,
    _MAX_IN_FLIGHT,
    ShardRowsLike,
    ShardScatter,
    as_shard_rows,
    finish_engine_backward,
    make_shard_scatter,
)

__all__ = ["DeepSpeedOnePass", "onepass_unsupported_reason"]

logger = logging.getLogger(__name__)


def onepass_unsupported_reason(engine) -> str | None:
    """None when one-pass capture runs exactly on ``engine``, else why it falls back to K passes."""
    name = type(engine.optimizer).__name__
    stage = int(engine.zero_optimization_stage())
    if name not in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"):
        return f"optimizer {name} (ZeRO-{stage}) has no one-pass shard scatter; supported: ZeRO-1/2 and ZeRO-3"
    if engine.fp16_enabled():
        return "fp16 loss scaling is not supported by RACO"
    return None


class DeepSpeedOnePass:
    """All K objectives' gradient shards of a DeepSpeed step from one forward + one backward per micro-batch.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (ZeRO-1/2/3, fp32 or bf16, with or without optimizer offload).
        num_objectives: K.
        shard_layout: the hook's ``ShardLayout`` (``raco_ds.deepspeed.shards``); built from the
            engine when omitted.
        shard_buffer: where the backward streams the K shards: ``hook.capture_rows()`` (K-1 rows of
            the hook's buffer and DeepSpeed's own gradient buffer: the hook then adds (K-1) x shard,
            as with K passes), or any (K, shard_numel) tensor such as ``hook.shard_buffer``.
            Optional: without it the adapter keeps its own K shard rows and ``scatter_into`` copies
            them out (one extra K x shard transient).
        bucket_numel: full-parameter elements per objective per collective (memory vs. number of
            collectives: a rank holds about K x ((max_in_flight + 1) x this + the largest parameter)
            of full-size gradients).
        max_in_flight: reductions that may run asynchronously while the backward goes on (on NCCL
            they overlap its compute); each costs one bucket's staging. 0: every reduction waits.
        verify, verify_every: :class:`OnePassCapture`'s self-check against autograd, at the first
            :meth:`forward` and every ``verify_every`` steps; each parameter's worst error over all
            ranks decides, so every rank raises :class:`OnePassMismatchError` together or none does.

    Per optimizer step::

        rows = hook.capture_rows()                              # once: K shard rows
        onepass = DeepSpeedOnePass(engine, K, hook.shard_layout, shard_buffer=rows)  # once
        onepass.zero()
        for micro_batch in micro_batches:                       # gradient_accumulation_steps of them
            with onepass.record():
                out = onepass.forward(input_ids=..., attention_mask=...)   # engine.module, see below
                ...compute the seed and the (K, R) row coefficients...
                onepass.backward(seed, coefficients)            # streams each parameter's K gradients
                                                                # into the shard buffer as it completes
        onepass.scatter_into(rows)                              # finaliser: order check, engine epilogue
        hook.mark_captured(); hook.step()                       # Gram -> solve -> write -> engine.step()

    During the backward each parameter's (K, numel) gradients are reduced
    (averaged over ranks) into the rank's (K, shard) rows as soon as every use
    of the parameter has contributed, then freed (``raco_ds.onepass._zero``);
    unused parameters are reduced as zeros at the end of the backward, in
    registration order. ``scatter_into`` checks (one tiny all-reduce) that every
    rank issued the same sequence of reductions and raises
    :class:`~raco_ds.onepass._zero.CollectiveOrderError` otherwise.

    The forward goes through ``engine.module``, not ``engine``: DeepSpeed's
    forward hangs hooks on the outputs that start its own backward epilogue,
    which would try to reduce gradients that one-pass capture never asks
    autograd to produce. ZeRO-3 parameter gathering is per module and is unaffected.
    """

    def __init__(self, engine, num_objectives: int, shard_layout=None, *, shard_buffer: ShardRowsLike | None = None,
                 bucket_numel: int = _BUCKET_NUMEL, max_in_flight: int = _MAX_IN_FLIGHT, verify: bool = True,
                 verify_every: int = 0) -> None:
        reason = onepass_unsupported_reason(engine)
        if reason is not None:
            raise ValueError(f"one-pass capture cannot run on this engine: {reason}")
        if shard_layout is None:
            from raco_ds.deepspeed.layout import EngineLayout
            from raco_ds.deepspeed.shards import make_strategy

            shard_layout = make_strategy(engine, EngineLayout.from_engine(engine)).layout
        self.engine = engine
        self.layout = shard_layout
        self.capture = OnePassCapture(engine.module, num_objectives, verify=verify, verify_every=verify_every)
        self.capture.agree = self._agree
        self.scatter: ShardScatter = make_shard_scatter(engine, self.capture, shard_layout, bucket_numel=bucket_numel,
                                                          max_in_flight=max_in_flight)
        self.scatter.target_factory = self._new_target
        self.capture.stream_to(self.scatter)
        self.scale = 1.0 / float(engine.gradient_accumulation_steps())
        self.shard_buffer = shard_buffer
        """The bound target (a (K, shard_numel) tensor or K rows), or None (the adapter's own rows are used)."""

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

    def _agree(self, result: SelfCheck) -> SelfCheck:
        """Each parameter's worst self-check error over all ranks, so every rank reaches the same verdict."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return result
        group = getattr(self.engine, "seq_data_parallel_group", None)
        device = "cpu" if dist.get_backend(group) == "gloo" else torch.device(self.layout.device)
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
        return torch.empty(self.num_objectives, self.layout.numel, dtype=torch.float32, device=self.layout.device), False

    def backward(self, seed: torch.Tensor, coefficients: torch.Tensor | RowCoefficients) -> None:
        """Backward of ``seed`` with (K, R) row coefficients, scaled like ``engine.backward`` (1/accumulation steps).

        Each parameter's K gradients are reduced into the step's shard rows during this backward.
        """
        self.capture.backward(seed, coefficients, self.scale)

    def scatter_into(self, out: ShardRowsLike, *, accumulate: bool = False) -> None:
        """Finish the step's capture: ``out`` (K, shard_numel) holds each objective's averaged shard afterwards.

        The reductions already happened during the backwards. This checks that every
        rank issued them in the same order (one tiny all-reduce), copies the shards
        into ``out`` unless the backward streamed into ``out`` itself (the bound
        ``shard_buffer``: nothing to copy), and leaves DeepSpeed as after a boundary
        backward (:meth:`finish_engine_backward`), so the hook's usual write-back and
        ``engine.step()`` follow unchanged. ``accumulate`` adds into ``out`` instead
        (not possible for the bound buffer, which the step's first backward zeroed).
        """
        target = self.scatter.target
        self.scatter.check_order()
        rows = as_shard_rows(out, self.num_objectives, self.layout.numel)
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
        self.finish_engine_backward()

    def finish_engine_backward(self) -> None:
        """Leave DeepSpeed as after a boundary backward (ZeRO-3: the views ``step()`` reads; they alias the buffer
        the hook writes into, so this may run before or after the write-back)."""
        finish_engine_backward(self.engine)

    def zero(self, shard_buffer: ShardRowsLike | None = None) -> None:
        """Start an optimizer step: drop what was captured so far; bind ``shard_buffer`` from now on if given."""
        if shard_buffer is not None:
            self.shard_buffer = shard_buffer
        self.capture.zero()
        self.scatter.discard()

    def remove(self) -> None:
        """Remove the capture hooks from the model."""
        self.capture.remove()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
