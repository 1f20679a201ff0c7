"""Where a rank's gradient shard lives in DeepSpeed 0.19, one small strategy per optimizer family.

Every strategy implements the same small interface (HOOKS.md has the evidence, per
stage, with file:line references):

- ``begin_objective()``: make the engine's gradient buffer empty before an
  objective's first backward (DeepSpeed would otherwise add to, or leave stale,
  the previous objective's gradient);
- ``capture(out, accumulate)``: copy (or add) the rank's reduced shard into
  ``out``, one row of the hook's (K, shard_numel) buffer;
- ``clear()``: leave the engine clean after a capture;
- ``write(combined)``: put sum_k a_k S[k] where the optimizer's ``step()`` reads
  it, and refresh whatever DeepSpeed precomputed from the gradient (offload
  copies, per-parameter norms);
- ``discard()``: drop a step's gradients entirely (a skipped step) so that the
  next step starts clean;
- ``engine_pieces()`` / ``combine_in_place(own, others)``: read the shard where
  DeepSpeed left it and combine into it in place, so the step's last objective
  is never copied out (the hook's memory is (K-1) shards, see rows.py);
- ``onepass_scatter`` / ``finish_external_backward()``: which streaming scatter
  of ``raco_ds.onepass`` fills this shard from one backward (None: one-pass capture
  is not supported here), and what DeepSpeed needs afterwards (onepass.py).

What "the shard" is
-------------------
ZeRO 1-3: the rank's partition of the data-parallel-averaged gradient, padding
included (padding is kept at zero, so it adds nothing to the Gram). ZeRO 0 has
no partition: every rank holds the full averaged gradient, so there the shard IS
the full gradient and every rank holds the same rows (:attr:`ShardLayout.replicated`).
Summing the ranks' full Grams would count it N times, so at ZeRO 0 each rank
forms the Gram of its 1/N slice of the columns and the all-reduce adds those up:
the same exact Gram, and the Gram work is split across ranks as in ZeRO 1-3.

The capture seam (for one-pass capture, DESIGN.md s.6)
------------------------------------------------------
:class:`ShardLayout` describes the shard precisely enough to fill it from
outside DeepSpeed: for each parameter, ``buffer_offset`` (where its owned slice
starts in the flat shard), ``start``/``end`` (the owned range in the parameter's
flattened tensor; ZeRO-3 pads each parameter to ``world * partition_numel`` and
the rank owns ``[rank*partition_numel, (rank+1)*partition_numel)`` of the padded
tensor, of which ``[start, end)`` is real data), and ``numel = end - start``.
Everything in the flat shard not covered by a slice is padding and must stay 0.
On ZeRO 1-3 the slices are derived from ``partitions`` (one
:class:`~raco_ds.onepass.FlatPartition` per ZeRO-3 parameter or per ZeRO-1/2
parameter group: how the data-parallel ranks split the flat gradient), the same
records the one-pass scatter is built from, so the hook and the scatter cannot
disagree on the layout. ``RacoHook.onepass()`` (onepass.py) is the one-pass
capture that fills the shard; the Gram, the solve and the write-back do not change.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.distributed as dist

from raco_ds.deepspeed.layout import EngineLayout, OptimizerKind
from raco_ds.onepass import FlatPartition, FlatPartitionScatter, PaddedPartitionScatter, ShardScatter

__all__ = ["ParamSlice", "ShardLayout", "ShardStrategy", "make_strategy", "onepass_unsupported_reason"]


@dataclass(frozen=True)
class ParamSlice:
    """Where one parameter's owned range sits in the rank's flat shard."""

    name: str
    """Parameter name in ``engine.module.named_parameters()``."""
    param: torch.nn.Parameter
    """The parameter itself (under ZeRO-3 its ``ds_shape`` is the full shape)."""
    group: int
    """Optimizer parameter group index."""
    buffer_offset: int
    """Index in the flat shard of element ``start`` of the parameter's flattened gradient."""
    start: int
    """First owned element of the parameter's flattened (padded) tensor."""
    end: int
    """One past the last owned real element (``end - start`` elements; may be 0)."""

    @property
    def numel(self) -> int:
        """Owned real elements."""
        return self.end - self.start


