"""The K x K Gram matrix of per-objective gradient shards, to float64 accuracy.

A rank holds ``shards``: K rows, one per objective, each its slice of that
objective's gradient. The Gram of the full gradients is the sum over ranks of
the local Grams, so only this K x K matrix ever crosses the network.

Accuracy: an fp32 Gram moves RACO's coefficients visibly (HOOKS.md), so every
method sums in float64. Methods (``local_gram(method=...)``):

- ``"float64"``: chunks converted to float64, float64 products (exact; CPU float64
  matmul is cheap). The default on CPU and for float64 shards.
- ``"fp32_chunks"``: fp32 chunk products with TF32 off, summed in float64 (relative
  error near 1e-7, no float64 copy of the shard). The default on CUDA without Triton.
- ``"fused"``: one Triton reduction reading each element once for all K(K+1)/2
  products in float64 (``raco_ds._fused_gram``): as exact as ``"float64"`` and, unlike
  chunked matrix products, near the time to read the shards once. The default on
  CUDA where Triton imports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["GramMethod", "fused_gram_available", "local_gram"]

GramMethod = Literal["auto", "float64", "fp32_chunks", "fused"]

# Elements per row and chunk. CPU: the float64 copy of a chunk should stay in
# cache (K x 128K doubles; at 1M elements K = 4 ran 5x slower, measured).
# CUDA: fp32 partial products over 1M elements stay near 1e-7 relative (HOOKS.md).
_CPU_CHUNK = 1 << 17
_CUDA_CHUNK = 1 << 20


def fused_gram_available(device: torch.device | str) -> bool:
    """Whether ``method="fused"`` can run on ``device``: CUDA with Triton, or any device under TRITON_INTERPRET=1."""
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import raco_ds._fused_gram  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def local_gram(
    shards: torch.Tensor | Sequence[torch.Tensor], chunk: int | None = None, method: GramMethod = "auto"
) -> torch.Tensor:
    """Return ``S @ S.T`` in float64 (on the CPU) for a K x n stack of gradient shards.

    ``shards`` is a 2-D tensor (K, n) or a sequence of K 1-D tensors of equal
    length. Padding elements must be zero (they then add nothing). ``chunk``
    (elements per row and product of the chunked methods) defaults to what suits
    the device; ``method`` is described in the module docstring ("auto": fused on
    CUDA where Triton imports and the shard is at least one block wide, else
    float64 on CPU / for float64 shards, else fp32_chunks).

    >>> import torch
    >>> local_gram(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([[ 5., 11.],
            [11., 25.]], dtype=torch.float64)
    """
    stacked = shards if isinstance(shards, torch.Tensor) else torch.stack(list(shards))
    if stacked.dim() != 2:
        raise ValueError(f"local_gram expects a (K, n) tensor of shards, got shape {tuple(stacked.shape)}")
    k, n = stacked.shape
    if n == 0:
        return torch.zeros(k, k, dtype=torch.float64)
    if method == "auto":
        method = _auto_method(stacked)
    if method == "fused":
        if not fused_gram_available(stacked.device):
            raise ValueError(
                f"method='fused' needs a CUDA tensor and an importable triton (or TRITON_INTERPRET=1 for a CPU test); "
                f"got a {stacked.device.type} tensor. Use method='auto' to pick what runs here."
            )
        from raco_ds._fused_gram import fused_gram

        gram = fused_gram(stacked if stacked.stride(1) == 1 else stacked.contiguous())
    elif method in ("float64", "fp32_chunks"):
        default_chunk = _CPU_CHUNK if stacked.device.type == "cpu" else _CUDA_CHUNK
        gram = _chunked_gram(stacked, chunk or default_chunk, torch.float64 if method == "float64" else torch.float32)
    else:
        raise ValueError(f"unknown Gram method {method!r}; choose one of {GramMethod.__args__}")
    gram = (gram + gram.T) / 2  # exact symmetry; rounding in the products may differ by an ulp
    return gram.cpu()


def _auto_method(stacked: torch.Tensor) -> GramMethod:
    if stacked.device.type == "cpu" or stacked.dtype == torch.float64:
        return "float64"
    if fused_gram_available(stacked.device):
        from raco_ds._fused_gram import BLOCK

        if stacked.shape[1] >= BLOCK:
            return "fused"
    return "fp32_chunks"


def _chunked_gram(stacked: torch.Tensor, chunk: int, product_dtype: torch.dtype) -> torch.Tensor:
    """Sum over column chunks of (chunk @ chunk.T) formed in ``product_dtype``, accumulated in float64."""
    k, n = stacked.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=stacked.device)
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, n, chunk):
            block = stacked[:, start : start + chunk].to(product_dtype)
            gram += (block @ block.T).to(torch.float64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return gram
