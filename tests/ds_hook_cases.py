"""Rank bodies for tests/test_deepspeed_hook.py: many DeepSpeed engine configurations per 2-rank launch.

``run_cases(rank, world, cases)`` builds one engine per :class:`Case` in turn, trains
it for a few steps through :class:`raco_ds.deepspeed.RacoHook` next to the
single-process :class:`ds_oracle.Oracle`, and returns per-step errors (rank 0's
comparison; every rank checks its own coefficients against the oracle too).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from ds_oracle import LR, Oracle, batch, ds_config, make_model, param_groups, relative_error

NAN = float("nan")


@dataclass
class Case:
    """One engine configuration and how to drive it."""

    name: str
    config: dict = field(default_factory=dict)
    """Keyword arguments of ds_oracle.ds_config (stage, micro_batches, offload, bf16, ...)."""
    steps: int = 4
    aggregator: str = "raco"
    weights: tuple[float, ...] = (0.3, 0.7)
    c: float = 0.4
    shared: bool = False
    """Drive the shared-pair path (hook.backward_shared) instead of hook.objective()."""
    poison: tuple[int, int, int] | None = None
    """(step, objective, rank): that rank's loss is NaN there."""
    on_nonfinite: str = "skip"
    disable: str | None = None
    """Negative control: a strategy method made a no-op ("clear": never clear the engine's buffer;
    "_complete_boundary": stock ZeRO-2 offload boundary behaviour)."""
    optimizer: str = "adamw"
    """"adamw" (DeepSpeed's torch AdamW from the config) or "sgd" (a client torch SGD: updates linear in the gradient)."""
    param_groups: bool = False
    """Two optimizer parameter groups (weight decay on matrices only) instead of one."""
    reverse_order: bool = False
    """Run the objectives K-1, ..., 0 (the hook's rows are then not in objective order)."""
    external_capture: bool = False
    """Fill hook.shard_buffer through the strategy (as a one-pass capture would), then mark_captured()."""
    baseline: bool = False
    """No hook: plain DeepSpeed accumulating sum_k K*w_k*loss_k over K*m micro-batches (linear baseline)."""


def full_params(engine) -> torch.Tensor:
    """Every parameter's full fp32 value (master copy under ZeRO), flattened in module order."""
    from deepspeed.utils import safe_get_full_fp32_param

    parts = []
    for p in engine.module.parameters():
        value = safe_get_full_fp32_param(p)
        parts.append((p.detach() if value is None else value).reshape(-1).double().cpu())
    return torch.cat(parts)


def _external_capture(engine, hook, step: int, rank: int, m: int, k_count: int) -> None:
    # Stand-in for one-pass capture: rows of hook.shard_buffer filled from outside the hook's passes.
    buffer, strategy = hook.shard_buffer, hook.strategy
    for k in range(k_count):
        strategy.begin_objective()
        for j in range(m):
            engine.set_gradient_accumulation_boundary(j == m - 1)
            engine.backward(engine(*batch(step, k, rank, j), k))
        strategy.capture(buffer[k])
        strategy.clear()
    hook.mark_captured()


def _train_step(engine, hook, case: Case, step: int, rank: int, m: int, k_count: int) -> None:
    if case.external_capture:
        _external_capture(engine, hook, step, rank, m, k_count)
        return
    if case.shared:
        for j in range(m):
            tokens, target = batch(step, 0, rank, j, shared=True)
            hook.backward_shared(lambda t=tokens, y=target: list(engine(t, y, -1).unbind())[:k_count])
        return
    for k in reversed(range(k_count)) if case.reverse_order else range(k_count):
        with hook.objective(k):
            for j in range(m):
                loss = engine(*batch(step, k, rank, j), k)
                if case.poison is not None and tuple(case.poison) == (step, k, rank):
                    loss = loss * NAN
                hook.backward(loss)


def _baseline_step(engine, case: Case, step: int, rank: int, m: int) -> None:
    # DeepSpeed's own accumulation of the weighted losses: K*m micro-batches, each divided by K*m.
    # Objective 1 (which touches every parameter) goes first: stock ZeRO-3 keeps the previous step's
    # gradient of a parameter that the first micro-batch of a step does not touch (HOOKS.md).
    k_count = len(case.weights)
    for k in reversed(range(k_count)):
        for j in range(m):
            engine.set_gradient_accumulation_boundary(k == 0 and j == m - 1)
            engine.backward(k_count * case.weights[k] * engine(*batch(step, k, rank, j), k))
    engine.step()