@dataclass(frozen=True)
class ShardLayout:
    """The rank's flat gradient shard: its size, device and per-parameter slices."""

    numel: int
    """Elements in the flat shard, padding included."""
    device: torch.device
    """Where the engine keeps the shard (host memory under offload)."""
    slices: tuple[ParamSlice, ...]
    """Owned slices, in buffer order; the rest of the shard is zero padding."""
    replicated: bool
    """True at ZeRO 0: every rank's shard is the same full gradient (sum the Gram over one rank only)."""
    partitions: tuple[FlatPartition, ...] = ()
    """How the ranks split the flat gradient (ZeRO 1-3), in shard order; the slices are derived from it."""

    def padding_mask(self) -> torch.Tensor:
        """(numel,) bool, True where the shard holds padding (for tests and one-pass capture)."""
        mask = torch.ones(self.numel, dtype=torch.bool)
        for piece in self.slices:
            mask[piece.buffer_offset : piece.buffer_offset + piece.numel] = False
        return mask


class ShardStrategy(abc.ABC):
    """Capture / clear / write-back of the rank's gradient shard for one DeepSpeed optimizer family."""

    onepass_scatter: type[ShardScatter] | None = None
    """The ``raco_ds.onepass`` scatter that fills this shard from one backward; None: not supported."""

    def __init__(self, engine, engine_layout: EngineLayout) -> None:
        self.engine = engine
        self.optimizer = engine.optimizer
        self.engine_layout = engine_layout
        self._names = {id(p): n for n, p in engine.module.named_parameters()}
        self.shard_layout: ShardLayout = self._build_layout()
        """The rank's shard (``RacoHook.shard_layout``); ``engine_layout`` is the engine's configuration."""

    # -- the interface -------------------------------------------------------------------------
    @abc.abstractmethod
    def _build_layout(self) -> ShardLayout:
        """Describe the rank's shard (called once)."""

    @abc.abstractmethod
    def _pieces(self) -> list[torch.Tensor]:
        """Tensors that, concatenated in order, are the rank's current flat shard (views, not copies)."""

    def begin_objective(self) -> None:
        """Empty the engine's gradient before an objective's first backward."""
        self.clear()

    @abc.abstractmethod
    def clear(self) -> None:
        """Zero / drop the engine's gradient so the next backward starts from nothing."""

    def capture(self, out: torch.Tensor, accumulate: bool = False) -> None:
        """Copy (or add, for the per-micro-batch shared path) the rank's shard into ``out``."""
        offset = 0
        for piece in self._pieces():
            n = piece.numel()
            target = out.narrow(0, offset, n)
            source = piece.reshape(-1)
            if accumulate:
                target.add_(source)
            else:
                target.copy_(source)
            offset += n
        if offset != self.shard_layout.numel:
            raise AssertionError(
                f"captured {offset} elements, the shard has {self.shard_layout.numel}: DeepSpeed's layout changed"
            )

    def write(self, combined: torch.Tensor) -> None:
        """Put ``combined`` (the rank's shard of sum_k a_k g_k) where the optimizer's step() reads it."""
        offset = 0
        for piece in self._pieces():
            n = piece.numel()
            piece.copy_(combined.narrow(0, offset, n).view_as(piece))
            offset += n
        self._after_write(combined)

    def discard(self) -> None:
        """Drop this step's gradients (a skipped step); the engine must be ready for the next step."""
        self.clear()

    def engine_pieces(self) -> list[torch.Tensor]:
        """The engine's current shard as tensors that concatenate to it (views into DeepSpeed's buffers)."""
        return self._pieces()

    def flat_engine_shard(self) -> torch.Tensor | None:
        """The engine's shard as one persistent flat fp32 tensor an external capture may fill, or None.

        None where the engine keeps its gradient as per-step lists (ZeRO-0/1/2) or in another dtype.
        """
        return None

    def combine_in_place(self, own: float, others: list[tuple[float, torch.Tensor]]) -> None:
        """Turn the engine's shard g (the last objective, never copied out) into own*g + sum a_k S[k], in place.

        This is what keeps the hook's memory at (K-1) shards: the last objective's
        gradient is used where DeepSpeed left it, and the combination lands there.
        """
        offset = 0
        for piece in self._pieces():
            n = piece.numel()
            piece.mul_(own)
            for coefficient, row in others:
                piece.add_(row.narrow(0, offset, n).view_as(piece), alpha=coefficient)
            offset += n
        self._after_write(None)

    def _after_write(self, combined: torch.Tensor | None) -> None:
        """Refresh what DeepSpeed precomputed from the gradient (offload copies, norms); ``combined`` may be None."""

    def finish_external_backward(self) -> None:
        """Leave DeepSpeed as after a boundary backward when the shard was filled outside DeepSpeed's backward.

        Called once per step, after a one-pass capture filled the shard and before the write-back.
        Nothing to do where write() rebuilds what step() reads (ZeRO 1/2).
        """

    def _name(self, param) -> str:
        return self._names.get(id(param), f"<unnamed {tuple(param.shape)}>")

    def _partition_slices(self, partitions: list[FlatPartition], *, empty: bool = False) -> list[ParamSlice]:
        """The rank's owned slices of ``partitions`` (``empty``: also a zero-length slice for a parameter it owns none of)."""
        slices = []
        for g, part in enumerate(partitions):
            rank = dist.get_rank(group=part.group)
            owned = part.owned(rank)
            if empty and not owned:
                start = min(rank * part.partition_size, part.numels[0])
                owned = [(0, start, start, part.shard_offset)]
            for i, start, end, offset in owned:
                slices.append(ParamSlice(part.names[i], part.params[i], self._group_of(part, g), offset, start, end))
        return slices

    def _group_of(self, part: FlatPartition, index: int) -> int:
        """The optimizer parameter group of ``part`` (the index-th partition)."""
        return index


