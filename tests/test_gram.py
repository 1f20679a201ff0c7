"""raco_ds.gram: every method against float64, and the fused Triton kernel under Triton's interpreter.

The kernel test needs the ``triton`` package (not part of the CPU install: skipped
without it); TRITON_INTERPRET=1 runs the kernel on CPU tensors through numpy.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raco_ds.gram import fused_gram_available, local_gram


def _shards(k: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(k + n)
    scales = torch.logspace(-4, 3, k)[:, None]  # objectives' gradients differ by orders of magnitude
    return (torch.randn(k, n) * scales).to(dtype)


def _exact(shards: torch.Tensor) -> torch.Tensor:
    s = shards.double()
    return s @ s.T


@pytest.mark.parametrize("method", ["auto", "float64", "fp32_chunks"])
def test_methods_match_float64(method):
    shards = _shards(3, 200_003)
    gram = local_gram(shards, chunk=1 << 14, method=method)
    rtol = 1e-6 if method == "fp32_chunks" else 1e-12
    torch.testing.assert_close(gram, _exact(shards), rtol=rtol, atol=0)
    assert torch.equal(gram, gram.T) and gram.dtype == torch.float64 and gram.device.type == "cpu"


def test_fused_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_gram_available("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        local_gram(_shards(2, 4096), method="fused")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown Gram method"):
        local_gram(_shards(2, 10), method="fp16")  # type: ignore[arg-type]


def _kernel_checks() -> None:
    """The fused kernel against float64: every pair of rows (K = 1, 3, 5), a tail block shorter than BLOCK,
    columns [lo, hi) of a wider buffer (row stride != n), bf16 shards, and a shard below one block refused."""
    from raco_ds._fused_gram import BLOCK

    for k in (1, 3, 5):
        shards = _shards(k, 3 * BLOCK + 17)
        gram = local_gram(shards, method="fused")
        torch.testing.assert_close(gram, _exact(shards), rtol=1e-12, atol=0)
        assert torch.equal(gram, gram.T)
    window = _shards(4, 5 * BLOCK)[:, 100 : 100 + 2 * BLOCK + 5]
    assert window.stride(0) != window.shape[1]
    torch.testing.assert_close(local_gram(window, method="fused"), _exact(window), rtol=1e-12, atol=0)
    low = _shards(2, 2 * BLOCK, torch.bfloat16)
    torch.testing.assert_close(local_gram(low, method="fused"), _exact(low), rtol=1e-12, atol=0)
    try:
        local_gram(_shards(2, BLOCK - 1), method="fused")
        raise AssertionError("a shard narrower than one block was accepted")
    except ValueError as error:
        assert "contiguous columns" in str(error)


def test_fused_kernel_matches_float64_under_the_interpreter():
    """_kernel_checks in a fresh process: triton.jit reads TRITON_INTERPRET when triton (and its standard
    library) is first imported, so the variable must be set before any import of triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the CPU install has no Triton)")
    tests = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(tests)!r}); import test_gram; test_gram._kernel_checks()"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
