"""The hook's per-objective shard rows: (K-1) copies plus the engine's own buffer.

Memory is the point. DeepSpeed already holds one shard-sized gradient buffer per
rank; the hook copies out every objective's shard except the LAST one of the
step, which it uses where DeepSpeed left it. So the hook adds (K-1) x shard x 4
bytes (the design's figure), and the combination sum_k a_k g_k is formed in
place in the engine's buffer (``ShardStrategy.combine_in_place``).

Where that is not possible the hook keeps all K rows (K x shard):

- the engine accumulates in bf16 (an in-place combination would round to bf16);
- shared-pair data with several micro-batches (every objective's later
  micro-batches need the engine's buffer cleared);
- an external capture asked for the full (K, shard) buffer (``shard_buffer``).

An external (one-pass) capture that asks for :meth:`ShardRows.capture_rows`
instead fills K-1 rows of the buffer and the engine's own flat shard, where
the engine keeps its shard as one flat buffer (ZeRO-3), so it too adds (K-1) shards.

The Gram over rows plus engine buffer is formed chunk by chunk through a small
(K, chunk) staging tensor, so there is never a K x shard float64 (or fp32) copy.
"""

from __future__ import annotations

import bisect

import torch

from raco_ds.deepspeed.shards import ShardStrategy
from raco_ds.gram import local_gram

__all__ = ["ShardRows"]

# Columns per Gram chunk when the last objective is read from the engine's pieces.
_CHUNK = 1 << 18