# ---------------------------------------------------------------------------------------------
class PlainDataParallel(ShardStrategy):
    """ZeRO 0: the optimizer is the bare torch optimizer; the averaged gradient is ``param.grad``.

    The shard is the full gradient (every rank holds it after DeepSpeed's
    boundary all-reduce), in optimizer-parameter order.
    """

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _build_layout(self) -> ShardLayout:
        slices, offset = [], 0
        for g, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    slices.append(ParamSlice(self._name(p), p, g, offset, 0, p.numel()))
                    offset += p.numel()
        device = self._params()[0].device
        return ShardLayout(offset, device, tuple(slices), replicated=True)

    def _pieces(self) -> list[torch.Tensor]:
        # A parameter no objective touched has no .grad: give it a zero gradient, as ZeRO does.
        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self._params()]

    def clear(self) -> None:
        for p in self._params():
            p.grad = None


# ---------------------------------------------------------------------------------------------
class _ZeroPartitionLayout:
    """Layout shared by the ZeRO-1/2 strategies (same partition bookkeeping with or without offload)."""

    def _zero12_layout(self: ShardStrategy) -> ShardLayout:
        # Each group's flat tensor holds its parameters in round_robin_bit16_groups order, padded at
        # the end, split into world partitions of partition_size (stage_1_and_2.py).
        opt = self.optimizer
        partitions, base = [], 0
        for i, params in enumerate(opt.round_robin_bit16_groups):
            size = int(opt.partition_size[i])
            partitions.append(FlatPartition(tuple(self._name(p) for p in params), tuple(params),
                                            tuple(p.numel() for p in params), size, base, opt.real_dp_process_group[i]))
            base += size
        slices = self._partition_slices(partitions)
        _check_against_zero12_bookkeeping(opt, slices, partitions)
        device = opt.single_partition_of_fp32_groups[0].device
        return ShardLayout(base, device, tuple(slices), replicated=False, partitions=tuple(partitions))


def _check_against_zero12_bookkeeping(opt, slices: list[ParamSlice], partitions: list[FlatPartition]) -> None:
    # DeepSpeed's own per-rank record of the same layout (params_in_partition, grad_start_offset,
    # grad_partition_insertion_offset): checked once, at hook construction.
    expected = []
    for i, params in enumerate(opt.params_in_partition):
        partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
        for p in params:
            pid = opt.get_param_id(p)
            start = int(opt.grad_start_offset[i][partition_id][pid])
            dest = int(opt.grad_partition_insertion_offset[i][partition_id][pid])
            n = int(min(p.numel() - start, int(opt.partition_size[i]) - dest))
            expected.append((id(p), i, partitions[i].shard_offset + dest, start, start + n))
    derived = [(id(s.param), s.group, s.buffer_offset, s.start, s.end) for s in slices]
    if derived != expected:
        raise AssertionError("ZeRO-1/2 flat layout differs from DeepSpeed's partition bookkeeping: DeepSpeed's layout "
                             "changed (re-check raco_ds/deepspeed/shards.py against HOOKS.md)")


