"""One-pass capture for a DeepSpeed engine: the piece the RACO hook's capture seam plugs in.

``DeepSpeedOnePass`` ties together the model-side capture (:class:`OnePassCapture`,
one forward + one backward per micro-batch) and the communication
(:class:`ShardScatter`, one reduce-scatter per bucket of K-stacked gradients)
and fills a (K, shard_numel) buffer laid out like the hook's shard buffer.
It forms gradients only: the Gram, the solve and the write-back stay in the hook.

Which engines it runs on is decided once, at construction
(:func:`onepass_unsupported_reason`); elsewhere the caller falls back to K
passes and logs the reason once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from ._capture import OnePassCapture
from ._coefficients import RowCoefficients
from ._zero import ShardScatter, finish_engine_backward, make_shard_scatter

__all__ = ["DeepSpeedOnePass", "onepass_unsupported_reason"]

logger = logging.getLogger(__name__)
_logged: set[str] = set()


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

    Per optimizer step::

        onepass.zero()
        for micro_batch in micro_batches:                       # gradient_accumulation_steps of them
            with onepass.record():
                out = onepass.forward(input_ids=..., attention_mask=...)   # engine.module, see below
                ...compute the seed and the (K, R) row coefficients...
                onepass.backward(seed, coefficients)            # scaled by 1/gradient_accumulation_steps
        onepass.scatter_into(hook.shard_buffer)                 # (K, shard_numel), averaged over ranks
        hook.mark_captured(); hook.step()                       # Gram -> solve -> write -> engine.step()

    The forward goes through ``engine.module``, not ``engine``: DeepSpeed's
    forward hangs hooks on the outputs that start its own backward epilogue,
    which would try to reduce gradients that one-pass capture never asks
    autograd to produce. ZeRO-3 parameter gathering is per module and is unaffected.
    """

    def __init__(self, engine, num_objectives: int, shard_layout=None) -> None:
        reason = onepass_unsupported_reason(engine)
        if reason is not None:
            raise ValueError(f"one-pass capture cannot run on this engine: {reason}")
        if shard_layout is None:
            from raco_ds.deepspeed.layout import EngineLayout
            from raco_ds.deepspeed.shards import make_strategy

            shard_layout = make_strategy(engine, EngineLayout.from_engine(engine)).layout
        self.engine = engine
        self.layout = shard_layout
        self.capture = OnePassCapture(engine.module, num_objectives)
        self.scatter: ShardScatter = make_shard_scatter(engine, self.capture, shard_layout)
        self.scale = 1.0 / float(engine.gradient_accumulation_steps())

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
        """Backward of ``seed`` with (K, R) row coefficients, scaled like ``engine.backward`` (1/accumulation steps)."""
        self.capture.backward(seed, coefficients, self.scale)

    def scatter_into(self, out: torch.Tensor, *, accumulate: bool = False) -> None:
        """Reduce-scatter the accumulated K gradients into ``out`` (K, shard_numel); frees the full-size buffers.

        Also leaves DeepSpeed as after a boundary backward (:meth:`finish_engine_backward`), so the
        hook's usual write-back and ``engine.step()`` follow unchanged.
        """
        self.scatter.scatter(out, accumulate=accumulate)
        self.finish_engine_backward()

    def finish_engine_backward(self) -> None:
        """Leave DeepSpeed as after a boundary backward (ZeRO-3: the views ``step()`` reads; they alias the buffer
        the hook writes into, so this may run before or after the write-back)."""
        finish_engine_backward(self.engine)

    def zero(self) -> None:
        """Drop accumulated gradients (start of an optimizer step)."""
        self.capture.zero()

    def remove(self) -> None:
        """Remove the capture hooks from the model."""
        self.capture.remove()


def log_fallback_once(engine) -> str | None:
    """Log once per reason that one-pass capture falls back to K passes; return the reason (None = one pass)."""
    reason = onepass_unsupported_reason(engine)
    if reason is not None and reason not in _logged:
        _logged.add(reason)
        logger.warning("RACO capture: K passes per step (one-pass capture unavailable: %s)", reason)
    return reason
