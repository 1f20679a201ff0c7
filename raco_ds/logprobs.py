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
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, chunk: int = _CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sum_logps (R,), num_tokens (R,))`` over the response tokens of each row.

    ``response_mask[r, t]`` is True when token ``t`` of row ``r`` is scored; it
    is predicted by ``logits[r, t - 1]``. Position 0 has no predecessor and is
    never scored (prompts are never empty). ``sum_logps`` is float32 (or
    float64 for float64 logits) and differentiable; ``num_tokens`` is long.

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
    rows, length = input_ids.shape
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scored = response_mask[:, 1:].bool()
    row_of, position = scored.nonzero(as_tuple=True)  # position p predicts token p + 1
    labels = input_ids[:, 1:][row_of, position]
    token_logps = []
    for start in range(0, row_of.numel(), chunk):
        rows_chunk, positions_chunk = row_of[start : start + chunk], position[start : start + chunk]
        # Advanced indexing copies only the scored positions: (chunk, V), not (R, T, V).
        chunk_logits = logits[rows_chunk, positions_chunk].to(out_dtype)
        picked = chunk_logits.gather(-1, labels[start : start + chunk, None]).squeeze(-1)
        token_logps.append(picked - torch.logsumexp(chunk_logits, dim=-1))
    sums = torch.zeros(rows, dtype=out_dtype, device=logits.device)
    if token_logps:
        sums = sums.index_add(0, row_of, torch.cat(token_logps))
    else:
        sums = sums + logits.sum() * 0  # keep the graph connected for a batch with nothing to score
    return sums, scored.sum(dim=1).long()