class ZeroPartitioned(ShardStrategy, _ZeroPartitionLayout):
    """ZeRO 1/2 without offload: the shard is ``optimizer.averaged_gradients[i]`` per group.

    That is either a list of views into the parameters' accumulated gradients
    plus zero pads (stage_1_and_2.py:1046-1059), rebuilt at every boundary, or,
    for bf16 parameters with fp32 accumulation, a ``GradPartitionBufferGroup``
    whose ``flat_partition`` accumulates across backwards (hence the clear).
    """

    onepass_scatter = FlatPartitionScatter

    def _build_layout(self) -> ShardLayout:
        return self._zero12_layout()

    def _pieces(self) -> list[torch.Tensor]:
        opt, pieces = self.optimizer, []
        for i in range(len(opt.bit16_groups)):
            grads = opt.averaged_gradients.get(i)
            if grads is None:
                raise RuntimeError(
                    "RacoHook: DeepSpeed holds no reduced gradient for this objective. Every objective must "
                    "end on an accumulation boundary: call hook.backward() gradient_accumulation_steps times "
                    "inside `with hook.objective(k)`."
                )
            flat = getattr(grads, "flat_partition", None)
            if flat is not None:
                pieces.append(flat.view(-1))
                continue
            pieces.extend(grads)
            # The last rank's list may stop short of partition_size; step() pads it (flatten_dense_tensors_aligned).
            short = int(opt.partition_size[i]) - sum(t.numel() for t in grads)
            if short > 0:
                pad = torch.zeros(short, dtype=grads[0].dtype, device=grads[0].device)
                grads.append(pad)
                pieces.append(pad)
        return pieces

    def clear(self) -> None:
        opt = self.optimizer
        # Drop p.grad / p.grad_accum: with one forward and K backwards (shared path) nothing else
        # clears grad_accum between the objectives (engine.forward normally does).
        opt.zero_grad(set_to_none=True)
        for i in range(len(opt.bit16_groups)):
            opt.averaged_gradients[i] = None
            opt.all_grad_tensors[i] = None
        # ZeRO counts micro-steps from -1; the first backward of each objective must start afresh.
        opt.micro_step_id = -1

    def write(self, combined: torch.Tensor) -> None:
        # The last objective's lists were dropped by clear(); rebuild averaged_gradients in the shape
        # step() expects: per group, views of one flat partition, pads marked _zero_padding so that
        # the norm pairs each real view with its parameter (stage_1_and_2.py get_grad_norm_direct).
        opt, base = self.optimizer, 0
        for i in range(len(opt.bit16_groups)):
            size = int(opt.partition_size[i])
            segment = combined.narrow(0, base, size)
            if opt._use_compact_grad_partition_buffer(i):
                group = opt._build_compact_grad_partition_buffer(i)
                group.flat_partition.copy_(segment)
            else:
                flat = segment.to(opt.gradient_accumulation_dtype, copy=True)
                group = self._views(flat, [s for s in self.shard_layout.slices if s.group == i], base)
            opt.averaged_gradients[i] = group
            base += size

    @staticmethod
    def _views(flat: torch.Tensor, slices: list[ParamSlice], base: int) -> list[torch.Tensor]:
        views, position = [], 0
        for piece in slices:
            offset = piece.buffer_offset - base
            if offset > position:
                pad = flat.narrow(0, position, offset - position)
                pad._zero_padding = True
                views.append(pad)
            views.append(flat.narrow(0, offset, piece.numel))
            position = offset + piece.numel
        if position < flat.numel():
            pad = flat.narrow(0, position, flat.numel() - position)
            pad._zero_padding = True
            views.append(pad)
        return views


