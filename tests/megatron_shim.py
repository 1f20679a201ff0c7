"""TEST-ONLY shim: run megatron-core 0.16 on CPU ranks (gloo) for raco_ds's tests.

Never import this from the library. Megatron-core hard-codes CUDA in the code
paths a test touches; this module patches exactly those, inside the spawned
test rank processes only (``install()`` is called by the rank body, never at
import), so that a tiny model, its DistributedDataParallel buffers, the
distributed optimizer's shard bookkeeping and its gradient-norm utilities run
on CPU with the gloo backend. What it patches, and why:

1. ``torch.cuda.current_device()`` -> ``"cpu"``: megatron allocates buffers with
   ``device=torch.cuda.current_device()`` (grad/param buffers, TP layers).
2. A ``torch`` stand-in in a few megatron modules whose factory calls carry the
   literal ``device="cuda"`` (the grad-norm's result and overflow buffers, the
   optimizer's found-inf / overflow scalars): ``zeros/ones/empty/full/tensor``
   there allocate on CPU instead.
3. ``Tensor.type()`` with no argument reports ``torch.cuda.*Tensor`` for CPU
   tensors: the distributed optimizer and the clipping function accept only
   ``torch.cuda.FloatTensor`` / ``HalfTensor`` / ``BFloat16Tensor`` by string.
4. Megatron's CUDA RNG tracker ``fork()`` becomes a no-op context: it saves and
   restores CUDA generator state around initialisation and dropout, and the
   tests use no dropout.
5. ``Tensor.cuda()`` returns the tensor itself: the tied-embedding setup moves
   the last pipeline stage's copy with ``weight.data.cuda()`` before its
   all-reduce with the first stage.

With these the optimizer step itself also runs on CPU (torch's AdamW is the
fallback when Transformer Engine and Apex are absent), which lets the tests
compare parameters after a real ``optimizer.step()`` with a plain-PyTorch
oracle; the GPU check script covers the real CUDA path.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

_INSTALLED = False

# Modules whose code uses ``torch.<factory>(..., device="cuda")`` on the paths the tests run.
_CUDA_LITERAL_MODULES = (
    "megatron.core.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.p2p_communication",
    # distributed checkpointing: torch.cuda.synchronize() before its writer threads copy the shards
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, (str, torch.device)) and str(device).startswith("cuda"):
        return "cpu"
    return device


class _CpuCuda(types.SimpleNamespace):
    """The few ``torch.cuda`` members megatron's CPU-reachable paths call."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """A ``torch`` stand-in for one megatron module: CUDA factory calls allocate on CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))
        self.cuda = _CpuCuda(
            current_device=lambda: "cpu",
            synchronize=lambda *a, **k: None,
            empty_cache=lambda: None,
            default_stream=lambda *a, **k: contextlib.nullcontext(),
        )

    @staticmethod
    def _factory(fn):
        def call(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def install() -> None:
    """Patch megatron-core for CPU ranks. Idempotent; call inside each test rank process."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True

    # 1. device=torch.cuda.current_device()
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    # 2. device="cuda" literals in specific modules.
    stand_in = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        module.torch = stand_in

    # 3. Tensor.type() string checks.
    original_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and not result.startswith("torch.cuda."):
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]

    # 4. CUDA RNG tracker.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()

    # 5. Tensor.cuda()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
