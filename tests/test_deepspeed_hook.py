"""RacoHook on real DeepSpeed (2 CPU ranks, gloo) against a single-process full-gradient oracle.

One 2-rank launch builds 54 engines (plus 3 for the error paths) in turn (tests/ds_hook_cases.py) and every
test below reads its slice of the results. Per step and configuration:
parameter-update relative error <= 1e-5 (fp32), Gram relative error <= 1e-6,
coefficients within 1e-6, for ZeRO 0-3, offload on/off, 1 and 2 micro-batches
per objective, a parameter only objective 1 touches and odd-sized parameters
that force padding. Plus: shared-forward path, NaN skip/raise, negative controls
(a hook that never clears the engine's buffer), the bf16 differential test and
the hook's error paths. Fast layout/argument checks need no ranks.

    pytest tests/test_deepspeed_hook.py            # ~1.5 min on 2 busy cores
    pytest tests/test_deepspeed_hook.py -m "not slow"
"""

from __future__ import annotations

import types

import pytest
import torch
from ds_hook_cases import Case, run_cases
from ds_oracle import relative_error
from multirank import run_ranks

from raco_ds.deepspeed import RacoStepStats, UnsupportedEngineError
from raco_ds.solver import validate_weights
from raco_ds.deepspeed.layout import EngineLayout

UPDATE_TOL, GRAM_TOL, COEF_TOL = 1e-5, 1e-6, 1e-6
BF16_TOL = 2e-2  # bf16 rounding of each micro-batch gradient (~4e-3 measured)

EXACT = {
    f"z{stage}{'_off' if offload else ''}_m{m}": {"stage": stage, "offload": offload, "micro_batches": m}
    for stage in (0, 1, 2, 3)
    for offload in ((False,) if stage == 0 else (False, True))
    for m in (1, 2)
}
EXACT["z3_persistent_params"] = {"stage": 3, "extra_zero": {"stage3_param_persistence_threshold": 10**5}}
THREE = {  # K=3, objectives run in reverse order, so objective 0 (the last) stays in DeepSpeed's buffer.
    # Objective 2 touches only_objective_1 in its first micro-batch but not in its last one.
    f"k3_z{stage}{'_off' if offload else ''}_m2_reversed": {"stage": stage, "offload": offload, "micro_batches": 2}
    for stage in (0, 1, 2, 3)
    for offload in ((False,) if stage == 0 else (False, True))
}
GROUPS = {  # two optimizer parameter groups (weight decay on matrices only), K=3, reversed
    "groups_z0": {"stage": 0},
    "groups_z1_m2": {"stage": 1, "micro_batches": 2},
    "groups_z2_off_m2": {"stage": 2, "offload": True, "micro_batches": 2},
    "groups_z3_m2": {"stage": 3, "micro_batches": 2},
    "groups_z3_off": {"stage": 3, "offload": True},
}
EXTERNAL = {"external_z2_m2": {"stage": 2, "micro_batches": 2}, "external_z3_off": {"stage": 3, "offload": True}}
SHARED = {
    "shared_z0": {"stage": 0},
    "shared_z1_off": {"stage": 1, "offload": True},
    "shared_z2_m2": {"stage": 2, "micro_batches": 2},
    "shared_z3_m2": {"stage": 3, "micro_batches": 2},
}
BF16 = {  # hook (aggregator "linear") vs DeepSpeed accumulating the weighted losses itself
    "bf16_z1": {"stage": 1, "bf16": True},  # DeepSpeed's BF16_Optimizer
    "bf16_z2_m2": {"stage": 2, "bf16": True, "micro_batches": 2},
    "bf16_z3": {"stage": 3, "bf16": True},
    "bf16_z1_bf16_accum": {"stage": 1, "bf16": True, "grad_accum_fp32": False},
}
# Compared with the fp32 oracle instead: under offload, stock DeepSpeed's own gas>1 accumulation drops or
# repeats the gradient of a parameter that not every micro-batch touches (objective 0 here), so the
# weighted-loss baseline itself is wrong there; the hook corrects for it (ZeroPartitionedOffload).
BF16_VS_ORACLE = {
    "bf16_z2_off": {"stage": 2, "bf16": True, "offload": True},
    "bf16_z3_off": {"stage": 3, "bf16": True, "offload": True},
    "bf16_k3_z2_off_m2": {"stage": 2, "bf16": True, "offload": True, "micro_batches": 2},
    "bf16_k3_z1_off_m2": {"stage": 1, "bf16": True, "offload": True, "micro_batches": 2},
    "bf16_z3_m2_bf16_accum": {"stage": 3, "bf16": True, "micro_batches": 2, "grad_accum_fp32": False},
}