class ZeroPartitionedOffload(ShardStrategy, _ZeroPartitionLayout):
    """ZeRO 1/2 with ``offload_optimizer: cpu``: the shard is ``single_partition_of_fp32_groups[i].grad`` (host).

    DeepSpeed copies each parameter's reduced slice there at the boundary and
    records its norm in ``norm_for_param_grads``; the norms are recomputed after
    the write-back so that clipping sees the combined gradient.
    """

    onepass_scatter = FlatPartitionScatter

    def _build_layout(self) -> ShardLayout:
        return self._zero12_layout()

    def _pieces(self) -> list[torch.Tensor]:
        # The boundary's host copies are asynchronous on an accelerator; the shard is complete only after them.
        self.optimizer._wait_for_offload_copies()
        self._complete_boundary()
        return [g.grad.view(-1) for g in self.optimizer.single_partition_of_fp32_groups]

    def _complete_boundary(self) -> None:
        # Stock ZeRO-2 offload copies a parameter's accumulated gradient to the fp32 host partition only
        # when its gradient hook fires in the boundary micro-batch: a parameter that an objective's earlier
        # micro-batches touched but its last one did not would lose its gradient (measured: update error
        # 0.2). Copy those from where DeepSpeed accumulated them. Idempotent.
        opt = self.optimizer
        fired = set(opt.norm_for_param_grads)
        for piece in self.shard_layout.slices:
            pid = opt.get_param_id(piece.param)
            if pid in fired or pid not in opt._offload_accumulated_param_ids:
                continue
            i, source_offset, dest_offset, num_elements = opt.grad_position[pid]
            if opt._use_compact_grad_partition_buffer(i):
                source = opt.averaged_gradients[i].flat_partition.narrow(0, dest_offset, num_elements)
            else:
                source = opt.accumulated_grads_in_cpu[pid].view(-1).narrow(0, source_offset, num_elements)
            target = opt.single_partition_of_fp32_groups[i].grad.view(-1).narrow(0, dest_offset, num_elements)
            target.copy_(source)
            opt.norm_for_param_grads[pid] = target.to(torch.float32).norm(2)

    def clear(self) -> None:
        opt = self.optimizer
        opt._wait_for_offload_copies()
        opt.zero_grad(set_to_none=True)
        for g in opt.single_partition_of_fp32_groups:
            g.grad.zero_()
        # Micro-batch accumulation goes through per-parameter host buffers; a stale one would leak into
        # the next objective when a parameter is untouched by its first micro-batch.
        for buffer in opt.accumulated_grads_in_cpu.values():
            buffer.zero_()
        for i in range(len(opt.bit16_groups)):
            opt.averaged_gradients[i] = None
        opt.norm_for_param_grads = {}
        opt._offload_accumulated_param_ids = set()
        opt.micro_step_id = -1

    def _after_write(self, combined: torch.Tensor | None) -> None:
        opt = self.optimizer
        flat = (
            torch.cat([g.grad.view(-1) for g in opt.single_partition_of_fp32_groups]) if combined is None else combined
        )
        for piece in self.shard_layout.slices:
            view = flat.narrow(0, piece.buffer_offset, piece.numel)
            opt.norm_for_param_grads[opt.get_param_id(piece.param)] = view.to(torch.float32).norm(2)


class Zero3(ShardStrategy):
    """ZeRO 3: the shard is ``optimizer.grad_partitions_flat_buffer``, padded partitions back to back.

    ``partition_grads`` copies on the first micro-step and adds afterwards and
    touches only parameters that received a gradient (stage3.py:2012-2039), so
    the buffer is zeroed per objective. Under offload the boundary copy into
    ``fp32_partitioned_groups_flat[i].grad`` and the norms are redone after the
    write-back with ``_finalize_offload_gradient_accumulation`` (stage3.py:1467).
    """

    onepass_scatter = PaddedPartitionScatter

    def _build_layout(self) -> ShardLayout:
        # Every parameter is its own partition: padded to world * partition_numel, rank r owning
        # [r * pn, (r + 1) * pn); the rank's partitions back to back form the flat buffer.
        opt = self.optimizer
        partitions, self._group_index, offset = [], [], 0
        for g, group in enumerate(opt.fp16_groups):
            for p in group:
                pn = int(p.partition_numel())
                partitions.append(FlatPartition((self._name(p),), (p,), (int(p.ds_numel),), pn, offset,
                                                opt.dp_process_group))
                self._group_index.append(g)
                offset += pn
        buffer = opt.grad_partitions_flat_buffer
        if offset != buffer.numel():
            raise AssertionError(f"ZeRO-3 flat gradient buffer has {buffer.numel()} elements, layout {offset}")
        slices = self._partition_slices(partitions, empty=True)
        return ShardLayout(offset, buffer.device, tuple(slices), replicated=False, partitions=tuple(partitions))

    def _group_of(self, part: FlatPartition, index: int) -> int:
        return self._group_index[index]

    def _pieces(self) -> list[torch.Tensor]:
        return [self.optimizer.grad_partitions_flat_buffer]

    def flat_engine_shard(self) -> torch.Tensor | None:
        flat = self.optimizer.grad_partitions_flat_buffer
        return flat if flat.dtype == torch.float32 and flat.is_contiguous() else None

    def clear(self) -> None:
        opt = self.optimizer
        opt.grad_partitions_flat_buffer.zero_()
        opt.micro_step_id = 0
        if self.engine_layout.offload_optimizer:
            for flat in opt.fp32_partitioned_groups_flat:
                if flat.grad is not None:
                    flat.grad.zero_()

    def _after_write(self, combined: torch.Tensor | None) -> None:
        if self.engine_layout.offload_optimizer:
            # The boundary already copied the last objective's gradient to the fp32 host partition
            # and recorded its norms; redo both from the combined gradient.
            self.optimizer._finalize_offload_gradient_accumulation()

    def discard(self) -> None:
        self.clear()
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        opt._offload_boundary_param_ids = set()
        opt.norm_for_param_grads = {}

    def finish_external_backward(self) -> None:
        # ZeRO-3 builds averaged_gradients (the views step() reads; they alias the flat buffer) in its
        # backward epilogue, which never ran: run it (its buckets are empty, it reduces nothing).
        opt = self.optimizer
        opt.independent_gradient_partition_epilogue()
        if self.engine_layout.offload_optimizer:
            # The offload boundary copy (_finalize_offload_gradient_accumulation, run by the write-back)
            # moves only parameters whose gradient hook fired; none did, and every parameter has a
            # (possibly zero) gradient in the buffer.
            opt._offload_boundary_param_ids = {p.ds_id for group in opt.fp16_groups for p in group if p.requires_grad}


