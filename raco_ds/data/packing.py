"""Padding-free batches: a micro-batch's 2B sequences packed into a few rows, with no padding between them.

Why: a padded batch pays compute and activation memory for every row up to the
longest one, and preference data has a long tail of response lengths
(benchmarks/padding_free.py measures how much of a HelpSteer batch is padding).

Layout (:func:`pack_rows`): sequence r (prompt + response of logical row r,
r in [0, 2B) as in :class:`~raco_ds.data.batch.PreferenceBatch`) is placed,
longest first, into the first packed row with room for it; a packed row holds
``L`` tokens, the longest sequence (rounded up to ``pad_to_multiple_of``), so
no sequence is split and no packed row is longer than the padded batch's rows.
Inside a packed row each sequence restarts its positions at 0, and what is left
at the row's end is one pad segment (positions from 0 as well, scoring nothing).

How the model keeps the sequences apart (transformers 5.x, no attention_mask):

- flash_attention_2/3: the precomputed varlen kwargs ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` over the flattened ``P * L`` tokens (every segment, pad
  tails included, is its own sequence) select ``flash_attn_varlen_func``;
  precomputing them spares the per-layer device sync of inferring them from
  position ids.
- sdpa / eager / flex: ``masking_utils`` finds the segments from
  ``position_ids`` (a position that does not follow its predecessor starts a
  segment) and builds a block-diagonal causal mask per packed row; the extra
  flash kwargs are ignored there.

An ``attention_mask`` passed as well would switch both mechanisms off (flash
unpads by the mask, the mask builder only looks for packing when the mask is
None) and every sequence would attend to the ones before it in its row: always
forward a batch with ``batch.model_inputs()``. Models whose attention ignores
position-id packing (linear attention or convolutions, e.g. Qwen3-Next) need
padded batches; :func:`check_packed_forward` catches such a model on the first
micro-batch instead of training on mixed sequences.

One-pass capture assigns gradients per row and cannot split a packed row into
its sequences: the trainer runs K passes for packed batches
(:data:`ONEPASS_REFUSAL`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from raco_ds.data.records import DataError

__all__ = ["ONEPASS_REFUSAL", "PackedLayout", "PackingMismatchError", "check_packed_forward", "pack_rows"]

ONEPASS_REFUSAL = (
    "data.padding_free packs several sequences into one row, and one-pass capture splits gradients by row, "
    "not by packed sequence; set --data.padding_free false to use one pass, or --capture k_pass"
)
"""Why one-pass capture refuses packed batches (the trainer's capture choice reports it)."""


class PackingMismatchError(DataError):
    """The model scores a packed batch differently from the same batch padded (its attention mixes sequences).

    A DataError, so the launcher reports it as a user error: one line naming the fix, exit status 2.
    """


@dataclass
class PackedLayout:
    """Where each of R sequences sits in a (P, L) packed tensor (CPU tensors; :func:`pack_rows` builds it)."""

    input_ids: torch.Tensor
    """(P, L) long: the sequences' tokens, pad tokens after the last sequence of each row."""
    position_ids: torch.Tensor
    """(P, L) long: 0, 1, ... restarting at every sequence and at each row's pad tail."""
    attention_mask: torch.Tensor
    """(P, L) long: 1 on sequence tokens, 0 on pad tails (for counting tokens; never passed to the model)."""
    response_mask: torch.Tensor
    """(P, L) bool: True on scored response tokens."""
    row_of_token: torch.Tensor
    """(P, L) long: the logical row (sequence index in [0, R)) of each token, -1 on pad tails."""
    cu_seq_lens: torch.Tensor
    """(S + 1,) int32: segment boundaries over the flattened P * L tokens (sequences and pad tails)."""
    max_seq_len: int
    """Length of the longest segment (flash-attention's max_seqlen)."""


def _assign(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: packed rows as lists of sequence indices (deterministic: ties keep input order)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((p for p, room in enumerate(free) if room >= lengths[index]), None)
        if target is None:
            rows.append([])
            free.append(capacity)
            target = len(rows) - 1
        rows[target].append(index)
        free[target] -= lengths[index]
    return rows


def pack_rows(
    sequences: Sequence[tuple[np.ndarray, np.ndarray]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> PackedLayout:
    """Pack ``(prompt_ids, response_ids)`` sequences into rows of the longest sequence's length.

    >>> seqs = [(np.array([1, 2]), np.array([3])), (np.array([4]), np.array([5, 6, 7])), (np.array([8]), np.array([9]))]
    >>> packed = pack_rows(seqs, pad_token_id=0)
    >>> packed.input_ids.tolist()  # longest first; the 2-token sequence does not fit after the 3-token one
    [[4, 5, 6, 7], [1, 2, 3, 0], [8, 9, 0, 0]]
    >>> packed.position_ids.tolist(), packed.row_of_token.tolist()
    ([[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]], [[1, 1, 1, 1], [0, 0, 0, -1], [2, 2, -1, -1]])
    >>> packed.cu_seq_lens.tolist(), packed.max_seq_len
    ([0, 4, 7, 8, 10, 12], 4)
    """
    if not sequences:
        raise ValueError("cannot pack an empty list of sequences")
    lengths = [len(prompt) + len(response) for prompt, response in sequences]
    if any(len(prompt) == 0 for prompt, _ in sequences):
        # Token t is scored from position t - 1 of the same sequence; a sequence's first token has none.
        raise ValueError("every packed sequence needs a non-empty prompt (its first token is never scored)")
    capacity = max(lengths)
    if pad_to_multiple_of:
        capacity = -(-capacity // pad_to_multiple_of) * pad_to_multiple_of
    rows = _assign(lengths, capacity)
    shape = (len(rows), capacity)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.bool)
    row_of_token = torch.full(shape, -1, dtype=torch.long)
    segment_lengths: list[int] = []
    for p, members in enumerate(rows):
        start = 0
        for index in members:
            prompt, response = sequences[index]
            end, mid = start + lengths[index], start + len(prompt)
            input_ids[p, start:mid] = torch.from_numpy(np.asarray(prompt)).long()
            input_ids[p, mid:end] = torch.from_numpy(np.asarray(response)).long()
            position_ids[p, start:end] = torch.arange(lengths[index])
            attention_mask[p, start:end] = 1
            response_mask[p, mid:end] = True
            row_of_token[p, start:end] = index
            segment_lengths.append(lengths[index])
            start = end
        if start < capacity:  # the pad tail is a segment of its own, so nothing attends across it
            position_ids[p, start:] = torch.arange(capacity - start)
            segment_lengths.append(capacity - start)
    cu_seq_lens = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.tensor(segment_lengths).cumsum(0)
    return PackedLayout(input_ids, position_ids, attention_mask, response_mask, row_of_token, cu_seq_lens,
                        max(segment_lengths))  # fmt: skip


@torch.no_grad()
def check_packed_forward(model: Any, items: Sequence[Any], collator: Any, rtol: float = 1e-3) -> float:
    """Raise :class:`PackingMismatchError` unless ``model`` scores ``items`` packed as it scores them padded.

    ``items`` are :class:`~raco_ds.data.tokenization.TokenizedPair` s and
    ``collator`` a :class:`~raco_ds.data.batch.PreferenceCollator`, used both
    ways. Returns the error: the largest difference of a row's summed response
    log-prob over ``1 + |log-prob|``. Rounding (bf16 included) stays far below
    ``rtol``; attention across sequences does not (a model that ignores the
    packing scores a row's later sequences given the earlier ones). Two no-grad
    forwards in eval mode: under ZeRO-3 every rank must call it.
    """
    device = getattr(model, "device", None) or next(model.parameters()).device
    padded = replace(collator, padding_free=False, reference_logps=None)(items).to(device)
    packed = replace(collator, padding_free=True, reference_logps=None)(items).to(device)
    was_training = model.training
    model.eval()  # dropout would differ between the two forwards
    try:
        want = padded.response_logps(model(**padded.model_inputs(), use_cache=False).logits)[0]
        got = packed.response_logps(model(**packed.model_inputs(), use_cache=False).logits)[0]
    finally:
        model.train(was_training)
        if hasattr(model, "empty_partition_cache"):
            model.empty_partition_cache()  # ZeRO-3: release what a no-grad forward prefetched and never used
    error = float(((got - want).abs() / (1 + want.abs())).max())
    if not error <= rtol:  # also catches NaN
        raise PackingMismatchError(
            f"data.padding_free: {type(getattr(model, 'module', model)).__name__} scores packed sequences differently "
            f"from padded ones (relative log-prob error {error:.2e} > {rtol:g}): its attention does not keep the "
            f"sequences of a packed row apart (it must honour position_ids packing, as transformers' Llama-style "
            f"models do with sdpa, eager and flash_attention_2); set --data.padding_free false"
        )
    return error
