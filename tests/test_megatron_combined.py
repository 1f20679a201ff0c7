"""RacoMegatron under tensor x data parallelism together (TP=2 x DP=2, distributed optimizer) on 4 CPU ranks.

The same layout runner and single-process oracle as tests/test_megatron.py
(``_run_layout``: Gram, coefficients, every owned written slice, Megatron's
gradient norm and the parameters after ``optimizer.step()`` against plain
autograd with full gradients); here the distributed optimizer's shards are
split over the data-parallel pair of each tensor-parallel rank, and the
TP-duplicate filter and the DP reduction act in the same step. Four ranks on a
2-core machine: tiny model, one layout, about a minute when the machine is idle.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from multirank import run_ranks

pytestmark = pytest.mark.slow


def _body(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_shim

    megatron_shim.install()
    from test_megatron import _run_layout

    return _run_layout(2, 1, True, world)


def test_tensor_and_data_parallel_together_match_the_oracle() -> None:
    results = run_ranks(_body, 4)
    for rank, r in enumerate(results):
        context = f"tp2 x dp2 rank {rank}: {r}"
        assert not r["skipped"] and r["update_successful"], context
        assert r["gram_rel"] < 1e-5 and r["coef_abs"] < 1e-5 and r["slice_rel"] < 1e-5, context
        assert r["norm_step_rel"] < 1e-5 and r["norm_get_rel"] < 1e-5, context
        assert r["param_names_match"] and r["moved_over_lr"] > 0.1 and r["param_abs_over_lr"] < 1e-4, context
        assert r["nan_skipped"] and r["nan_raised"] == [1] and r["nan_params_unchanged"], context
    assert len({tuple(r["coefficients"]) for r in results}) == 1  # every rank solved the same problem
    # Megatron's rank order puts TP innermost: ranks 0/2 and 1/3 are the DP pairs of TP ranks 0 and 1,
    # and each pair splits its TP rank's shard between them.
    owned = [r["owned_numel"] for r in results]
    assert owned[0] + owned[2] == owned[1] + owned[3], owned
