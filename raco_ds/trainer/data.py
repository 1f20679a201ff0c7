"""The trainer's view of the data: the held-out split and resumable per-rank batch streams.

Split. A held-out pair must not share its prompt or either response with a
training pair: derived pairs (HelpSteer: every two responses to one prompt) and
data with repeated prompts would otherwise score memorisation. So pairs are
first joined into leakage groups (:func:`leakage_groups`: connected components
of "shares the prompt or a response text"), and whole groups are held out.
Groups are visited in a permutation seeded by ``data.split_seed`` (the same on
every rank, for every world size and for every training seed, so the seeds of
a sweep share one held-out set) and held out until ``num_eval_pairs`` pairs
are reached (the last group may overshoot); the pairs of the remaining groups,
in the same order, train (at most ``num_train_pairs``). Shared-pair data
(PKU-SafeRLHF) has one pool; per-objective data (HH-RLHF) has one pool per
objective and the counts apply per objective.

Build. :func:`build_data` loads the configured data, tokenises it, splits it and
opens this rank's streams.

Streams. One :class:`BatchStream` per pool (so per-objective data has K). Each
wraps raco_ds.data's :class:`DistributedPairSampler` (epoch-seeded permutation,
rank r takes every world-th pair) and yields collated micro-batches of
``micro_batch_size`` pairs. Its position is two integers (epoch, batches taken
this epoch), saved in checkpoints; restoring replays the epoch's permutation
and skips the batches already taken, so a resumed run sees exactly the pairs an
uninterrupted run would.
"""

from __future__ import annotations

import json

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raco_ds.data.batch import PreferenceBatch, PreferenceCollator
from raco_ds.data.records import PreferencePair
from raco_ds.data.sampler import DistributedPairSampler
from raco_ds.data.tokenization import PreferenceDataset
from raco_ds.trainer.config import ConfigError, TrainConfig

__all__ = ["BatchStream", "DataSplit", "build_data", "leakage_groups", "split_pairs"]


@dataclass
class DataSplit:
    """Which pairs train and which are held out."""

    train_pools: list[list[int]]
    """One list of pair indices per stream: 1 for shared pairs, K for per-objective data."""
    eval_indices: list[int]
    """Held-out pair indices (all pools together)."""
    num_eval_groups: int = 0
    """Leakage groups (prompts, joined where they share a response) the held-out pairs come from."""
    groups: list[int] | None = None
    """Leakage group id of every pair of the dataset (the clusters of the evaluation's bootstrap)."""
    eval_users: dict[int, str] | None = None
    """Held-out pair index -> the last user turn of its prompt as plain text (for judges that
    render conversations in their own format); None when the split was made without texts."""
    eval_prompts: dict[int, str] | None = None
    """Held-out pair index -> its whole prompt (every turn) as one string: the identity of a prompt
    however truncation rendered it in each pair; None when the split was made without texts."""

    def describe(self) -> str:
        """One log line: the split's sizes and the no-leak guarantee."""
        train = "+".join(str(len(p)) for p in self.train_pools)
        return (f"train {train}, held out {len(self.eval_indices)} pairs from {self.num_eval_groups} prompt groups "
                "(no held-out prompt or response text appears in a training pair)")


def leakage_groups(pairs: Sequence[PreferencePair]) -> list[int]:
    """A group id per pair: pairs sharing a prompt or a response text (transitively) get one id.

    Union-find over the exact texts (before tokenisation and truncation, which can make one
    prompt look like two). Ids are numbered by first appearance.

    >>> from raco_ds.data.records import PreferencePair
    >>> def pair(p, a, b):
    ...     return PreferencePair(({"role": "user", "content": p},), a, b, (1,), -1, None)
    >>> leakage_groups([pair("q1", "x", "y"), pair("q2", "z", "w"), pair("q3", "y", "v"), pair("q2", "u", "t")])
    [0, 1, 0, 1]
    """
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(key: tuple[str, str]) -> tuple[str, str]:
        root = parent.setdefault(key, key)
        while root != parent[root]:
            root = parent[root]
        while key != root:  # path compression keeps long chains cheap
            parent[key], key = root, parent[key]
        return root

    def keys(pair: PreferencePair) -> list[tuple[str, str]]:
        prompt = repr([(m["role"], m["content"]) for m in pair.prompt])
        return [("prompt", prompt), ("response", pair.response_a), ("response", pair.response_b)]

    for pair in pairs:
        first, *rest = keys(pair)
        for key in rest:
            parent[find(key)] = find(first)
    ids: dict[tuple[str, str], int] = {}
    return [ids.setdefault(find(keys(pair)[0]), len(ids)) for pair in pairs]


