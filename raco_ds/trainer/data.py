"""The trainer's view of the data: the held-out split and resumable per-rank batch streams.

Split. Pairs are drawn from a permutation seeded by ``optimisation.seed`` (the
same on every rank and for every world size): the first ``num_eval_pairs`` are
held out, the next ``num_train_pairs`` train. Shared-pair data (PKU-SafeRLHF)
has one pool; per-objective data (HH-RLHF) has one pool per objective and the
counts apply per objective.

Streams. One :class:`BatchStream` per pool (so per-objective data has K). Each
wraps raco_ds.data's :class:`DistributedPairSampler` (epoch-seeded permutation,
rank r takes every world-th pair) and yields collated micro-batches of
``micro_batch_size`` pairs. Its position is two integers (epoch, batches taken
this epoch), saved in checkpoints; restoring replays the epoch's permutation
and skips the batches already taken, so a resumed run sees exactly the pairs an
uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from raco_ds.data.batch import PreferenceBatch, PreferenceCollator
from raco_ds.data.sampler import DistributedPairSampler
from raco_ds.data.tokenization import PreferenceDataset
from raco_ds.trainer.config import ConfigError, TrainConfig

__all__ = ["BatchStream", "DataSplit", "split_pairs"]


@dataclass
class DataSplit:
    """Which pairs train and which are held out."""

    train_pools: list[list[int]]
    """One list of pair indices per stream: 1 for shared pairs, K for per-objective data."""
    eval_indices: list[int]
    """Held-out pair indices (all pools together)."""


def split_pairs(dataset: PreferenceDataset, cfg: TrainConfig) -> DataSplit:
    """Seeded held-out/train split (see the module docstring); ConfigError if there is too little data."""
    pools = (
        [list(range(len(dataset)))]
        if dataset.shared
        else [dataset.indices_of_objective(k) for k in range(dataset.num_objectives)]
    )
    generator = torch.Generator().manual_seed(cfg.optimisation.seed)
    train_pools, eval_indices = [], []
    need = cfg.data.num_eval_pairs + 1
    for k, pool in enumerate(pools):
        what = "the data" if dataset.shared else f"objective {dataset.objective_names[k]!r}"
        if len(pool) < need:
            raise ConfigError(
                f"{what} has {len(pool)} pairs; data.num_eval_pairs={cfg.data.num_eval_pairs} leaves none to train on. "
                "Lower --data.num_eval_pairs or use more data"
            )
        order = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        eval_indices += order[: cfg.data.num_eval_pairs]
        rest = order[cfg.data.num_eval_pairs :]
        train_pools.append(rest if cfg.data.num_train_pairs is None else rest[: cfg.data.num_train_pairs])
    return DataSplit(train_pools, eval_indices)


class BatchStream:
    """An endless, resumable stream of this rank's micro-batches from one pool of pairs."""

    def __init__(
        self,
        dataset: PreferenceDataset,
        indices: list[int],
        collator: PreferenceCollator,
        *,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        self.dataset, self.collator, self.micro_batch_size = dataset, collator, micro_batch_size
        try:
            self.sampler = DistributedPairSampler(
                indices=indices,
                world_size=world_size,
                rank=rank,
                seed=seed,
                shuffle=shuffle,
                batch_size=micro_batch_size,
            )
        except ValueError as err:
            raise ConfigError(
                f"{err} (pool of {len(indices)} training pairs; --optimisation.micro_batch_size {micro_batch_size}, "
                f"{world_size} ranks; raise --data.num_train_pairs or lower the batch size)"
            ) from None
        self.epoch, self.taken = 0, 0
        self._iterator: Iterator[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank draws per epoch."""
        return len(self.sampler) // self.micro_batch_size

    def _start_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self._iterator = iter(self.sampler)
        for _ in range(self.taken * self.micro_batch_size):  # replay to the saved position
            next(self._iterator)

    def next_items(self) -> list:
        """The next micro-batch's pairs, uncollated (moves to the next epoch when one is used up)."""
        if self.taken == self.batches_per_epoch:
            self.epoch, self.taken, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._start_epoch()
        indices = [next(self._iterator) for _ in range(self.micro_batch_size)]
        self.taken += 1
        return [self.dataset[i] for i in indices]

    def next(self) -> PreferenceBatch:
        """The next micro-batch, collated."""
        return self.collator(self.next_items())

    def state_dict(self) -> dict[str, Any]:
        """The position: {"epoch", "taken"}."""
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch, self.taken, self._iterator = int(state["epoch"]), int(state["taken"]), None