class Bf16ZeroOne(ShardStrategy):
    """ZeRO 1 with bf16 parameters and fp32 accumulation: DeepSpeed's ``BF16_Optimizer``.

    Every rank holds the full all-reduced fp32 gradient (``fp32_groups_gradients_flat``);
    the rank's shard is ``fp32_groups_gradient_flat_partition[i]``. The hook keeps
    only that partition per objective. ``step()`` takes the clip norm from the
    full buffer, so the write-back all-gathers the combined partitions into it
    (one all-gather of the gradient, the cost of ZeRO-1's parameter all-gather).
    """

    def _build_layout(self) -> ShardLayout:
        opt = self.optimizer
        partitions, base = [], 0
        for i, group in enumerate(opt.bf16_groups):
            size = opt.fp32_groups_gradient_flat_partition[i].numel()
            partitions.append(FlatPartition(tuple(self._name(p) for p in group), tuple(group),
                                            tuple(p.numel() for p in group), size, base, opt.real_dp_process_group[i]))
            base += size
        device = opt.fp32_groups_gradients_flat[0].device
        return ShardLayout(base, device, tuple(self._partition_slices(partitions)), replicated=False,
                           partitions=tuple(partitions))

    def _pieces(self) -> list[torch.Tensor]:
        return list(self.optimizer.fp32_groups_gradient_flat_partition)

    def clear(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _after_write(self, combined: torch.Tensor | None) -> None:
        opt = self.optimizer
        for i, full in enumerate(opt.fp32_groups_gradients_flat):
            # A copy: the input of the all-gather must not alias its output.
            mine = opt.fp32_groups_gradient_flat_partition[i].clone()
            dist.all_gather_into_tensor(full, mine, group=opt.real_dp_process_group[i])
            # Norm and clipping skip parameters flagged as gradient-less; the combination covers all.
            opt.fp32_groups_has_gradients[i] = [True] * len(opt.fp32_groups_has_gradients[i])


_STRATEGIES: dict[tuple[OptimizerKind, bool], type[ShardStrategy]] = {
    (OptimizerKind.PLAIN, False): PlainDataParallel,
    (OptimizerKind.ZERO_1_2, False): ZeroPartitioned,
    (OptimizerKind.ZERO_1_2, True): ZeroPartitionedOffload,
    (OptimizerKind.BF16_ZERO_1, False): Bf16ZeroOne,
    (OptimizerKind.ZERO_3, False): Zero3,
    (OptimizerKind.ZERO_3, True): Zero3,
}


def _strategy_class(engine_layout: EngineLayout) -> type[ShardStrategy]:
    key = (engine_layout.kind, engine_layout.offload_optimizer)
    if key not in _STRATEGIES:
        raise ValueError(f"RacoHook has no shard strategy for {engine_layout.describe()}")
    return _STRATEGIES[key]


def make_strategy(engine, engine_layout: EngineLayout) -> ShardStrategy:
    """The shard strategy for ``engine_layout`` (chosen once, at hook construction)."""
    return _strategy_class(engine_layout)(engine, engine_layout)


def onepass_unsupported_reason(engine_layout: EngineLayout) -> str | None:
    """None when one-pass capture can fill the shard of an engine with this layout, else why K passes are used."""
    if _strategy_class(engine_layout).onepass_scatter is None:
        return (f"ZeRO-{engine_layout.stage} ({engine_layout.kind.value}) has no one-pass shard scatter; "
                "supported: ZeRO-1/2 and ZeRO-3")
    return None
