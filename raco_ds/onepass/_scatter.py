"""One-pass gradients reduced into each rank's gradient shard, streamed during the backward.

Framework-free (torch.distributed only): the shard is described by
:class:`FlatPartition` records that the training framework's adapter fills in
(for DeepSpeed, ``raco_ds.deepspeed.shards`` builds them with the hook's
``ShardLayout``: one source of truth for where each parameter's slice sits).

A parameter's K gradients need only its input and output gradient, so under
ZeRO-3 nothing is gathered to form them. :class:`OnePassCapture` hands each
parameter's (K, numel) gradients to a :class:`ShardScatter` as soon as they are
complete in the backward (:meth:`OnePassCapture.stream_to`); the scatter
reduces them, in buckets, straight into the rank's K shard rows
(adding across micro-batches) and frees them. The collectives are asynchronous:
up to ``max_in_flight`` of them run while the backward goes on (on NCCL they
overlap the backward's compute; gloo runs them on its own threads), and each is
waited for, and its result added into the shard, before more are issued. So a
rank holds at most about K x ((max_in_flight + 1) buckets + the largest
parameter) of full-size gradients at a time, plus the K shard rows, never K full
gradients.

Two partitionings, one scatter each:

- :class:`PaddedPartitionScatter` (ZeRO-3): each parameter is its own
  partition, padded to ``world * partition_size``; rank r owns
  ``[r * pn, (r + 1) * pn)``; the shard is the owned partitions back to back.
  A bucket is a (world, K, width) staging tensor, one ``reduce_scatter_tensor``;
  a parameter of a bucket's size or more goes alone (without a staging copy when it
  needs no padding: one reduce-scatter per objective straight from its gradient,
  into the shard itself when the step's target there is still zero).
- :class:`FlatPartitionScatter` (ZeRO-1/2): each parameter group is one flat
  tensor (parameters back to back, padded at the end) split into ``world``
  partitions of ``partition_size``; a parameter may straddle partitions. Per
  bucket, each owning rank receives its pieces by one ``reduce`` (as DeepSpeed's
  own ZeRO-2 does), so every element crosses the network once.

Ordering: every rank must issue these collectives in the same order. The
backward's order is deterministic for the same model and graph, and unused
parameters follow in registration order; :meth:`ShardScatter.check_order`
(once per optimizer step) all-reduces a hash of the issued sequence and raises
:class:`CollectiveOrderError` if the ranks differ.

Gradients are averaged over the data-parallel ranks and reduced in fp32.

Example (normally built by ``RacoHook.onepass`` through the hook's shard strategy)::

    scatter = PaddedPartitionScatter.build(capture, partitions, shard_numel, device=device)
    capture.stream_to(scatter)
    scatter.bind(rows)                     # zeroes them; later micro-batches add into them
    ...capture.backward(...) per micro-batch...
    scatter.check_order(); scatter.unbind()
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._capture import OnePassCapture

__all__ = ["BUCKET_NUMEL", "MAX_IN_FLIGHT", "CollectiveOrderError", "FlatPartition", "FlatPartitionScatter",
           "PaddedPartitionScatter", "ShardRowsLike", "ShardScatter", "as_shard_rows"]

logger = logging.getLogger(__name__)

# Full-parameter elements (per objective) per collective. Bounds the transient full-size gradients a
# rank holds at about K x 3 x this (plus the largest parameter): 1M elements = 4 MiB per objective in
# fp32, 8-16 MB per collective at K = 2-4 (past the size where NCCL reaches full bandwidth).
BUCKET_NUMEL = 1 << 20
"""Default full-parameter elements (per objective) per collective of a :class:`ShardScatter`."""
MAX_IN_FLIGHT = 1
"""Default collectives issued and not yet waited for: overlap vs. staging memory."""
# torch 2.13 renamed reduce_scatter_tensor (now a deprecated alias); older releases have only that name.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_HASH_MOD = (1 << 61) - 1  # a Mersenne prime: the order hash stays a positive int64


ShardRowsLike = torch.Tensor | Sequence[torch.Tensor]
"""Where the K shards go: a (K, shard_numel) tensor, or K separate 1-D tensors of shard_numel elements."""


def as_shard_rows(out: ShardRowsLike, num_objectives: int, shard_numel: int) -> list[torch.Tensor]:
    """``out`` as K 1-D row tensors (views), checked: K rows of ``shard_numel`` contiguous elements.

    >>> [tuple(r.shape) for r in as_shard_rows(torch.zeros(2, 3), 2, 3)]
    [(3,), (3,)]
    """
    if isinstance(out, torch.Tensor):
        rows = list(out) if out.dim() == 2 else []
    else:
        rows = list(out)
    if len(rows) != num_objectives or any(r.dim() != 1 or r.numel() != shard_numel or not r.is_contiguous() for r in rows):
        shapes = tuple(out.shape) if isinstance(out, torch.Tensor) else [tuple(r.shape) for r in rows]
        raise ValueError(f"shard buffer must be ({num_objectives}, {shard_numel}) or {num_objectives} contiguous rows of "
                         f"{shard_numel} elements, got {shapes}")
    return rows


class CollectiveOrderError(RuntimeError):
    """Ranks issued one-pass capture's reductions in different orders: this step's shards are invalid."""


@dataclass(frozen=True)
class FlatPartition:
    """Parameters flattened back to back, zero-padded to ``world * partition_size`` and cut into ``world`` partitions.

    Rank r owns elements ``[r * partition_size, (r + 1) * partition_size)`` of the
    flat tensor; that range sits at ``shard_offset`` in rank r's flat shard. ZeRO-3
    has one such partition per parameter, ZeRO-1/2 one per optimizer parameter
    group. Both the hook's per-parameter slices and the one-pass scatter are
    derived from these records.
    """

    names: tuple[str, ...]
    """The parameters' names (for error messages)."""
    params: tuple[torch.nn.Parameter, ...]
    """The parameters, in flat order."""
    numels: tuple[int, ...]
    """Each parameter's full (unpartitioned) element count."""
    partition_size: int
    """Elements per rank's partition."""
    shard_offset: int
    """Where this rank's partition starts in its flat shard (the same on every rank)."""
    group: object = None
    """The process group over which the partitions are spread (None: the default group)."""

    def owned(self, rank: int) -> list[tuple[int, int, int, int]]:
        """``(index, start, end, shard_offset)`` of each parameter with elements in ``rank``'s partition.

        ``[start, end)`` is the owned range of parameter ``index``'s flattened tensor and
        ``shard_offset`` where element ``start`` sits in the rank's shard.

        >>> FlatPartition(("a", "b"), (None, None), (3, 4), 4, 10).owned(1)
        [(1, 1, 4, 10)]
        """
        lo, hi = rank * self.partition_size, (rank + 1) * self.partition_size
        out, position = [], 0
        for i, numel in enumerate(self.numels):
            begin, finish = max(position, lo), min(position + numel, hi)
            if begin < finish:
                out.append((i, begin - position, finish - position, self.shard_offset + begin - lo))
            position += numel
        return out


