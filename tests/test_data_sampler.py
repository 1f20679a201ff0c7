"""The distributed pair sampler: each rank its share, no pair twice, deterministic by seed."""

from __future__ import annotations

import pytest

from raco_ds.data import DistributedPairSampler


def _epoch(num_pairs: int, world_size: int, seed: int = 0, epoch: int = 0, **kwargs) -> list[list[int]]:
    shares = []
    for rank in range(world_size):
        sampler = DistributedPairSampler(num_pairs, world_size=world_size, rank=rank, seed=seed, **kwargs)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
        assert len(sampler) == len(shares[-1])
    return shares


@pytest.mark.parametrize("num_pairs, batch_size", [(400, 1), (400, 4), (997, 1), (997, 8)])
def test_two_ranks_cover_every_pair_at_most_once(num_pairs, batch_size):
    shares = _epoch(num_pairs, 2, batch_size=batch_size)
    seen = shares[0] + shares[1]
    assert len(seen) == len(set(seen))  # no pair twice within the epoch
    assert len(shares[0]) == len(shares[1]) and len(shares[0]) % batch_size == 0
    assert num_pairs - len(seen) < 2 * batch_size  # only the tail is dropped
    if num_pairs % (2 * batch_size) == 0:
        assert sorted(seen) == list(range(num_pairs))  # exactly once


def test_shuffling_is_deterministic_by_seed_and_epoch():
    assert _epoch(100, 2, seed=3) == _epoch(100, 2, seed=3)
    assert _epoch(100, 2, seed=3) != _epoch(100, 2, seed=4)
    assert _epoch(100, 2, seed=3, epoch=0) != _epoch(100, 2, seed=3, epoch=1)
    assert _epoch(10, 1, shuffle=False) == [list(range(10))]


def test_the_dropped_tail_changes_with_the_epoch():
    dropped = [set(range(11)) - set(sum(_epoch(11, 2, epoch=e), [])) for e in range(20)]
    assert all(len(d) == 1 for d in dropped) and len(set().union(*dropped)) > 1


def test_index_subset_for_one_objective():
    subset = list(range(500, 999))
    shares = _epoch(None, 2, indices=subset)
    assert sorted(shares[0] + shares[1]) == subset[: len(subset) // 2 * 2] or set(shares[0] + shares[1]) <= set(subset)
    assert not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_pairs=10, world_size=2, rank=2), r"rank=2 must be in \[0, world_size=2\)"),
        (dict(num_pairs=3, world_size=2, batch_size=2), "cannot give 2 ranks one batch of 2"),
        (dict(num_pairs=3, indices=[0, 1]), "exactly one of num_pairs or indices"),
        (dict(num_pairs=3, batch_size=0), "batch_size=0"),
    ],
)
def test_sampler_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedPairSampler(**kwargs)