def split_pairs(
    dataset: PreferenceDataset, cfg: TrainConfig, pairs: Sequence[PreferencePair] | None = None
) -> DataSplit:
    """Seeded held-out/train split by whole leakage groups (see the module docstring).

    ``pairs``: the texts ``dataset`` was tokenised from, one per pair (their
    :func:`leakage_groups` decide what must stay together); None treats every pair as its own
    group, which is only safe for data without repeated prompts or responses. ConfigError if
    there is too little data.
    """
    if pairs is not None and len(pairs) != len(dataset):
        raise ValueError(f"got {len(pairs)} pair texts for {len(dataset)} tokenised pairs; pass the pairs the "
                         "dataset was tokenised from")
    groups = leakage_groups(pairs) if pairs is not None else list(range(len(dataset)))
    pools = (
        [list(range(len(dataset)))]
        if dataset.shared
        else [dataset.indices_of_objective(k) for k in range(dataset.num_objectives)]
    )
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    generator = torch.Generator().manual_seed(cfg.data.split_seed)
    order = [list(members)[i] for i in torch.randperm(len(members), generator=generator).tolist()]
    rank = {group: position for position, group in enumerate(order)}

    held_out: set[int] = set()
    eval_indices: list[int] = []
    for pool in pools:
        in_pool = sorted(pool, key=lambda i: (rank[groups[i]], i))
        taken = 0
        for i in in_pool:
            if taken >= cfg.data.num_eval_pairs and groups[i] not in held_out:
                break
            held_out.add(groups[i])
            taken += 1
    train_pools = []
    for k, pool in enumerate(pools):
        in_pool = sorted(pool, key=lambda i: (rank[groups[i]], i))
        eval_indices += [i for i in in_pool if groups[i] in held_out]
        rest = [i for i in in_pool if groups[i] not in held_out]
        if not rest:
            what = "the data" if dataset.shared else f"objective {dataset.objective_names[k]!r}"
            raise ConfigError(
                f"{what} has {len(pool)} pairs; data.num_eval_pairs={cfg.data.num_eval_pairs} (whole prompt groups) "
                "leaves none to train on. Lower --data.num_eval_pairs or use more data"
            )
        train_pools.append(rest if cfg.data.num_train_pairs is None else rest[: cfg.data.num_train_pairs])
    users = prompts = None
    if pairs is not None:
        users = {i: next((m["content"] for m in reversed(pairs[i].prompt) if m["role"] == "user"), "")
                 for i in eval_indices}
        prompts = {i: json.dumps(pairs[i].prompt, sort_keys=True) for i in eval_indices}
    return DataSplit(train_pools, eval_indices, len(held_out), list(groups), users, prompts)


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


def build_data(
    cfg: TrainConfig, tokenizer: Any, rank: int, world: int
) -> tuple[PreferenceDataset, PreferenceCollator, DataSplit, list[BatchStream]]:
    """Load, tokenise and split the run's data; return (dataset, collator, split, per-rank batch streams)."""
    from raco_ds.data.loading import load_preference_data
    from raco_ds.data.tokenization import TokenizationConfig, tokenize_preference_data

    dc = cfg.data
    spec = dc.spec(cfg.objectives.names)
    pairs = load_preference_data(spec, skip_invalid=True if dc.skip_invalid else None)  # None: the preset's own
    dataset = tokenize_preference_data(
        pairs, tokenizer, TokenizationConfig(max_length=dc.max_length, max_prompt_length=dc.max_prompt_length)
    )
    collator = PreferenceCollator(pad_token_id=dataset.pad_token_id, num_objectives=dataset.num_objectives,
                                  padding_free=dc.padding_free)  # fmt: skip
    split = split_pairs(dataset, cfg, pairs.pairs)
    # One stream per pool, each with its own seed so objectives do not see their pairs in lockstep.
    streams = [
        BatchStream(dataset, pool, collator, micro_batch_size=cfg.optimisation.micro_batch_size, world_size=world,
                    rank=rank, seed=cfg.optimisation.seed + 1000 * k, shuffle=dc.shuffle)
        for k, pool in enumerate(split.train_pools)
    ]  # fmt: skip
    return dataset, collator, split, streams
