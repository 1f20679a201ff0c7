"""The training batch: A and B of every pair in one padded tensor, plus labels (docs/CONTRACTS.md).

Rows ``[0, B)`` are response A of each pair and rows ``[B, 2B)`` response B,
so one forward scores both sides of every pair. Rows are right-padded (so
positions need no adjustment) to the longest row, optionally rounded up to a
multiple (tensor cores, sequence parallelism).

Padding-free batches (``PreferenceCollator(padding_free=True)``) keep the same
2B logical rows but pack their sequences into fewer physical rows
(raco_ds.data.packing); ``row_of_token`` maps tokens back to logical rows.
Forward any batch with ``model(**batch.model_inputs())`` and score it with
``batch.response_logps(logits)``: both work for either layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from raco_ds.data.packing import pack_rows
from raco_ds.data.tokenization import TokenizedPair
from raco_ds.logprobs import response_logps

__all__ = ["PreferenceBatch", "PreferenceCollator"]


@dataclass
class PreferenceBatch:
    """B preference pairs as 2B logical rows (the contract between the data layer and the trainer)."""

    input_ids: torch.Tensor
    """(2B, T) long: rows [0, B) are response A of each pair, rows [B, 2B) response B.
    Packed: (P, L), the 2B sequences packed into P <= 2B rows (see row_of_token)."""
    attention_mask: torch.Tensor
    """(2B, T) long: 1 on real tokens, 0 on right padding (packed: on sequence tokens; counting only,
    never passed to the model for a packed batch, see model_inputs)."""
    response_mask: torch.Tensor
    """(2B, T) bool: True on scored response tokens (token t is predicted from position t - 1)."""
    labels: torch.Tensor
    """(K, B) long in {+1 (A preferred), -1 (B preferred), 0 (tie / not this objective's pair)}."""
    pair_index: torch.Tensor
    """(B,) long: index of each pair in its dataset (the reference-cache key)."""
    objective_of_pair: torch.Tensor
    """(B,) long: owning objective for per-objective data, -1 for shared pairs."""
    reference_logps: torch.Tensor | None = None
    """(2B,) float: reference model's summed response log-probs per row, or None (computed later / not needed)."""
    position_ids: torch.Tensor | None = None
    """Packed only, (P, L) long: positions restarting at 0 for every sequence; None for a padded batch."""
    row_of_token: torch.Tensor | None = None
    """Packed only, (P, L) long: the logical row in [0, 2B) of each token, -1 on a packed row's pad tail."""
    cu_seq_lens: torch.Tensor | None = None
    """Packed only, (S + 1,) int32: segment boundaries over the flattened P * L tokens (flash-attention varlen)."""
    max_seq_len: int = 0
    """Packed only: the longest segment (flash-attention's max_seqlen)."""

    @property
    def num_pairs(self) -> int:
        """B, the number of pairs."""
        return int(self.pair_index.shape[0])

    @property
    def packed(self) -> bool:
        """True for a padding-free batch (several sequences per physical row)."""
        return self.position_ids is not None

    def model_inputs(self) -> dict[str, Any]:
        """The model's keyword inputs: ids and attention mask, or for a packed batch ids, positions and varlen kwargs.

        A packed batch carries no attention mask on purpose: transformers keeps
        packed sequences apart only when the mask is None (raco_ds.data.packing).
        """
        if not self.packed:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {
            "input_ids": self.input_ids, "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_seq_len, "max_length_k": self.max_seq_len,
        }  # fmt: skip

    def response_logps(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_logps (2B,), num_tokens (2B,))`` of the logical rows from the logits of ``model_inputs()``."""
        if not self.packed:
            return response_logps(logits, self.input_ids, self.response_mask)
        return response_logps(logits, self.input_ids, self.response_mask, row_of_token=self.row_of_token,
                              num_rows=2 * self.num_pairs)  # fmt: skip

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
        return PreferenceBatch(**moved)


@dataclass
class PreferenceCollator:
    """Collate :class:`TokenizedPair` items into a :class:`PreferenceBatch` (a picklable DataLoader collate_fn)."""

    pad_token_id: int
    """Token id written into padding (masked out by attention_mask and response_mask)."""
    num_objectives: int
    """K, the number of label rows."""
    reference_logps: torch.Tensor | None = None
    """(N, 2) cached reference log-probs indexed by pair_index (A, B), or None."""
    pad_to_multiple_of: int | None = None
    """Round T up to a multiple of this (None: the longest row)."""
    padding_free: bool = False
    """Pack the 2B sequences into fewer rows without padding between them (raco_ds.data.packing)."""

    def __call__(self, items: Sequence[TokenizedPair]) -> PreferenceBatch:
        if not items:
            raise ValueError("cannot collate an empty list of pairs")
        rows = [(item.prompt_ids, item.response_a_ids) for item in items]
        rows += [(item.prompt_ids, item.response_b_ids) for item in items]
        if self.padding_free:
            layout = pack_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
            tensors = {f.name: getattr(layout, f.name) for f in fields(layout)}
        else:
            tensors = self._pad(rows)
        labels = torch.tensor([item.labels for item in items], dtype=torch.long).T.contiguous()
        if labels.shape[0] != self.num_objectives:
            raise ValueError(
                f"pairs carry {labels.shape[0]} labels, the collator expects {self.num_objectives} objectives"
            )
        pair_index = torch.tensor([item.pair_index for item in items], dtype=torch.long)
        reference = None
        if self.reference_logps is not None:
            cached = self.reference_logps[pair_index]  # (B, 2): column 0 = A, column 1 = B
            reference = torch.cat([cached[:, 0], cached[:, 1]])
        return PreferenceBatch(
            labels=labels,
            pair_index=pair_index,
            objective_of_pair=torch.tensor([item.objective for item in items], dtype=torch.long),
            reference_logps=reference,
            **tensors,
        )

    def _pad(self, rows: Sequence[tuple[Any, Any]]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and response_mask of ``rows`` right-padded to one length."""
        length = max(len(p) + len(r) for p, r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        response_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for r, (prompt, response) in enumerate(rows):
            end = len(prompt) + len(response)
            input_ids[r, : len(prompt)] = torch.from_numpy(prompt).long()
            input_ids[r, len(prompt) : end] = torch.from_numpy(response).long()
            attention_mask[r, :end] = 1
            response_mask[r, len(prompt) : end] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
