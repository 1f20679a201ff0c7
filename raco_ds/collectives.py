"""Where a collective's tensors must live, and this rank's place in a group: shared by every backend's cross-rank code.

Without an initialised process group every helper answers as the only rank of one.

>>> collective_device()  # no process group: a local, CPU-side "collective"
device(type='cpu')
>>> rank(), world_size(), is_distributed()
(0, 1, False)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device", "is_distributed", "rank", "world_size"]


def collective_device(group=None) -> torch.device:
    """The device a collective on ``group`` runs on: the CPU for gloo (or no process group), else the rank's accelerator.

    NCCL needs the rank's current CUDA device; other accelerator backends get
    ``torch.accelerator``'s current device.
    """
    if not _initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator()
        return torch.device(kind.type, accelerator.current_device_index())
    return torch.device("cpu")


def rank(group=None) -> int:
    """This rank's index in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if _initialized() else 0


def world_size(group=None) -> int:
    """The number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if _initialized() else 1


def is_distributed(group=None) -> bool:
    """True when ``group`` has more than one rank, so a collective over it is needed."""
    return world_size(group) > 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()
