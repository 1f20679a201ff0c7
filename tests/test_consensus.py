"""The all-reduce + solve + agreement check, on 2 real gloo ranks."""

import pytest
import torch

from multirank import run_ranks
from raco_ds.consensus import CoefficientMismatchError, solve_across_ranks
from raco_ds.gram import local_gram


def _sum_of_local_grams(rank, world_size):
    torch.manual_seed(0)
    full = torch.randn(3, 11, dtype=torch.float64)
    mine = full[:, rank::world_size]
    solution = solve_across_ranks(local_gram(mine), torch.tensor([0.2, 0.3, 0.5]), "linear")
    return solution.gram, full @ full.T


def test_allreduced_gram_equals_full_gram():
    for gram, reference in run_ranks(_sum_of_local_grams, 2):
        torch.testing.assert_close(gram, reference, rtol=1e-12, atol=0)


def _disagreeing_weights(rank, world_size):
    weights = torch.tensor([0.5, 0.5]) if rank == 0 else torch.tensor([0.25, 0.75])
    with pytest.raises(CoefficientMismatchError, match="disagree"):
        solve_across_ranks(torch.eye(2, dtype=torch.float64), weights, "linear")
    return True


def test_rank_mismatch_is_detected():
    assert run_ranks(_disagreeing_weights, 2) == [True, True]


def _nan_on_one_rank(rank, world_size):
    shard = torch.ones(2, 4)
    if rank == 1:
        shard[1, 2] = float("nan")
    return solve_across_ranks(local_gram(shard), torch.tensor([0.5, 0.5]), "linear").nonfinite_objectives


def test_nonfinite_gradient_on_one_rank_skips_everywhere():
    assert run_ranks(_nan_on_one_rank, 2) == [[1], [1]]


def test_local_gram_matches_float64_reference():
    torch.manual_seed(1)
    shards = torch.randn(4, 3_000_001) * torch.tensor([1e-4, 1.0, 1e3, 7.0])[:, None]
    reference = shards.double() @ shards.double().T
    torch.testing.assert_close(local_gram(shards, chunk=1 << 16), reference, rtol=1e-12, atol=0)
