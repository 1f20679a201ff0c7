"""One-pass gradients into DeepSpeed's shard layout: one reduce-scatter per bucket of K-stacked gradients.

A parameter's K gradients need only its input and output gradient, so under
ZeRO-3 nothing is gathered to form them. Each rank holds its local (K, numel)
gradients for its own rows; one reduce-scatter of the K-stacked, world-padded
tensors gives every rank its (K, n) slice, already in the layout the RACO
hook's shard buffer uses (``raco_ds.deepspeed.shards.ShardLayout``). Every rank
issues the same collectives in the same order (the capture's parameter order,
unused parameters included as zeros), so ranks whose batches touch different
parameters cannot deadlock.

Layouts (DeepSpeed 0.19, HOOKS.md):

- ZeRO-3: each parameter padded to ``world * partition_numel``; rank r owns
  ``[r * pn, (r + 1) * pn)``; the shard is the owned partitions back to back.
- ZeRO-1/2: each parameter group is one flat tensor (parameters in
  ``bit16_groups[i]`` order, padded at the end) split into ``world`` equal
  partitions of ``partition_size[i]``.
- ZeRO-0 (replicated shard): an all-reduce of the full (K, numel) gradients.

Gradients are averaged over the data-parallel ranks, as DeepSpeed does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._capture import OnePassCapture

__all__ = ["ShardScatter", "finish_engine_backward", "make_shard_scatter"]

logger = logging.getLogger(__name__)

# Elements (per objective) reduced in one collective; bounds the staging tensor to K x world x this.
_BUCKET_NUMEL = 1 << 24


def _reduce_scatter(output: torch.Tensor, stacked: torch.Tensor, group) -> None:
    """``output`` (K, n) = this rank's block of sum over ranks of ``stacked`` (world, K, n)."""
    # 1-D views: backends check output.numel() * world == input.numel() along dim 0 (gloo aborts otherwise).
    dist.reduce_scatter_tensor(output.view(-1), stacked.reshape(-1), group=group)


@dataclass
class _Piece:
    """One parameter's place in a bucket: its staging columns and where its owned slice goes in the shard."""

    param: torch.nn.Parameter
    flat_offset: int  # ZeRO-1/2: element offset of the parameter in its group's flat tensor
    shard_offset: int  # column in the (K, shard) buffer of the bucket's first owned element for this piece
    width: int  # owned columns per rank


class ShardScatter:
    """Reduce-scatter a :class:`OnePassCapture`'s (K, numel) gradients into a (K, shard_numel) buffer.

    Build with :func:`make_shard_scatter`. ``scatter(out)`` adds (or copies)
    objective k's averaged shard into ``out[k]`` and releases the capture's
    full-size buffers as it goes.
    """

    def __init__(self, capture: OnePassCapture, shard_numel: int, buckets: list[tuple[str, list[_Piece], int]],
                 *, world_size: int, rank: int, group=None, device: torch.device | None = None,
                 replicated: bool = False) -> None:
        self.capture = capture
        self.shard_numel = shard_numel
        self.buckets = buckets
        self.world_size = world_size
        self.rank = rank
        self.group = group
        self.device = device
        self.replicated = replicated

    def scatter(self, out: torch.Tensor, *, accumulate: bool = False) -> None:
        """Write (or add) each objective's averaged shard into ``out`` (K, shard_numel)."""
        k = self.capture.num_objectives
        if tuple(out.shape) != (k, self.shard_numel):
            raise ValueError(f"shard buffer must be ({k}, {self.shard_numel}), got {tuple(out.shape)}")
        if not accumulate:
            out.zero_()
        for kind, pieces, width in self.buckets:
            if kind == "replicated":
                self._scatter_replicated(out, pieces)
            elif kind == "zero3":
                self._scatter_zero3(out, pieces, width)
            else:
                self._scatter_zero12(out, pieces, width)

    def _full(self, p: torch.nn.Parameter, device: torch.device) -> torch.Tensor:
        return self.capture.pop_flat_gradient(p, device).to(device=device, dtype=torch.float32)

    def _scatter_zero3(self, out: torch.Tensor, pieces: list[_Piece], width: int) -> None:
        k, world = self.capture.num_objectives, self.world_size
        device = self.device or out.device
        staging = torch.zeros(world, k, width, dtype=torch.float32, device=device)
        column = 0
        for piece in pieces:
            pn = piece.width
            full = self._full(piece.param, device)
            padded = torch.zeros(k, world * pn, dtype=torch.float32, device=device)
            padded[:, : full.shape[1]] = full
            staging[:, :, column : column + pn] = padded.view(k, world, pn).transpose(0, 1)
            column += pn
        mine = torch.empty(k, width, dtype=torch.float32, device=device)
        _reduce_scatter(mine, staging, self.group)
        mine.div_(world)
        column = 0
        for piece in pieces:
            out[:, piece.shard_offset : piece.shard_offset + piece.width].add_(mine[:, column : column + piece.width].to(out))
            column += piece.width

    def _scatter_zero12(self, out: torch.Tensor, pieces: list[_Piece], partition_size: int) -> None:
        k, world = self.capture.num_objectives, self.world_size
        device = self.device or out.device
        flat = torch.zeros(k, world * partition_size, dtype=torch.float32, device=device)
        for piece in pieces:
            full = self._full(piece.param, device)
            flat[:, piece.flat_offset : piece.flat_offset + full.shape[1]] = full
        mine = torch.empty(k, partition_size, dtype=torch.float32, device=device)
        _reduce_scatter(mine, flat.view(k, world, partition_size).transpose(0, 1).contiguous(), self.group)
        mine.div_(world)
        base = pieces[0].shard_offset if pieces else 0
        out[:, base : base + partition_size].add_(mine.to(out))

    def _scatter_replicated(self, out: torch.Tensor, pieces: list[_Piece]) -> None:
        device = self.device or out.device
        for piece in pieces:
            full = self._full(piece.param, device)
            if self.world_size > 1:
                dist.all_reduce(full, group=self.group)
                full.div_(self.world_size)
            out[:, piece.shard_offset : piece.shard_offset + full.shape[1]].add_(full.to(out))


