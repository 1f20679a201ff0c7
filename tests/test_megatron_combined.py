"""RacoMegatron under two parallelisms together on 4 CPU ranks (distributed optimizer): TP=2 x DP=2, PP=2 x DP=2, TP=2 x PP=2.

The same layout runner and single-process oracle as tests/test_megatron.py
(``_run_layout``: Gram, coefficients, every owned written slice, Megatron's
gradient norm and the parameters after ``optimizer.step()`` against plain
autograd with full gradients); here the distributed optimizer's shards are
split over the data-parallel pair of each tensor-parallel rank (TP x DP: the
TP-duplicate filter and the DP reduction act in the same step) or of each
pipeline stage (PP x DP: Megatron's pipeline schedule per objective, the
stages' DP pairs reducing their own gradients). Four ranks on a 2-core
machine: tiny model, one layout each, about 10 s each when the machine is idle.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from multirank import run_ranks

pytestmark = pytest.mark.slow


def _body(rank: int, world: int, tp: int = 2, pp: int = 1) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_shim

    megatron_shim.install()
    from test_megatron import _run_layout

    return _run_layout(tp, pp, True, world)


def _assert_every_rank_matches_the_oracle(results: list[dict], layout: str) -> None:
    """Gram, coefficients, written slices, norms and the update against the oracle, the same solve on every rank."""
    for rank, r in enumerate(results):
        context = f"{layout} rank {rank}: {r}"
        assert not r["skipped"] and r["update_successful"], context
        assert r["gram_rel"] < 1e-5 and r["coef_abs"] < 1e-5 and r["slice_rel"] < 1e-5, context
        assert r["norm_step_rel"] < 1e-5 and r["norm_get_rel"] < 1e-5, context
        assert r["param_names_match"] and r["moved_over_lr"] > 0.1 and r["param_abs_over_lr"] < 1e-4, context
    assert len({tuple(r["coefficients"]) for r in results}) == 1  # every rank solved the same problem


def test_tensor_and_data_parallel_together_match_the_oracle() -> None:
    results = run_ranks(_body, 4)
    _assert_every_rank_matches_the_oracle(results, "tp2 x dp2")
    for rank, r in enumerate(results):
        assert r["nan_skipped"] and r["nan_raised"] == [1] and r["nan_params_unchanged"], f"tp2 x dp2 rank {rank}: {r}"
    # Megatron's rank order puts TP innermost: ranks 0/2 and 1/3 are the DP pairs of TP ranks 0 and 1,
    # and each pair splits its TP rank's shard between them.
    owned = [r["owned_numel"] for r in results]
    assert owned[0] + owned[2] == owned[1] + owned[3], owned


def test_pipeline_and_data_parallel_together_match_the_oracle() -> None:
    """PP=2 x DP=2: Megatron's 1F1B schedule per objective, the DP pair of each stage splitting its shard."""
    results = run_ranks(_body, 4, 1, 2)
    _assert_every_rank_matches_the_oracle(results, "pp2 x dp2")
    # PP outside DP in Megatron's order: ranks 0/1 are stage 0's DP pair, 2/3 stage 1's.
    owned = [r["owned_numel"] for r in results]
    assert owned[0] + owned[1] > 0 and owned[2] + owned[3] > 0, owned


def test_tensor_and_pipeline_parallel_together_match_the_oracle() -> None:
    """TP=2 x PP=2 (DP=1): each stage's two TP ranks hold halves of that stage's shard."""
    results = run_ranks(_body, 4, 2, 2)
    _assert_every_rank_matches_the_oracle(results, "tp2 x pp2")
    assert all(r["owned_numel"] > 0 for r in results), [r["owned_numel"] for r in results]