def _cases() -> list[Case]:
    cases = [Case(name, config) for name, config in EXACT.items()]
    cases += [Case(name, config, shared=True) for name, config in SHARED.items()]
    cases += [Case(name, config, external_capture=True) for name, config in EXTERNAL.items()]
    cases += [Case(name, config, weights=(0.2, 0.3, 0.5), reverse_order=True) for name, config in THREE.items()]
    cases += [
        Case(name, config, weights=(0.2, 0.3, 0.5), reverse_order=True, param_groups=True)
        for name, config in GROUPS.items()
    ]
    cases.append(Case("k3_shared_z2", {"stage": 2}, weights=(0.5, 0.25, 0.25), shared=True))
    cases += [
        Case("skip_z0", {"stage": 0}, poison=(1, 0, 1)),
        Case("skip_z3_m2", {"stage": 3, "micro_batches": 2}, poison=(1, 1, 1)),
        Case("raise_z2_off", {"stage": 2, "offload": True}, poison=(2, 0, 0), on_nonfinite="raise"),
        Case("no_clear_z3", {"stage": 3}, disable="clear"),
        Case("no_clear_z1_off", {"stage": 1, "offload": True}, disable="clear"),
        Case(
            "stock_offload_boundary_k3_z2_off_m2",
            {"stage": 2, "offload": True, "micro_batches": 2},
            weights=(0.2, 0.3, 0.5),
            disable="_complete_boundary",
        ),
        Case("clip_active", {"stage": 2}, weights=(0.9, 0.1), c=0.9),
    ]
    for name, config in BF16.items():
        cases.append(Case(name, config, aggregator="linear", optimizer="sgd"))
        cases.append(Case(name + "_baseline", config, aggregator="linear", optimizer="sgd", baseline=True))
    cases += [
        Case(
            name, config, weights=(0.2, 0.3, 0.5) if "k3" in name else (0.3, 0.7), aggregator="linear", optimizer="sgd"
        )
        for name, config in BF16_VS_ORACLE.items()
    ]
    return cases


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    """Every case's per-step results, from one 2-rank launch, per rank."""
    return run_ranks(run_cases, 2, _cases(), True)


@pytest.fixture(scope="module")
def results(per_rank) -> dict:
    """Rank 0's view (each rank compared itself with the same oracle)."""
    return per_rank[0]


def _report(result: dict) -> str:
    return f"update {result['update']}, gram {result['gram']}, coef {result['coef']}"


# -- exactness against the oracle ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", list(EXACT) + list(SHARED) + list(EXTERNAL) + list(THREE) + list(GROUPS) + ["k3_shared_z2"]
)
def test_matches_full_gradient_oracle(results, name):
    result = results[name]
    assert max(result["update"]) <= UPDATE_TOL, _report(result)
    assert max(result["gram"]) <= GRAM_TOL, _report(result)
    assert max(result["coef"]) <= COEF_TOL, _report(result)
    assert not any(result["skipped"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXACT))
def test_buffers_hold_the_rank_shard_only(results, name):
    result = results[name]
    rows, numel = result["buffer_shape"]
    # K=2: the hook copies out one shard; the step's last objective stays in DeepSpeed's buffer.
    assert rows == 1 and numel == result["shard_numel"] and result["buffer_bytes"] == 4 * numel
    if EXACT[name]["stage"] == 0:
        assert numel == result["total_numel"]  # ZeRO 0: the full gradient is the shard
    else:
        assert numel <= result["total_numel"] // 2 + 8  # half of 288 (+ per-parameter padding under ZeRO-3)
    assert result["padding_zero"]


