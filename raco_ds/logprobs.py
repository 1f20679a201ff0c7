"""Summed log-probabilities of the response tokens of each row (docs/CONTRACTS.md).

Memory: the full ``log_softmax`` of (R, T, V) logits is another (R, T, V)
tensor (for a 150k vocabulary, gigabytes). We never build it: the log-prob of
the label token is ``logit[label] - logsumexp(logits)``, computed only on the
scored positions, in chunks of positions, so the temporary is at most
``chunk x V``. Low-precision logits are upcast to float32 chunk by chunk.
"""

from __future__ import annotations

import torch

__all__ = ["response_logps"]

# Scored positions per chunk: 4096 x 150k fp32 = 2.4 GB would be too much; 1024 x V is fine.
_CHUNK = 1024


def response_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk: int = _CHUNK,
    *,
    row_of_token: torch.Tensor | None = None,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sum_logps (R,), num_tokens (R,))`` over the response tokens of each row.

    ``response_mask[r, t]`` is True when token ``t`` of row ``r`` is scored; it
    is predicted by ``logits[r, t - 1]``. Position 0 has no predecessor and is
    never scored (prompts are never empty). ``sum_logps`` is float32 (or
    float64 for float64 logits) and differentiable; ``num_tokens`` is long.

    Packed rows (raco_ds.data.packing) hold several sequences: ``row_of_token``
    (same shape as ``input_ids``) names the output row of every token and
    ``num_rows`` the number of output rows R. A scored token's predecessor is in
    its own sequence (every sequence starts with a non-empty prompt), so each
    sequence is scored exactly as it would be alone in a padded row.

    >>> packed_ids = torch.tensor([[0, 1, 2, 3]])   # two sequences of two tokens in one row
    >>> segments = torch.tensor([[1, 1, 0, 0]])
    >>> s, n = response_logps(torch.zeros(1, 4, 4), packed_ids, torch.tensor([[False, True, False, True]]),
    ...                       row_of_token=segments, num_rows=2)
    >>> [round(v, 4) for v in s.tolist()], n.tolist()
    ([-1.3863, -1.3863], [1, 1])

    >>> logits = torch.zeros(1, 3, 4)          # uniform over 4 tokens
    >>> ids = torch.tensor([[0, 1, 2]])
    >>> mask = torch.tensor([[False, True, True]])
    >>> s, n = response_logps(logits, ids, mask)
    >>> round(s.item(), 4), n.item()            # 2 * log(1/4)
    (-2.7726, 2)
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits (R, T, V) with input_ids and response_mask (R, T); got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(response_mask.shape)}"
        )
    packed = row_of_token is not None
    if packed != (num_rows is not None) or (packed and row_of_token.shape != input_ids.shape):
        raise ValueError("pass row_of_token (shaped like input_ids) and num_rows together, or neither")
    rows = input_ids.shape[0] if num_rows is None else num_rows
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scored = response_mask[:, 1:].bool()
    physical_row, position = scored.nonzero(as_tuple=True)  # position p predicts token p + 1
    labels = input_ids[:, 1:][physical_row, position]
    row_of = row_of_token[:, 1:][physical_row, position] if packed else physical_row
    token_logps = []
    for start in range(0, row_of.numel(), chunk):
        rows_chunk, positions_chunk = physical_row[start : start + chunk], position[start : start + chunk]
        # Advanced indexing copies only the scored positions: (chunk, V), not (R, T, V).
        chunk_logits = logits[rows_chunk, positions_chunk].to(out_dtype)
        picked = chunk_logits.gather(-1, labels[start : start + chunk, None]).squeeze(-1)
        token_logps.append(picked - torch.logsumexp(chunk_logits, dim=-1))
    sums = torch.zeros(rows, dtype=out_dtype, device=logits.device)
    if token_logps:
        sums = sums.index_add(0, row_of, torch.cat(token_logps))
    else:
        sums = sums + logits.sum() * 0  # keep the graph connected for a batch with nothing to score
    if not packed:
        return sums, scored.sum(dim=1).long()
    return sums, torch.bincount(row_of, minlength=rows).long()
