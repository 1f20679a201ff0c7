"""The K x K Gram matrix of per-objective gradient shards, to float64 accuracy.

A rank holds ``shards``: K rows, one per objective, each its slice of that
objective's gradient. The Gram of the full gradients is the sum over ranks of
the local Grams, so only this K x K matrix ever crosses the network.

Accuracy: an fp32 Gram moves RACO's coefficients visibly (HOOKS.md), so the
products are formed chunk by chunk and summed in float64. On CPU each chunk is
converted to float64 (exact, and CPU float64 matmul is cheap); on CUDA the chunk
products are fp32 with TF32 disabled, summed in float64, which keeps the relative
error near 1e-7 without a float64 copy of the shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["local_gram"]

# Elements per row and chunk. CPU: the float64 copy of a chunk should stay in
# cache (K x 128K doubles; at 1M elements K = 4 ran 5x slower, measured).
# CUDA: fp32 partial products over 1M elements stay near 1e-7 relative (HOOKS.md).
_CPU_CHUNK = 1 << 17
_CUDA_CHUNK = 1 << 20


def local_gram(shards: torch.Tensor | Sequence[torch.Tensor], chunk: int | None = None) -> torch.Tensor:
    """Return ``S @ S.T`` in float64 for a K x n stack of gradient shards.

    ``shards`` is a 2-D tensor (K, n) or a sequence of K 1-D tensors of equal
    length. Padding elements must be zero (they then add nothing). ``chunk``
    (elements per row and product) defaults to what suits the device.

    >>> import torch
    >>> local_gram(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([[ 5., 11.],
            [11., 25.]], dtype=torch.float64)
    """
    stacked = shards if isinstance(shards, torch.Tensor) else torch.stack(list(shards))
    if stacked.dim() != 2:
        raise ValueError(f"local_gram expects a (K, n) tensor of shards, got shape {tuple(stacked.shape)}")
    k, n = stacked.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=stacked.device)
    if n == 0:
        return gram.cpu()
    exact_in_float64 = stacked.device.type == "cpu" or stacked.dtype == torch.float64
    if chunk is None:
        chunk = _CPU_CHUNK if stacked.device.type == "cpu" else _CUDA_CHUNK
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, n, chunk):
            block = stacked[:, start : start + chunk]
            if exact_in_float64:
                block = block.to(torch.float64)
                gram += block @ block.T
            else:
                block = block.to(torch.float32)
                gram += (block @ block.T).to(torch.float64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    gram = (gram + gram.T) / 2  # exact symmetry; rounding in the products may differ by an ulp
    return gram.cpu()
