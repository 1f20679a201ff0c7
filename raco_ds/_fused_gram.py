"""The local Gram as one Triton reduction: each shard element read once for all K(K+1)/2 products.

Why a kernel: the Gram is memory-bound (K(K+1)/2 multiply-adds per K elements
read), but chunked matrix products read each chunk once per product and run
skinny GEMMs far below bandwidth (HOOKS.md: 25-90x the time to read the K shards
once on an H200). Here one program loads a block of every row, forms every
pair's products in float64 (an fp32 product is exact in float64 and GPUs built
for training run float64 at well above the rate this needs) and writes one
float64 partial per pair; the partials are summed in float64 afterwards. The
result matches ``local_gram``'s float64 path to summation order.

Imported only through :func:`raco_ds.gram.local_gram`, and only where Triton
imports. Under ``TRITON_INTERPRET=1`` (set before this module is imported)
the kernel runs on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK", "fused_gram"]

BLOCK = 1024
"""Elements per row per program: K rows x BLOCK fp32 values stay in registers / L1 for K <= 16."""


@triton.jit
def _pair_partials(shards, partials, numel, row_stride, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    # int64 offsets: a rank's shard of a large model exceeds 2**31 elements.
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    stride = row_stride.to(tl.int64)
    pairs: tl.constexpr = K * (K + 1) // 2
    for i in tl.static_range(K):
        xi = tl.load(shards + i * stride + offsets, mask=inside, other=0.0).to(tl.float64)
        for j in tl.static_range(i, K):
            # Row j was loaded by this program before (j > i) or just now: the re-read hits L1, not DRAM.
            xj = tl.load(shards + j * stride + offsets, mask=inside, other=0.0).to(tl.float64)
            pair = i * K - i * (i - 1) // 2 + (j - i)  # upper-triangle index, row-major
            tl.store(partials + pid * pairs + pair, tl.sum(xi * xj, axis=0))


def fused_gram(stacked: torch.Tensor) -> torch.Tensor:
    """(K, K) float64 Gram of a (K, n) tensor whose rows are contiguous (any row stride), on its device.

    ``n`` must be at least :data:`BLOCK` (smaller shards cost nothing on any path).
    """
    k, n = stacked.shape
    if n < BLOCK or stacked.stride(1) != 1:
        raise ValueError(f"fused_gram needs >= {BLOCK} contiguous columns per row, got shape {tuple(stacked.shape)} "
                         f"with strides {stacked.stride()}")  # fmt: skip
    blocks = triton.cdiv(n, BLOCK)
    partials = torch.empty(blocks, k * (k + 1) // 2, dtype=torch.float64, device=stacked.device)
    _pair_partials[(blocks,)](stacked, partials, n, stacked.stride(0), K=k, BLOCK=BLOCK)
    upper = partials.sum(0)
    gram = torch.zeros(k, k, dtype=torch.float64, device=stacked.device)
    rows, cols = torch.triu_indices(k, k, device=stacked.device)
    gram[rows, cols] = upper
    gram[cols, rows] = upper
    return gram