@pytest.mark.slow
def test_every_rank_sees_the_same_gram_and_coefficients(per_rank):
    for name, result in per_rank[0].items():
        for (gram, coefficients), (gram_1, coefficients_1) in zip(
            result.get("solutions", []), per_rank[1][name].get("solutions", [])
        ):
            torch.testing.assert_close(gram, gram_1, rtol=0, atol=0, equal_nan=True, msg=name)
            assert (coefficients is None and coefficients_1 is None) or torch.equal(coefficients, coefficients_1), name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXTERNAL))
def test_capture_seam_takes_an_external_capture(results, name):
    # An external capture fills all K rows of hook.shard_buffer and calls mark_captured(); the hook then
    # keeps K rows (the update's exactness is checked with every other case).
    assert results[name]["buffer_shape"][0] == 2


@pytest.mark.slow
def test_raco_clip_is_exercised(results):
    # The RACO clip (p~ = min(p, w)) must be active in some step, and still exact there.
    assert any(results["clip_active"]["clip_active"]), results["clip_active"]["scalars"]
    assert max(results["clip_active"]["update"]) <= UPDATE_TOL
    assert max(results["clip_active"]["coef"]) <= COEF_TOL


# -- non-finite gradients ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["skip_z0", "skip_z3_m2", "raise_z2_off"])
def test_nonfinite_objective_skips_identically_and_engine_stays_clean(results, name):
    result = results[name]
    poisoned_step = 2 if name.startswith("raise") else 1
    assert result["skipped"] == [step == poisoned_step for step in range(len(result["skipped"]))]
    assert result["nonfinite"] == ([0] if name != "skip_z3_m2" else [1])
    assert result["update"][poisoned_step] == 0.0  # nothing moved
    after = [u for step, u in enumerate(result["update"]) if step != poisoned_step]
    assert max(after) <= UPDATE_TOL, _report(result)  # the next steps are exact again
    assert result["raised"] == ([2] if name.startswith("raise") else [])


# -- negative controls: the oracle catches a missed buffer clear -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["no_clear_z3", "no_clear_z1_off", "stock_offload_boundary_k3_z2_off_m2"])
def test_missing_buffer_clear_is_caught(results, name):
    # The last one: without the hook's fix, stock ZeRO-2 offload drops the gradient of a parameter that an
    # objective's earlier micro-batches touched and its last one did not.
    assert max(results[name]["update"]) > 1e-2, _report(results[name])


# -- bf16 ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(BF16))
def test_bf16_linear_hook_matches_deepspeed_weighted_loss(results, name):
    hook, baseline = results[name], results[name + "_baseline"]
    previous = [baseline["initial"]] + baseline["params"][:-1]
    errors = [relative_error(a - p, b - p) for a, b, p in zip(hook["params"], baseline["params"], previous)]
    assert max(errors) <= BF16_TOL, errors
    assert max(hook["update"]) <= BF16_TOL, _report(hook)  # and both near the fp32 oracle


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BF16_VS_ORACLE))
def test_bf16_hook_matches_fp32_oracle(results, name):
    assert max(results[name]["update"]) <= BF16_TOL, _report(results[name])


@pytest.mark.slow
def test_bf16_gradient_accumulation_warns(results):
    assert any("grad_accum_dtype" in message for message in results["bf16_z1_bf16_accum"]["warnings"])
    assert not results["bf16_z1"]["warnings"]


# -- error paths on a real engine ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "check, fragment",
    [
        ("weights", "sum to 1"),
        ("aggregator", "unknown aggregator"),
        ("backward_outside", "outside"),
        ("too_few_micro_batches", "gradient_accumulation_steps"),
        ("step_early", "before objective"),
        ("zero3_shared_list", "callable"),
        ("bf16_stage0", "stage"),
        ("discard_step", "clean"),
    ],
)
def test_misuse_raises_the_intended_error(results, check, fragment):
    assert fragment in results["api_errors"][check], results["api_errors"]