class ShardRows:
    """Which objective's shard is where (a row of the hook's buffer, or the engine), per step."""

    def __init__(self, strategy: ShardStrategy, num_objectives: int, keep_last_in_engine: bool) -> None:
        self.strategy = strategy
        self.num_objectives = num_objectives
        self.keep_last_in_engine = keep_last_in_engine and num_objectives > 1
        shard = strategy.shard_layout
        rows = num_objectives - 1 if self.keep_last_in_engine else num_objectives
        self.buffer = torch.zeros(rows, shard.numel, dtype=torch.float32, device=shard.device)
        self.row_of: dict[int, int] = {}
        self.in_engine: int | None = None
        self._external_last_in_engine = False  # capture_rows() handed out the engine's shard as the last row

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        """True when the buffer has a row for every objective (row k = objective k)."""
        return self.buffer.shape[0] == self.num_objectives

    def ensure_full(self) -> torch.Tensor:
        """Grow to K rows (row k = objective k); allowed only between steps."""
        if not self.full:
            if self.row_of or self.in_engine is not None:
                raise RuntimeError("the hook's shard buffer cannot grow to K rows in the middle of a step")
            if self._external_last_in_engine:
                # A capture holds the K-1 rows and the engine's buffer from capture_rows(); a new K-row
                # buffer would leave it filling rows that step() no longer reads.
                raise RuntimeError("the hook's shard rows were handed to a capture (capture_rows()); use those "
                                   "rows, not shard_buffer or K-pass capture, with this hook")
            self.buffer = torch.zeros(
                self.num_objectives, self.buffer.shape[1], dtype=self.buffer.dtype, device=self.buffer.device
            )
        return self.buffer

    def capture_rows(self) -> list[torch.Tensor]:
        """K 1-D fp32 rows for an external capture (row k = objective k); allowed only between steps.

        The last row is the engine's own flat shard when the last objective may stay in the
        engine and the engine keeps its shard as one flat fp32 buffer; otherwise the buffer
        grows to K rows. Fill every row, then :meth:`mark_captured`.
        """
        if self.row_of or self.in_engine is not None:
            raise RuntimeError("the hook's shard rows cannot be handed to a capture in the middle of a step")
        engine = self._engine_flat_shard()
        if self.keep_last_in_engine and not self.full and engine is not None:
            self._external_last_in_engine = True
            return [*self.buffer, engine]
        return list(self.ensure_full())

    def release_capture_rows(self) -> None:
        """The capture that :meth:`capture_rows` served is gone: per-objective passes may use these rows again."""
        if self.row_of or self.in_engine is not None:
            raise RuntimeError("the hook's shard rows cannot be released in the middle of a step")
        self._external_last_in_engine = False

    def _engine_flat_shard(self) -> torch.Tensor | None:
        flat = self.strategy.flat_engine_shard()
        if flat is None or flat.numel() != self.buffer.shape[1] or flat.device != self.buffer.device:
            return None
        return flat.view(-1)

    def can_stay_in_engine(self) -> bool:
        """True when the objective being finished now may stay in the engine's buffer (it is the last)."""
        return self.keep_last_in_engine and not self.full and len(self.row_of) == self.num_objectives - 1

    def row_for(self, k: int) -> torch.Tensor:
        """The buffer row that objective k's shard goes to (assigned on first use)."""
        if k not in self.row_of:
            self.row_of[k] = k if self.full else len(self.row_of)
        return self.buffer[self.row_of[k]]

    def stay_in_engine(self, k: int) -> None:
        """Objective k's shard is left in the engine's buffer for this step."""
        self.in_engine = k

    def reset(self) -> None:
        """Start a new step."""
        self.row_of.clear()
        self.in_engine = None

    def mark_captured(self) -> None:
        """An external capture filled every row it was given (:meth:`capture_rows` or the full buffer)."""
        if self._external_last_in_engine and not self.full:
            last = self.num_objectives - 1
            self.row_of = {k: k for k in range(last)}
            self.in_engine = last
            return
        self.ensure_full()
        self.row_of = {k: k for k in range(self.num_objectives)}
        self.in_engine = None

    # -- the step's math -----------------------------------------------------------------------------
    def gram(self, lo: int, hi: int) -> torch.Tensor:
        """float64 (K, K) Gram of columns [lo, hi) of the K objectives' shards (objective order)."""
        if self.in_engine is None and self.full and all(self.row_of.get(k) == k for k in range(self.num_objectives)):
            return local_gram(self.buffer[:, lo:hi])
        spans = self._engine_spans() if self.in_engine is not None else []
        starts = [start for start, _ in spans]
        width = min(_CHUNK, max(hi - lo, 1))
        stage = torch.empty(self.num_objectives, width, dtype=torch.float32, device=self.buffer.device)
        total = torch.zeros(self.num_objectives, self.num_objectives, dtype=torch.float64)
        for c0 in range(lo, hi, width):
            c1 = min(c0 + width, hi)
            for k in range(self.num_objectives):
                target = stage[k, : c1 - c0]
                if k == self.in_engine:
                    _gather(spans, starts, c0, c1, target)
                else:
                    target.copy_(self.buffer[self.row_of[k], c0:c1])
            total += local_gram(stage[:, : c1 - c0])
        return total

    def combine_and_write(self, coefficients: torch.Tensor) -> None:
        """Write sum_k a_k S[k] into the engine (in place when the last objective is still there)."""
        a = [float(x) for x in coefficients]
        if self.in_engine is not None:
            others = [(a[k], self.buffer[self.row_of[k]]) for k in range(self.num_objectives) if k != self.in_engine]
            self.strategy.combine_in_place(a[self.in_engine], others)
            return
        # In place in objective 0's row: the rows are dead after the step (no extra shard allocation).
        combined = self.buffer[self.row_of[0]].mul_(a[0])
        for k in range(1, self.num_objectives):
            combined.add_(self.buffer[self.row_of[k]], alpha=a[k])
        self.strategy.write(combined)

    def _engine_spans(self) -> list[tuple[int, torch.Tensor]]:
        spans, offset = [], 0
        for piece in self.strategy.engine_pieces():
            spans.append((offset, piece.reshape(-1)))
            offset += piece.numel()
        return spans


def _gather(spans: list[tuple[int, torch.Tensor]], starts: list[int], c0: int, c1: int, out: torch.Tensor) -> None:
    # Copy columns [c0, c1) of the engine's shard (given as consecutive pieces) into out.
    index = max(bisect.bisect_right(starts, c0) - 1, 0)
    while index < len(spans) and spans[index][0] < c1:
        start, flat = spans[index]
        lo, hi = max(start, c0), min(start + flat.numel(), c1)
        if lo < hi:
            out[lo - c0 : hi - c0].copy_(flat[lo - start : hi - start])
        index += 1
