"""How one-pass capture sees a parameter that a training framework may partition across ranks.

Where a framework partitions parameters (DeepSpeed ZeRO-3), a module's weight
holds only a placeholder between its uses. The capture still needs the full
shape (for its (K, numel) gradient buffers) and must know when the values are
not on this rank (a rule's numerical probe then defers to the self-check). The
framework's adapter describes that with a :class:`ParameterView`
(``raco_ds.deepspeed.onepass`` builds ZeRO-3's); :data:`PLAIN` sees ordinary
parameters.

>>> import torch
>>> PLAIN.full_shape(torch.nn.Parameter(torch.zeros(3, 2)))
(3, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["PLAIN", "ParameterView"]


def _own_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.shape)


def _on_meta(p: torch.Tensor) -> bool:
    return p.device.type == "meta"


@dataclass(frozen=True)
class ParameterView:
    """A parameter's full shape, and whether its values are absent here (partitioned or not materialised)."""

    full_shape: Callable[[torch.Tensor], tuple[int, ...]] = _own_shape
    """The shape of the whole (unpartitioned) parameter."""
    values_absent: Callable[[torch.Tensor], bool] = _on_meta
    """True when the parameter's values are not on this rank (no probe may read them)."""

    def numel(self, p: torch.Tensor) -> int:
        """Elements of the whole parameter."""
        n = 1
        for size in self.full_shape(p):
            n *= int(size)
        return n


PLAIN = ParameterView()
"""Parameters as torch holds them: the tensor's own shape; values absent only on the meta device."""