@dataclass(frozen=True)
class _Param:
    """One parameter's place in the rank's shard (ZeRO-3) or in its group's flat tensor (ZeRO-1/2)."""

    index: int  # registration index in the capture (the order of the end-of-backward flush)
    numel: int
    partition_numel: int = 0  # ZeRO-3: pn
    shard_offset: int = 0  # ZeRO-3: column of the parameter's owned partition in the shard
    group: int = 0  # ZeRO-1/2: optimizer parameter group
    flat_offset: int = 0  # ZeRO-1/2: element offset in the group's flat tensor


@dataclass
class _InFlight:
    """Collectives issued and not yet waited for, what they read and write, and what to do once they are done."""

    works: list
    held_bytes: int  # transient bytes released at completion
    finish: Callable[[], None]
    tensors: list  # kept alive until the collectives complete


class ShardScatter(abc.ABC):
    """Reduce each complete parameter's (K, numel) gradients into K bound shard rows.

    The :class:`~raco_ds.onepass._capture.GradientSink` of a streaming
    :class:`OnePassCapture`. Build with a subclass's ``build``; :meth:`bind`
    the target before the step's first backward; :meth:`check_order` once per
    step after the last one. :meth:`scatter` is the non-streaming form (the
    capture accumulated full buffers; everything is reduced at once).

    ``peak_transient_bytes`` is the largest amount of full-size gradient memory
    (pending gradients + staging + collectives in flight) the scatter held at
    once since construction.
    """

    def __init__(self, capture: OnePassCapture, shard_numel: int, params: dict[int, _Param], *, group,
                 world_size: int, rank: int, device: torch.device, bucket_numel: int = BUCKET_NUMEL,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.capture = capture
        self.shard_numel = shard_numel
        self.params = params
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.device = device
        self.bucket_numel = max(1, int(bucket_numel))
        self.max_in_flight = max(0, int(max_in_flight))
        self.target: list[torch.Tensor] | None = None
        """The bound shard rows: K 1-D tensors of shard_numel elements (objective k's shard in row k)."""
        self.target_factory: Callable[[], tuple[ShardRowsLike, bool]] | None = None
        """Called for (buffer, accumulate) when a backward starts with nothing bound (the step's first)."""
        self.collectives = 0
        self.seconds = 0.0
        """Wall time spent staging and reducing (during the backwards, and in :meth:`scatter`), cumulative."""
        self.peak_transient_bytes = 0
        self._hash = 0
        self._live_bytes = 0
        self._in_flight: deque[_InFlight] = deque()
        self._target_fresh = False  # the bound target was zeroed and nothing was added since
        self._delivered: set[int] = set()  # direct-path parameters reduced into the target since bind()

    @classmethod
    def build(cls, capture: OnePassCapture, partitions: Sequence[FlatPartition], shard_numel: int, *,
              device: torch.device, bucket_numel: int = BUCKET_NUMEL, max_in_flight: int = MAX_IN_FLIGHT) -> ShardScatter:
        """The scatter that reduces ``capture``'s gradients into a shard of ``shard_numel`` described by ``partitions``.

        Every partitioned parameter must be one the capture tracks (``ValueError`` otherwise).
        """
        params, options = cls._placements(partitions, _capture_index(capture, partitions))
        return cls(capture, shard_numel, params, device=device, bucket_numel=bucket_numel,
                   max_in_flight=max_in_flight, **options)

    @classmethod
    @abc.abstractmethod
    def _placements(cls, partitions: Sequence[FlatPartition], index: dict[int, int]) -> tuple[dict[int, _Param], dict]:
        """Each parameter's place (keyed by ``id(param)``) and the constructor's process-group options."""

    @property
    def num_objectives(self) -> int:
        """K."""
        return self.capture.num_objectives

    # -- target and order ----------------------------------------------------------------------------
    def bind(self, out: ShardRowsLike, *, accumulate: bool = False) -> None:
        """Reduce into ``out`` from now on; zero it first unless ``accumulate``.

        ``out`` is a (K, shard_numel) tensor or K separate 1-D rows (e.g. K-1 rows of
        the hook's buffer and DeepSpeed's own gradient buffer, see ``RacoHook.capture_rows``).
        """
        rows = as_shard_rows(out, self.num_objectives, self.shard_numel)
        if not accumulate:
            for row in rows:
                row.zero_()
        self.target = rows
        self._target_fresh = not accumulate
        self._delivered = set()

    def unbind(self) -> None:
        """Forget the target (the step's shards are complete)."""
        self._wait_all()
        self.target = None

    def _zero_in_target(self, info: _Param) -> bool:
        # The parameter's slots in the bound target still hold the zeros bind() wrote.
        return self._target_fresh and info.index not in self._delivered

    # -- collectives in flight -------------------------------------------------------------------
    def _launch(self, works: list, *, held_bytes: int, finish: Callable[[], None], tensors: list) -> None:
        """Track asynchronous collectives; wait for the oldest while more than ``max_in_flight`` are out."""
        self._in_flight.append(_InFlight(works, held_bytes, finish, tensors))
        while len(self._in_flight) > self.max_in_flight:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        done = self._in_flight.popleft()
        for work in done.works:
            work.wait()
        done.finish()
        self._held(-done.held_bytes)

    def _reap(self) -> None:
        # Release finished collectives (oldest first) as soon as they are done, not only when the
        # next is issued: a large parameter's K gradients should not outlive their reduction.
        while self._in_flight and all(work.is_completed() for work in self._in_flight[0].works):
            self._complete_oldest()

    def _wait_all(self) -> None:
        while self._in_flight:
            self._complete_oldest()

    def _record(self, *keys: int) -> None:
        # Fold one collective (its parameter indices, destination, size) into the step's order hash.
        h = self._hash
        for key in (len(keys), *keys):
            h = (h * 1_000_003 + key + 1) % _HASH_MOD
        self._hash = h
        self.collectives += 1

    def check_order(self) -> None:
        """All-reduce the hash of this step's collective sequence; raise :class:`CollectiveOrderError` on a mismatch.

        One tiny collective per optimizer step. Every rank must call it (they all do, in ``scatter_into``).
        """
        self._wait_all()
        mine = self._hash
        self._hash = 0
        if self.world_size <= 1:
            return
        both = torch.tensor([mine, -mine], dtype=torch.int64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = int(both[0]), -int(both[1])
        if high != mine or low != mine:
            raise CollectiveOrderError(
                f"one-pass capture: the ranks reduced their gradients in different orders this step (rank "
                f"{self.rank}: order hash {mine}, range over ranks [{low}, {high}]); the shards are invalid. "
                "The backward must visit the same modules in the same order on every rank (no data-dependent "
                "control flow, same model code); otherwise use K-pass capture"
            )

    def discard(self) -> None:
        """Drop a step half-way (e.g. an exception in the backward): wait for what is in flight, forget staged gradients."""
        self._wait_all()
        self._drop_staged()
        self.target = None
        self._hash = 0

    @abc.abstractmethod
    def _drop_staged(self) -> None:
        """Forget gradients staged for a collective not issued yet, releasing their memory."""

    def _held(self, delta: int) -> None:
        self._live_bytes += delta
        self.peak_transient_bytes = max(self.peak_transient_bytes, self._live_bytes)

    # -- the sink ------------------------------------------------------------------------------------
    def on_final(self, param: torch.nn.Parameter, index: int, grad: torch.Tensor | None) -> None:
        """Take ``param``'s complete (K, numel) gradients of this backward (None = zeros); reduce when a bucket fills."""
        if self.target is None:
            if self.target_factory is None:
                raise RuntimeError("one-pass capture: no shard buffer bound (ShardScatter.bind() before the backward)")
            out, accumulate = self.target_factory()
            self.bind(out, accumulate=accumulate)
        info = self.params.get(id(param))
        if info is None:  # a trainable parameter the optimizer does not own (e.g. frozen by it): nothing to do
            return
        if grad is not None:
            grad = grad.reshape(self.num_objectives, -1)
            if grad.shape[1] != info.numel:
                raise AssertionError(f"one-pass capture: parameter {index} has {grad.shape[1]} gradient elements, expected {info.numel}")
        started = time.perf_counter()
        self._reap()
        self._add(info, grad)
        self.seconds += time.perf_counter() - started

    @abc.abstractmethod
    def _add(self, info: _Param, grad: torch.Tensor | None) -> None:
        """Stage one parameter's gradients (None = zeros) and reduce whatever bucket became full."""

    def end_backward(self) -> None:
        """Reduce what is still staged (the end of a backward), wait for every collective, release the staging."""
        started = time.perf_counter()
        self._end()
        self._wait_all()
        self.seconds += time.perf_counter() - started

    @abc.abstractmethod
    def _end(self) -> None:
        """Reduce the last partial bucket; free staging."""

    def scatter(self, out: torch.Tensor, *, accumulate: bool = False) -> None:
        """Non-streaming use: reduce the capture's accumulated (K, numel) buffers into ``out`` now.

        Same collectives as streaming (registration order), then :meth:`check_order`.
        """
        self.bind(out, accumulate=accumulate)
        for index, (_, p) in enumerate(self.capture.parameters):
            grad = self.capture.take(p)
            self.on_final(p, index, grad)
            del grad
        self.end_backward()
        self.check_order()
        self.unbind()


class PaddedPartitionScatter(ShardScatter):
    """One partition per parameter (ZeRO-3): a bucket is a (world, K, width) staging tensor and one reduce-scatter."""

    @classmethod
    def _placements(cls, partitions: Sequence[FlatPartition], index: dict[int, int]) -> tuple[dict[int, _Param], dict]:
        params = {}
        for part in partitions:
            if len(part.params) != 1:
                raise ValueError(f"PaddedPartitionScatter needs one parameter per partition, got {list(part.names)}")
            p = part.params[0]
            params[id(p)] = _Param(index[id(p)], part.numels[0], partition_numel=part.partition_size,
                                   shard_offset=part.shard_offset)
        group = partitions[0].group if partitions else None
        return params, {"group": group, "world_size": dist.get_world_size(group), "rank": dist.get_rank(group)}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        total = sum(p.partition_numel for p in self.params.values())
        # Staging columns per bucket (each column is one element of every rank's partition).
        self.width = max(1, min(math.ceil(self.bucket_numel / self.world_size), total))
        self._staging: torch.Tensor | None = None
        self._members: list[tuple[_Param, int]] = []
        self._cols = 0

    def _new_staging(self, width: int) -> torch.Tensor:
        staging = torch.empty(self.world_size, self.num_objectives, width, dtype=torch.float32, device=self.device)
        self._held(staging.numel() * 4)
        return staging

    def _place(self, block: torch.Tensor, info: _Param, grad: torch.Tensor | None) -> None:
        # block (world, K, pn): rank r's slot gets elements [r*pn, (r+1)*pn) of the zero-padded gradient.
        if grad is None:
            block.zero_()
            return
        pn, k = info.partition_numel, self.num_objectives
        whole, rest = divmod(info.numel, pn)
        if whole:
            block[:whole].copy_(grad[:, : whole * pn].reshape(k, whole, pn).transpose(0, 1))
        if rest:
            block[whole, :, :rest].copy_(grad[:, whole * pn :])
            block[whole, :, rest:].zero_()
            whole += 1
        if whole < self.world_size:
            block[whole:].zero_()

    def _add(self, info: _Param, grad: torch.Tensor | None) -> None:
        pn = info.partition_numel
        if self._cols and self._cols + pn > self.width:
            self._flush()
        if self.world_size == 1:  # a single rank: the gradient is the shard (None: zeros, nothing to add)
            if grad is not None:
                for row, objective_grad in zip(self.target, grad):
                    row[info.shard_offset : info.shard_offset + info.numel].add_(objective_grad.to(row))
            self._record(info.index, -1)
            return
        if pn >= self.width:  # a bucket's worth or more: alone
            if grad is not None and info.numel == self.world_size * pn and grad.is_contiguous():
                self._reduce_direct(info, grad)
            else:
                staging = self._new_staging(pn)
                self._place(staging, info, grad)
                del grad
                self._reduce(staging, [(info, 0)], pn)
            return
        if self._staging is None:
            self._staging = self._new_staging(self.width)
        self._place(self._staging[:, :, self._cols : self._cols + pn], info, grad)
        self._members.append((info, self._cols))
        self._cols += pn
        if self._cols == self.width:
            self._flush()

    def _reduce_direct(self, info: _Param, grad: torch.Tensor) -> None:
        # No padding: row k of the (K, world*pn) gradient is already the reduce-scatter input (no copy).
        # Averaging first lets the result land in the shard itself while the step's target there is zero.
        k, pn, target = self.num_objectives, info.partition_numel, self.target
        self._held(grad.numel() * grad.element_size())
        grad.mul_(1.0 / self.world_size)
        held = grad.numel() * grad.element_size()
        in_place = self._zero_in_target(info) and all(r.device == grad.device and r.dtype == grad.dtype for r in target)
        if in_place:
            rows = [row[info.shard_offset : info.shard_offset + pn] for row in target]
            finish: Callable[[], None] = lambda: None
        else:
            mine = torch.empty(k, pn, dtype=grad.dtype, device=grad.device)
            self._held(mine.numel() * mine.element_size())
            held += mine.numel() * mine.element_size()
            rows = list(mine)

            def finish() -> None:
                self._deliver(mine, [(info, 0)], scale=1.0)

        works = [_reduce_scatter(rows[j], grad[j], group=self.group, async_op=True) for j in range(k)]
        self._record(info.index, -1)
        self._delivered.add(info.index)
        self._launch(works, held_bytes=held, finish=finish, tensors=[grad, *rows])

    def _reduce(self, staging: torch.Tensor, members: list[tuple[_Param, int]], width: int) -> None:
        send = staging if staging.shape[2] == width else _compact(staging, width)
        mine = torch.empty(self.num_objectives, width, dtype=torch.float32, device=self.device)
        self._held(mine.numel() * 4)
        held = (staging.numel() + mine.numel()) * 4
        # 1-D views: backends check output.numel() * world == input.numel() (gloo aborts otherwise).
        work = _reduce_scatter(mine.view(-1), send.view(-1), group=self.group, async_op=True)
        self._record(*(info.index for info, _ in members))
        self._launch([work], held_bytes=held, finish=lambda: self._deliver(mine, members, scale=1.0 / self.world_size),
                     tensors=[staging, send, mine])

    def _deliver(self, mine: torch.Tensor, members: list[tuple[_Param, int]], *, scale: float) -> None:
        for row, objective_mine in zip(self.target, mine):
            objective_mine = objective_mine.to(row)
            for info, col in members:
                pn = info.partition_numel
                row[info.shard_offset : info.shard_offset + pn].add_(objective_mine[col : col + pn], alpha=scale)

    def _flush(self) -> None:
        if self._members:
            self._reduce(self._staging, self._members, self._cols)  # the staging travels with the collective
        elif self._staging is not None:
            self._held(-self._staging.numel() * 4)
        self._staging, self._members, self._cols = None, [], 0

    def _end(self) -> None:
        self._flush()

    def _drop_staged(self) -> None:
        if self._staging is not None:
            self._held(-self._staging.numel() * 4)
        self._staging, self._members, self._cols = None, [], 0


def _compact(staging: torch.Tensor, cols: int) -> torch.Tensor:
    """The first ``cols`` columns of a (world, K, width) staging tensor as a contiguous (world, K, cols) tensor, in place.

    A partly filled bucket; a ``.contiguous()`` copy would add a bucket's worth of memory.
    Row i moves from offset i*width to i*cols (never past row i+1's start, since cols <= width).

    >>> t = torch.arange(12.0).view(2, 1, 6)
    >>> _compact(t, 4).tolist()
    [[[0.0, 1.0, 2.0, 3.0]], [[6.0, 7.0, 8.0, 9.0]]]
    """
    world, k, width = staging.shape
    rows, flat = staging.view(world * k, width), staging.view(-1)
    for i in range(1, world * k):
        src = rows[i, :cols]
        if i * width < (i + 1) * cols:  # source and destination overlap: go through a copy of the row
            src = src.clone()
        flat[i * cols : (i + 1) * cols].copy_(src)
    return flat[: world * k * cols].view(world, k, cols)


class FlatPartitionScatter(ShardScatter):
    """One flat partition per parameter group (ZeRO-1/2): per bucket, each owning rank receives its pieces by one ``reduce``."""

    @classmethod
    def _placements(cls, partitions: Sequence[FlatPartition], index: dict[int, int]) -> tuple[dict[int, _Param], dict]:
        params, sizes, bases, groups = {}, [], [], []
        world, rank = 1, 0
        for i, part in enumerate(partitions):
            world, rank = dist.get_world_size(part.group), dist.get_rank(part.group)
            offset = 0
            for p, numel in zip(part.params, part.numels):
                params[id(p)] = _Param(index[id(p)], numel, group=i, flat_offset=offset)
                offset += numel
            sizes.append(part.partition_size)
            bases.append(part.shard_offset)
            groups.append(part.group)
        return params, {"group": groups[0] if groups else None, "world_size": world, "rank": rank,
                        "partition_sizes": sizes, "group_bases": bases, "groups": groups}

    def __init__(self, *args, partition_sizes: list[int], group_bases: list[int], groups: list, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # params: _Param.group indexes partition_sizes / group_bases / groups
        self.partition_sizes = partition_sizes
        self.group_bases = group_bases  # column of group i's partition in the shard (the same on every rank)
        self.groups = groups
        self._pending: list[tuple[_Param, torch.Tensor | None]] = []
        self._pending_numel = 0

    def _add(self, info: _Param, grad: torch.Tensor | None) -> None:
        if self._pending and (self._pending[0][0].group != info.group or self._pending_numel + info.numel > self.bucket_numel):
            self._flush()
        self._pending.append((info, grad))
        self._pending_numel += info.numel
        if grad is not None:
            self._held(grad.numel() * grad.element_size())
        if self._pending_numel >= self.bucket_numel:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        i = self._pending[0][0].group
        size, group, k = self.partition_sizes[i], self.groups[i], self.num_objectives
        for dst in range(self.world_size):  # the same destinations in the same order on every rank
            lo, hi = dst * size, (dst + 1) * size
            pieces = []
            for info, grad in self._pending:
                a, b = max(lo, info.flat_offset), min(hi, info.flat_offset + info.numel)
                if a < b:
                    pieces.append((info, grad, a, b))
            if not pieces:
                continue
            send = torch.zeros(k, sum(b - a for _, _, a, b in pieces), dtype=torch.float32, device=self.device)
            self._held(send.numel() * 4)
            col = 0
            for info, grad, a, b in pieces:
                if grad is not None:
                    send[:, col : col + b - a].copy_(grad[:, a - info.flat_offset : b - info.flat_offset])
                col += b - a
            work = dist.reduce(send, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group,
                               async_op=True)
            self._record(dst, *(info.index for info, _, _, _ in pieces))
            finish: Callable[[], None] = lambda: None
            if dst == self.rank:
                finish = self._receiver(send, [(a - lo, b - lo) for _, _, a, b in pieces], self.group_bases[i])
            self._launch([work], held_bytes=send.numel() * 4, finish=finish, tensors=[send])
            del send
        self._held(-sum(g.numel() * g.element_size() for _, g in self._pending if g is not None))
        self._pending, self._pending_numel = [], 0

    def _receiver(self, received: torch.Tensor, spans: list[tuple[int, int]], base: int) -> Callable[[], None]:
        # Once the reduce is done: add this rank's pieces (partition columns [a, b)) into its shard rows.
        def finish() -> None:
            for row, summed in zip(self.target, received):
                summed, col = summed.to(row), 0
                for a, b in spans:
                    row[base + a : base + b].add_(summed[col : col + b - a], alpha=1.0 / self.world_size)
                    col += b - a

        return finish

    def _end(self) -> None:
        self._flush()

    def _drop_staged(self) -> None:
        self._held(-sum(g.numel() * g.element_size() for _, g in self._pending if g is not None))
        self._pending, self._pending_numel = [], 0


def _capture_index(capture: OnePassCapture, partitions: Sequence[FlatPartition]) -> dict[int, int]:
    """Each partitioned parameter's registration index in ``capture``; every one must be tracked."""
    index = {id(p): i for i, (_, p) in enumerate(capture.parameters)}
    missing = [n for part in partitions for n, p in zip(part.names, part.params) if id(p) not in index]
    if missing:
        raise ValueError(f"one-pass capture does not track parameters the optimizer owns: {missing[:5]}")
    return index