# -- no ranks needed ----------------------------------------------------------------------------------
def _stub_engine(**overrides) -> types.SimpleNamespace:
    """Just enough of a DeepSpeedEngine for EngineLayout.from_engine."""
    values = {
        "stage": 2, "fp16": False, "bf16": False, "autocast": False, "managed": True, "deepcompile": False,
        "offload_optimizer": None, "offload_param": None, "cpu_offload": False, "mpu": None,
    }  # fmt: skip
    values.update(overrides)
    optimizer = type("DeepSpeedZeroOptimizer", (), {})()
    return types.SimpleNamespace(
        optimizer=optimizer, mpu=values["mpu"], sequence_parallel_size=1, has_moe_layers=False, zenflow=False,
        fp16_enabled=lambda: values["fp16"], bfloat16_enabled=lambda: values["bf16"],
        torch_autocast_enabled=lambda: values["autocast"], managed_gradient_accumulation=lambda: values["managed"],
        is_deepcompile_enabled=lambda: values["deepcompile"], zero_optimization_stage=lambda: values["stage"],
        zero_offload_optimizer=lambda: values["offload_optimizer"], zero_offload_param=lambda: values["offload_param"],
        zero_cpu_offload=lambda: values["cpu_offload"], get_data_types=lambda: (torch.float32, torch.float32),
        dp_world_size=2, gradient_accumulation_steps=lambda: 1, gradient_clipping=lambda: 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"fp16": True}, "fp16.enabled"),
        ({"autocast": True}, "torch_autocast.enabled"),
        ({"managed": False}, "managed_gradient_accumulation"),
        ({"deepcompile": True}, "compile.deepcompile"),
        ({"mpu": object()}, "mpu"),
        ({"stage": 0, "bf16": True}, "bf16.enabled with zero_optimization.stage 0"),
        ({"offload_optimizer": types.SimpleNamespace(device="nvme", ratio=1.0)}, "offload_optimizer.device"),
        ({"offload_param": types.SimpleNamespace(device="cpu")}, "offload_param.device"),
    ],
)
def test_rejects_unsupported_config(overrides, field):
    with pytest.raises(UnsupportedEngineError, match=field.replace(".", r"\.")):
        EngineLayout.from_engine(_stub_engine(**overrides))


def test_allows_supported_config():
    layout = EngineLayout.from_engine(_stub_engine())
    assert layout.stage == 2 and layout.partitions_gradients and not layout.grads_accumulate_in_low_precision


@pytest.mark.parametrize("weights", [[0.5, 0.6], [-0.1, 1.1], [], [float("nan"), 1.0]])
def test_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        validate_weights(weights)


def test_scalars_are_flat_and_named():
    gram = torch.tensor([[4.0, 1.0], [1.0, 9.0]], dtype=torch.float64)
    stats = RacoStepStats(
        gram=gram, coefficients=torch.tensor([0.4, 0.6], dtype=torch.float64), dual=None, dual_clipped=None,
        clip_active=False, grad_norms=gram.diagonal().sqrt(), cosines=gram / 6, skipped=False, seconds_capture=0.5,
    )  # fmt: skip
    scalars = stats.scalars()
    assert scalars["raco/coef/1"] == 0.6 and scalars["raco/gram/0_1"] == 1.0 and scalars["raco/grad_norm/1"] == 3.0
    assert scalars["time/hook_capture"] == 0.5 and "raco/cos/0_1" in scalars and "raco/dual/0" not in scalars
    assert all(isinstance(v, float) for v in scalars.values())


def test_gram_with_the_last_objective_left_in_the_engine_is_exact():
    # Rows hold objectives 2 and 0 (captured in that order); objective 1 is read from the engine's pieces,
    # which straddle the Gram's chunks.
    from raco_ds.deepspeed.rows import ShardRows
    from raco_ds.gram import local_gram

    torch.manual_seed(0)
    n = 300_001
    pieces = [torch.randn(size) for size in (70_000, 1, 129_999, n - 200_000)]
    layout = types.SimpleNamespace(numel=n, device=torch.device("cpu"))
    rows = ShardRows(types.SimpleNamespace(shard_layout=layout, engine_pieces=lambda: pieces), 3, keep_last_in_engine=True)
    assert rows.buffer.shape == (2, n)
    rows.row_for(2).normal_()
    rows.row_for(0).normal_().mul_(1e3)
    assert rows.can_stay_in_engine()
    rows.stay_in_engine(1)
    full = torch.stack([rows.buffer[1], torch.cat(pieces), rows.buffer[0]])
    torch.testing.assert_close(rows.gram(0, n), local_gram(full), rtol=1e-12, atol=0)
    torch.testing.assert_close(rows.gram(1000, 250_000), local_gram(full[:, 1000:250_000]), rtol=1e-12, atol=0)
