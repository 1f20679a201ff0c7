"""LoRA under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks, both captures, both data shapes: one RacoHook step
equals a single-process full-gradient oracle over the adapter parameters (Gram, coefficients, updated adapters)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from multirank import run_ranks

pytest.importorskip("peft")

WORLD, K, PAIRS, LR = 2, 2, 4, 0.1
WEIGHTS = [0.3, 0.7]
CASES = [(stage, capture, shape) for stage in (3, 2) for capture in ("k_pass", "onepass")
         for shape in ("shared", "objective_rows")]  # fmt: skip


def _lora_model() -> torch.nn.Module:
    from test_lora import _lora
    from test_onepass import tiny_model

    return _lora(tiny_model("llama"))  # B nonzero: A and B both have gradients


def _losses(model: Callable, rank: int, shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K losses, row log-probs) of ``rank``'s micro-batch (the same pairs in every process)."""
    from test_onepass import BETA, _labels, _margins, batch, row_logps

    from raco_ds.losses import losses_from_margins

    data, labels = batch(PAIRS, seed=10 + rank), _labels(shape, K, PAIRS, seed=20 + rank)
    logps = row_logps(model, data)
    return losses_from_margins(_margins(logps, PAIRS), labels, beta=BETA), logps


def _oracle(shape: str) -> dict:
    """Full per-objective adapter gradients averaged over both ranks' data, the Gram, a, and one SGD step."""
    from raco_ds.solver import aggregate

    model = _lora_model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for k in range(K):
        total = [torch.zeros_like(p) for p in params.values()]
        for rank in range(WORLD):
            loss = _losses(model, rank, shape)[0][k] / WORLD
            for t, g in zip(total, torch.autograd.grad(loss, list(params.values()))):
                t += g
        grads.append(total)
    flat = torch.stack([torch.cat([g.reshape(-1) for g in gk]).double() for gk in grads])
    gram = flat @ flat.T
    a = aggregate("raco", gram, torch.tensor(WEIGHTS, dtype=torch.float64), 0.4).coefficients
    updated = {n: (p.detach() - LR * sum(float(a[k]) * grads[k][i] for k in range(K)))
               for i, (n, p) in enumerate(params.items())}  # fmt: skip
    return {"gram": gram, "coefficients": a, "updated": updated}


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": PAIRS,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _one_step(rank: int, stage: int, capture: str, shape: str):
    """One RACO step through DeepSpeed as the trainer's capture strategies run it; (stats, adapters after)."""
    import deepspeed

    from raco_ds.deepspeed import RacoHook
    from raco_ds.onepass import coefficients_from_losses

    model = _lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=LR),
                                      config=_ds_config(stage))  # fmt: skip
    hook = RacoHook(engine, weights=WEIGHTS, aggregator="raco", c=0.4)
    if capture == "onepass":
        with hook.onepass() as op, op.record(rows=2 * PAIRS):  # self-checked against autograd on this pass
            losses, logps = _losses(op.forward, rank, shape)  # checks the capture first (its first pass)
            op.backward(logps.sum(), coefficients_from_losses(logps, losses))
        stats = hook.step()
        assert op.capture.last_check is not None and op.capture.last_check.passed
    elif shape == "shared":
        hook.backward_shared(lambda: _losses(engine, rank, shape)[0])
        stats = hook.step()
    else:
        for k in range(K):
            with hook.objective(k):
                hook.backward(_losses(engine, rank, shape)[0][k])
        stats = hook.step()
    updated = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):
                updated[name] = p.detach().clone()
    return stats.gram.clone(), stats.coefficients.clone(), updated


def _body(rank: int, world: int) -> list[dict]:
    oracles = {shape: _oracle(shape) for shape in ("shared", "objective_rows")}
    results = []
    for stage, capture, shape in CASES:
        gram, coefficients, updated = _one_step(rank, stage, capture, shape)
        oracle = oracles[shape]
        start = dict(_lora_model().named_parameters())
        update_err = max(
            float((updated[n] - oracle["updated"][n]).norm() / (oracle["updated"][n] - start[n]).norm())
            for n in oracle["updated"]
        )
        results.append({
            "gram": float((gram - oracle["gram"]).norm() / oracle["gram"].norm()),
            "coefficients": float((coefficients - oracle["coefficients"]).abs().max()),
            "update": update_err,
            "adapters": sorted(updated) == sorted(oracle["updated"]),
        })  # fmt: skip
    return results


@pytest.mark.slow
def test_lora_step_equals_full_gradient_oracle_over_adapters():
    results = run_ranks(_body, WORLD)
    for rank in range(WORLD):
        for case, r in zip(CASES, results[rank]):
            assert r["adapters"], case  # only the adapters train, every one of them is in the engine
            assert r["gram"] <= 1e-5, (case, r)
            assert r["coefficients"] <= 1e-5, (case, r)
            assert r["update"] <= 1e-4, (case, r)  # relative to the oracle's step, fp32 parameters
