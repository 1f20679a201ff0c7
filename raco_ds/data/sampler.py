"""Deterministic shuffling and the distributed split of pairs across data-parallel ranks.

Every epoch, all ranks draw the same permutation (``torch.Generator`` seeded
with ``seed + epoch``) of the pair indices, drop the tail so the count is a
multiple of ``world_size * batch_size``, and rank r takes every
``world_size``-th index starting at ``r``. Hence:

* within an epoch no pair is seen twice, on any rank (the split is a partition);
* every rank gets the same number of pairs, so collective steps never hang;
* the dropped tail (fewer than ``world_size * batch_size`` pairs) differs per
  epoch because the permutation does, so over epochs every pair is used. We drop
  rather than pad by repetition: padding would show some pairs twice.

``indices`` restricts the sampler to a subset (e.g. one objective's pairs
for per-objective passes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["DistributedPairSampler"]


class DistributedPairSampler(torch.utils.data.Sampler[int]):
    """Yield this rank's share of the pair indices for the current epoch.

    >>> [list(DistributedPairSampler(5, world_size=2, rank=r, shuffle=False)) for r in (0, 1)]
    [[0, 2], [1, 3]]
    """

    def __init__(
        self,
        num_pairs: int | None = None,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        batch_size: int = 1,
        indices: Sequence[int] | None = None,
    ) -> None:
        """``num_pairs`` pairs (or the explicit ``indices``), split over ``world_size`` ranks.

        ``batch_size`` (per rank) makes every rank's share a whole number of
        batches, so the last batch is never short.
        """
        if (num_pairs is None) == (indices is None):
            raise ValueError("give exactly one of num_pairs or indices")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.indices = torch.as_tensor(list(indices) if indices is not None else range(num_pairs), dtype=torch.long)
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.shuffle, self.batch_size = shuffle, batch_size
        self.epoch = 0
        step = world_size * batch_size
        if len(self.indices) < step:
            raise ValueError(
                f"{len(self.indices)} pairs cannot give {world_size} ranks one batch of {batch_size} each; "
                "lower the batch size or the number of ranks, or add data"
            )
        self.num_per_rank = len(self.indices) // step * batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (call before iterating, as with torch's DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_per_rank

    def __iter__(self) -> Iterator[int]:
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = order[torch.randperm(len(order), generator=generator)]
        kept = order[: self.num_per_rank * self.world_size]
        return iter(kept[self.rank :: self.world_size].tolist())
