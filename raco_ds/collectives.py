"""Where a collective's tensors must live: shared by every backend's cross-rank code.

>>> collective_device()  # no process group: a local, CPU-side "collective"
device(type='cpu')
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device"]


def collective_device(group=None) -> torch.device:
    """The device a collective on ``group`` runs on: the CPU for gloo (or no process group), else the rank's accelerator.

    NCCL needs the rank's current CUDA device; other accelerator backends get
    ``torch.accelerator``'s current device.
    """
    if not (dist.is_available() and dist.is_initialized()):
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