def run_case(rank: int, world: int, case: Case) -> dict:
    """Train one engine for case.steps steps and compare every step with the oracle."""
    import deepspeed

    from raco_ds.deepspeed import NonFiniteGradientError, RacoHook

    m = case.config.get("micro_batches", 1)
    config = ds_config(**case.config)
    if case.baseline:
        config["gradient_accumulation_steps"] = m * len(case.weights)
    model = make_model()
    client_optimizer = None
    if case.optimizer == "sgd":
        del config["optimizer"]
        client_optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, case.param_groups), config=config, optimizer=client_optimizer
    )
    caught: list[str] = []
    hook = None
    if not case.baseline:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            hook = RacoHook(engine, list(case.weights), case.aggregator, case.c, on_nonfinite=case.on_nonfinite)
        caught = [str(w.message) for w in seen if "RacoHook" in str(w.message)]
        if case.disable:
            setattr(hook.strategy, case.disable, lambda: None)
    oracle = Oracle(
        list(case.weights), case.aggregator, case.c, config["gradient_clipping"], case.optimizer, case.param_groups
    )
    result: dict = {
        "name": case.name,
        "update": [],
        "gram": [],
        "coef": [],
        "skipped": [],
        "raised": [],
        "warnings": caught,
    }
    result["params"] = []
    before = full_params(engine)
    result["initial"] = before
    for step in range(case.steps):
        poison = case.poison[1] if case.poison and case.poison[0] == step else None
        reference = oracle.step(step, world, m, shared=case.shared, poison=poison)
        if case.baseline:
            _baseline_step(engine, case, step, rank, m)
            stats = None
        else:
            _train_step(engine, hook, case, step, rank, m, len(case.weights))
            try:
                stats = hook.step()
            except NonFiniteGradientError as error:
                stats = error.stats
                result["raised"].append(step)
        after = full_params(engine)
        update = after - before
        before = after
        result["params"].append(after)
        if stats is not None:
            result["skipped"].append(bool(stats.skipped))
            result["nonfinite"] = stats.nonfinite_objectives or result.get("nonfinite", [])
            result["gram"].append(relative_error(stats.gram, reference.gram) if not reference.skipped else 0.0)
            if stats.coefficients is not None and reference.coefficients is not None:
                result["coef"].append(float((stats.coefficients - reference.coefficients).abs().max()))
            result["scalars"] = stats.scalars()
            result.setdefault("clip_active", []).append(bool(stats.clip_active))
            result.setdefault("solutions", []).append((stats.gram, stats.coefficients))
        if reference.skipped:
            result["update"].append(float(update.abs().max()))  # a skipped step must not move anything
        else:
            result["update"].append(relative_error(update, reference.update))
    result["shard_numel"] = None if hook is None else hook.shard_layout.numel
    result["buffer_shape"] = None if hook is None else tuple(hook._rows.buffer.shape)
    result["buffer_bytes"] = None if hook is None else hook.buffer_bytes
    result["padding_zero"] = None if hook is None else _padding_is_zero(hook)
    result["total_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine.destroy() if hasattr(engine, "destroy") else None
    return result


def _padding_is_zero(hook) -> bool:
    rows = hook._rows.buffer
    mask = hook.shard_layout.padding_mask().to(rows.device)
    return bool((rows[:, mask] == 0).all())


def api_errors(rank: int, world: int) -> dict[str, str]:
    """Misuse of the hook raises the error meant for it; returns {check: message} (empty message = not raised)."""
    import deepspeed

    from raco_ds.deepspeed import RacoHook, UnsupportedEngineError

    def engine_for(**kwargs):
        model = make_model()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(**kwargs))
        return engine

    messages: dict[str, str] = {}

    def expect(name: str, error: type[BaseException], fn) -> None:
        try:
            fn()
            messages[name] = ""
        except error as caught:
            messages[name] = str(caught)

    engine = engine_for(stage=2, micro_batches=2)
    expect("weights", ValueError, lambda: RacoHook(engine, [0.5, 0.6]))
    expect("aggregator", ValueError, lambda: RacoHook(engine, [0.5, 0.5], aggregator="nope"))
    hook = RacoHook(engine, [0.5, 0.5], "linear")
    expect("backward_outside", RuntimeError, lambda: hook.backward(engine(*batch(0, 0, rank, 0), 0)))

    def short_objective() -> None:
        with hook.objective(0):
            hook.backward(engine(*batch(0, 0, rank, 0), 0))

    expect("too_few_micro_batches", RuntimeError, short_objective)
    expect("step_early", RuntimeError, hook.step)

    def objective(k: int) -> None:
        with hook.objective(k):
            for j in range(2):
                hook.backward(engine(*batch(0, k, rank, j), k))

    objective(0)
    hook.discard_step()  # abandon the half-done step: the next one must start clean
    objective(0)
    objective(1)
    messages["discard_step"] = "clean" if not hook.step().skipped else "skipped"
    engine3 = engine_for(stage=3)
    hook3 = RacoHook(engine3, [0.5, 0.5], "linear")
    tokens, target = batch(0, 0, rank, 0, shared=True)
    expect(
        "zero3_shared_list", ValueError, lambda: hook3.backward_shared(list(engine3(tokens, target, -1).unbind())[:2])
    )
    bf16_stage0 = None
    try:
        bf16_stage0 = engine_for(stage=0, bf16=True, grad_accum_fp32=False)
    except (AssertionError, NotImplementedError, RuntimeError, ValueError) as error:  # DeepSpeed may refuse it first
        messages["bf16_stage0"] = f"deepspeed refused: {error}"
    if bf16_stage0 is not None:
        expect("bf16_stage0", UnsupportedEngineError, lambda: RacoHook(bf16_stage0, [0.5, 0.5]))
    return messages


def run_cases(rank: int, world: int, cases: list[Case], with_api_errors: bool = False) -> dict:
    """Run every case in turn in this rank (one launch, many engines): {case name: result}."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {case.name: run_case(rank, world, case) for case in cases}
    if with_api_errors:
        results["api_errors"] = api_errors(rank, world)
    return results