def make_shard_scatter(engine, capture: OnePassCapture, shard_layout, *, bucket_numel: int = _BUCKET_NUMEL) -> ShardScatter:
    """A :class:`ShardScatter` for ``engine`` whose shard is described by ``shard_layout``.

    ``shard_layout`` is the hook's ``raco_ds.deepspeed.shards.ShardLayout`` (the
    capture seam). The ZeRO stage is read from the optimizer type; every
    trainable parameter of the layout must be one the capture tracks.
    """
    opt = engine.optimizer
    tracked = {id(p) for _, p in capture.parameters}
    missing = [s.name for s in shard_layout.slices if id(s.param) not in tracked]
    if missing:
        raise ValueError(f"one-pass capture does not track parameters the optimizer owns: {missing[:5]}")
    name = type(opt).__name__
    if shard_layout.replicated:
        group = getattr(engine, "data_parallel_group", None)
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        pieces = [_Piece(s.param, 0, s.buffer_offset, s.numel) for s in shard_layout.slices]
        return ShardScatter(capture, shard_layout.numel, [("replicated", pieces, 0)], world_size=world,
                            rank=dist.get_rank(group) if world > 1 else 0, group=group, replicated=True)
    if name == "DeepSpeedZeroOptimizer_Stage3":
        group = opt.dp_process_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        by_param = {id(s.param): s for s in shard_layout.slices}
        buckets: list[tuple[str, list[_Piece], int]] = []
        current: list[_Piece] = []
        width = 0
        for sub_group in opt.fp16_groups:
            for p in sub_group:
                s = by_param[id(p)]
                pn = int(p.partition_numel())
                if current and (width + pn) > bucket_numel:
                    buckets.append(("zero3", current, width))
                    current, width = [], 0
                current.append(_Piece(p, 0, s.buffer_offset, pn))
                width += pn
        if current:
            buckets.append(("zero3", current, width))
        return ShardScatter(capture, shard_layout.numel, buckets, world_size=world, rank=rank, group=group)
    if name == "DeepSpeedZeroOptimizer":
        buckets = []
        base = 0
        world = rank = None
        group = None
        by_param = {id(s.param): s for s in shard_layout.slices}
        for i, params in enumerate(opt.round_robin_bit16_groups):  # the flat tensor's order
            group = opt.real_dp_process_group[i]
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            size = int(opt.partition_size[i])
            pieces, offset = [], 0
            for p in params:
                pieces.append(_Piece(p, offset, base, size))
                s = by_param.get(id(p))
                # Check our flat arithmetic against the hook's seam where this rank owns a slice.
                if s is not None and s.numel and s.buffer_offset - base != offset + s.start - rank * size:
                    raise AssertionError(f"ZeRO-1/2 flat layout mismatch for {s.name}: DeepSpeed's layout changed")
                offset += p.numel()
            buckets.append(("zero12", pieces, size))
            base += size
        return ShardScatter(capture, shard_layout.numel, buckets, world_size=world, rank=rank, group=group)
    raise ValueError(f"one-pass capture has no shard scatter for optimizer {name}; use K-pass capture")


def finish_engine_backward(engine) -> None:
    """Leave DeepSpeed as a boundary backward would, when the gradient came from one-pass capture.

    ZeRO-3 builds ``averaged_gradients`` (the views ``step()`` reads) in its
    backward epilogue, which never ran: run it (it reduces nothing, its buckets
    are empty); under optimizer offload also mark every parameter as reduced at
    this boundary so the write-back copies all of them to the host. Call it
    before the hook's write-back (``DeepSpeedOnePass.scatter_into`` does). Other
    stages need nothing here (the shard strategy's write() rebuilds their lists).
    """
    opt = engine.optimizer
    if type(opt).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        opt.independent_gradient_partition_epilogue()
        if getattr(opt, "offload_optimizer", False):
            # The offload boundary copy (_finalize_offload_gradient_accumulation, run by the hook's
            # write-back) only moves parameters whose gradient hook fired; none did. Every parameter
            # has a (possibly zero) one-pass gradient in the buffer.
            opt._offload_boundary_param_ids = {p.ds_id for group in opt.fp16_groups for p in group if p.requires_grad}
