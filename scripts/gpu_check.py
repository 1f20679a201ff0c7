"""One command that validates and measures raco_ds on one GPU in under eight minutes.

    python scripts/gpu_check.py --out $OUT/gpu_check.json  # one GPU (with two or more: exactness at world 2 too)
    python scripts/gpu_check.py --dry-run                  # = --device cpu --tiny: the same phases on gloo CPU ranks

Phases, each in its own process with a time budget (a phase over budget is
killed; what it finished is kept and the error is recorded, the next phase runs):

- ``exactness`` (world 1, and world 2 where two GPUs exist; NCCL on CUDA): one
  RACO step (K = 3, SGD, no clipping) through the hook's K passes and through
  one-pass capture, fp32 and bf16, ZeRO-3 and ZeRO-2, both data shapes between
  them, against the single-process oracle (full per-objective gradients in fp32,
  float64 Gram, the same solver): Gram, coefficients and parameter update.
- ``gram``: the local Gram of K x P fp32 shards (P of the timed model) by each
  method of ``raco_ds.gram`` against the time to read the K shards once (the
  memory-bandwidth floor) and against the float64 result.
- ``steps``: a ~1B Llama built from a config, bf16, activation checkpointing,
  per-objective pairs (4 per objective, 1024 tokens): the weighted-loss baseline
  (``linear``), K-pass RACO (``raco``) and one-pass RACO (``raco_onepass``), ZeRO-3
  and ZeRO-2, K = 2 and 4, repetitions interleaved (``benchmarks/_common.py``);
  step-time ratios to ``linear``, MFU (model FLOPs 6PT plus attention, no
  recomputation, over the device's dense bf16 peak) and each mode's peak memory.

Output: one table on stdout and JSON at ``--out`` (rewritten after every phase),
with the device named. Exit status 0 only when every phase finished and every
exactness check passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

from _common import (  # noqa: E402
    ModelSpec,
    RESULTS,
    PairData,
    Steps,
    destroy_engine,
    dpo_losses,
    interleave,
    machine,
    make_pairs,
    medians,
    peak_rss,
    print_table,
    reset_peak_rss,
    row_logps,
)

EXACT_K, EXACT_WEIGHTS, EXACT_LR = 3, (0.5, 0.3, 0.2), 0.1
TOLERANCES = {"fp32": 1e-4, "bf16": 5e-2}
"""Largest relative error of Gram and update, and absolute error of the coefficients, per precision.
fp32: the CPU tests hold 1e-5; GPU kernels pick algorithms per batch shape (the K-pass path runs
subsets of the rows), so 1e-4. bf16: bf16 rounding of activations and gradients (~4e-3 on CPU)."""

EXACT_CASES = (("fp32", 3, "objective"), ("fp32", 2, "shared"), ("bf16", 3, "shared"), ("bf16", 2, "objective"))
"""(precision, ZeRO stage, data shape): every precision, stage and shape at least once."""

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 peak by device-name fragment (first match wins), for MFU; --peak-tflops overrides."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What the run measures, and on what; :func:`plan_for` gives the GPU and the tiny CPU plan."""

    device: str
    """"cuda" or "cpu"."""
    model: ModelSpec
    """The timed model (bf16, activation checkpointing)."""
    exact_model: ModelSpec
    """The exactness model (small: the oracle holds K full gradients in float64)."""
    stages: tuple[int, ...] = (3, 2)
    """ZeRO stages timed, in order (a phase killed late keeps the first)."""
    ks: tuple[int, ...] = (2, 4)
    """Numbers of objectives timed, in order."""
    pairs: int = 4
    """Preference pairs per objective per rank in the timed steps (2 rows each)."""
    exact_pairs: int = 2
    """Pairs per objective per rank in the exactness step."""
    reps: int = 3
    """Timed repetitions of each mode after one warm-up (which also measures peak memory)."""
    gram_numel: int = 0
    """Shard elements per row in the Gram phase (0: the timed model's P)."""
    budgets_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per phase (``exactness`` for each world)."""
    total_s: float = 460.0
    """The whole run's limit, start-up and output included."""
    peak_tflops: float | None = None
    """Dense bf16 peak for MFU (None: from PEAK_BF16_TFLOPS by device name; unknown on CPU)."""

    @property
    def backend(self) -> str:
        """The process-group backend."""
        return "nccl" if self.device == "cuda" else "gloo"


def plan_for(device: str, tiny: bool, peak_tflops: float | None) -> Plan:
    """The ~1B GPU plan (under 8 minutes on one H100/H200), or the tiny one (CPU: seconds, the CI dry run)."""
    if tiny:
        small = ModelSpec(vocab=128, hidden=32, layers=1, seq=16)
        # One K in the timed phase: K = 4 runs the same code, and the CI test must stay near a minute.
        return Plan(device=device, model=small, exact_model=small, ks=(2,), pairs=1, exact_pairs=1, reps=1, gram_numel=1 << 16,
                    budgets_s={"exactness": 120, "gram": 60, "steps": 180}, total_s=420, peak_tflops=peak_tflops)  # fmt: skip
    llama_1b = ModelSpec(vocab=32768, hidden=2048, layers=18, heads=32, kv_heads=8, seq=1024)  # P = 1.0B
    exact = ModelSpec(vocab=512, hidden=128, layers=2, heads=4, kv_heads=2, seq=64)
    return Plan(device=device, model=llama_1b, exact_model=exact,
                budgets_s={"exactness": 90, "gram": 45, "steps": 240}, peak_tflops=peak_tflops)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the phase bodies


class _RecordingSteps(Steps):
    """:class:`Steps` that keeps the hook's last stats (the exactness phase compares them with the oracle)."""

    last_stats: Any = None

    def _with_hook(self, stats: Any, out: dict[str, float], seconds_step: float) -> dict[str, float]:
        self.last_stats = stats
        return super()._with_hook(stats, out, seconds_step)


def _on(data: PairData, device: torch.device) -> PairData:
    """``data`` with every tensor on ``device``."""
    moved = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    return PairData(**{name: None if value is None else value.to(device) for name, value in moved.items()})


def _rank_pairs(shape: str, k: int, pairs: int, spec: ModelSpec, rank: int) -> PairData:
    """Rank ``rank``'s pairs (the oracle rebuilds every rank's from the same seed)."""
    return make_pairs(shape, k, pairs, spec, seed=1000 * rank + k)  # type: ignore[arg-type]


def _build(spec: ModelSpec, device: torch.device, checkpointing: bool = False) -> torch.nn.Module:
    # Built on the device: the same seed gives the same weights to the engine's model and the oracle's,
    # and a 1B model initialises in seconds there instead of a minute on the host.
    with torch.device(device):
        model = spec.build()
    if checkpointing:
        from raco_ds.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    return model


def _engine(spec: ModelSpec, device: torch.device, stage: int, rows: int, precision: str, *,
            exactness: bool, overlap_comm: bool = False, checkpointing: bool = False) -> Any:
    """A DeepSpeed engine: exactness = client SGD (update linear in the gradient), no clipping; else
    ``_common``'s torch AdamW (DeepSpeed's FusedAdam JIT fails on Hopper, HOOKS.md) with clipping 1.0."""
    import deepspeed
    from _common import ds_config

    config = ds_config(stage, rows)
    config["zero_optimization"]["overlap_comm"] = overlap_comm
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    model = _build(spec, device, checkpointing)
    optimizer = None
    if exactness:
        del config["optimizer"]
        config["gradient_clipping"] = 0.0
        optimizer = torch.optim.SGD(model.parameters(), lr=EXACT_LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=model.parameters(),
                                      config=config)  # fmt: skip
    return engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _synced(fn: Callable[[], dict[str, float]], device: torch.device) -> Callable[[], dict[str, float]]:
    """``fn`` followed by a device synchronize, so a wall clock around it covers its kernels."""

    def run() -> dict[str, float]:
        out = fn()
        _sync(device)
        return out

    return run


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def _peak_gib(device: torch.device) -> float:
    """Peak since :func:`_reset_peak`: CUDA memory allocated, or on CPU the process's resident set."""
    return (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()) / 2**30


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall ms of ``fn`` over ``reps`` calls after one warm-up, device synchronised."""
    import statistics

    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def _error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()[-800:]


class _Results:
    """Rank 0 appends one JSON line per finished case, so a phase killed later keeps what it did."""

    def __init__(self, path: str, rank: int) -> None:
        self.path, self.rank = path, rank

    def emit(self, record: dict[str, Any]) -> None:
        """Append ``record`` (rank 0 only)."""
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")


# ---------------------------------------------------------------------------------------------------
# Phase bodies: body(rank, world, plan, results_path), on every rank


def _exactness_body(rank: int, world: int, plan: Plan, results_path: str) -> None:
    """Each EXACT_CASES case, K-pass hook and one-pass capture, against the single-process oracle."""
    from raco_ds.solver import aggregate

    device = _device(plan, rank)
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 check must not run its matmuls in TF32
    torch.backends.cudnn.allow_tf32 = False
    results, spec = _Results(results_path, rank), plan.exact_model
    oracles: dict[str, torch.Tensor] = {}
    for precision, stage, shape in EXACT_CASES:
        if shape not in oracles:
            oracles[shape] = _oracle_gradients(spec, shape, plan.exact_pairs, world, device)
        grads = oracles[shape]
        gram = grads @ grads.T
        weights = torch.tensor(EXACT_WEIGHTS, dtype=torch.float64)
        coefficients = aggregate("raco", gram.cpu(), weights, 0.4).coefficients
        expected = {"gram": gram, "coefficients": coefficients,
                    "update": -EXACT_LR * (coefficients.to(grads) @ grads).cpu()}  # fmt: skip
        for mode in ("raco", "raco_onepass"):
            case = {"kind": "exactness", "world": world, "precision": precision, "stage": stage, "shape": shape,
                    "k": EXACT_K, "mode": mode, "tolerance": TOLERANCES[precision]}  # fmt: skip
            try:
                data = _on(_rank_pairs(shape, EXACT_K, plan.exact_pairs, spec, rank), device)
                results.emit({**case, **_exact_step(spec, device, stage, precision, mode, data, expected)})
            except Exception as error:  # recorded; the next case runs
                results.emit({**case, "error": _error_text(error)})
            _empty_cache(device)


def _exact_step(spec: ModelSpec, device: torch.device, stage: int, precision: str, mode: str, data: PairData,
                expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One RACO step of ``mode`` on a fresh engine; its errors against the oracle's ``expected``."""
    from ds_hook_cases import full_params

    engine = _engine(spec, device, stage, data.input_ids.shape[0], precision, exactness=True)
    try:
        steps = _RecordingSteps(engine, data, list(EXACT_WEIGHTS))
        if mode == "raco_onepass" and (reason := steps.onepass_reason()) is not None:
            return {"error": f"one-pass unsupported here: {reason}"}
        before = full_params(engine)
        getattr(steps, mode)()
        update = full_params(engine) - before
        stats = steps.last_stats
        errors = {
            "gram_rel": _relative(stats.gram, expected["gram"]),
            "coef_abs": float((stats.coefficients - expected["coefficients"]).abs().max()),
            "update_rel": _relative(update, expected["update"]),
        }
        return {**errors, "ok": max(errors.values()) <= TOLERANCES[precision]}
    finally:
        destroy_engine(engine)


def _oracle_gradients(spec: ModelSpec, shape: str, pairs: int, world: int, device: torch.device) -> torch.Tensor:
    """(K, P) float64: each objective's fp32 gradient averaged over every rank's pairs (what ZeRO reduces)."""
    model = _build(spec, device)
    params = list(model.parameters())
    grads = torch.zeros(EXACT_K, sum(p.numel() for p in params), dtype=torch.float64, device=device)
    for rank in range(world):
        data = _on(_rank_pairs(shape, EXACT_K, pairs, spec, rank), device)
        losses = dpo_losses(row_logps(model, data), data)
        for k in range(EXACT_K):
            parts = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
            flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, parts, strict=True)]
            grads[k] += torch.cat([g.reshape(-1) for g in flat]).double() / world
    return grads


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def _gram_body(rank: int, world: int, plan: Plan, results_path: str) -> None:
    """Per K: each Gram method's time and error against the read floor and the float64 result."""
    device, results = _device(plan, rank), _Results(results_path, rank)
    numel = plan.gram_numel or plan.model.num_params()
    for k in (2, 4):
        case = {"kind": "gram", "k": k, "numel": numel}
        try:
            generator = torch.Generator(device).manual_seed(k)
            # Scales 1e-3..1e2 per row: gradients of different objectives differ by orders of magnitude.
            scales = torch.logspace(-3, 2, k, device=device)[:, None]
            _time_gram_methods(torch.randn(k, numel, device=device, generator=generator).mul_(scales), case, results)
        except Exception as error:
            results.emit({**case, "error": _error_text(error)})
        _empty_cache(device)


def _time_gram_methods(shards: torch.Tensor, case: dict[str, Any], results: _Results) -> None:
    from raco_ds.gram import fused_gram_available, local_gram

    device, (k, numel) = shards.device, shards.shape
    read_ms = _median_ms(lambda: shards.sum(dim=1), device, reps=5)
    exact = local_gram(shards, method="float64")
    methods = ["auto", "fp32_chunks", "float64"] + (["fused"] if fused_gram_available(device) else [])
    for method in methods:
        try:
            gram = local_gram(shards, method=method)  # type: ignore[arg-type]
            ms = _median_ms(lambda m=method: local_gram(shards, method=m), device, reps=3)
            results.emit({**case, "method": method, "ms": ms, "read_ms": read_ms, "x_read": ms / read_ms,
                          "read_gb_s": k * numel * shards.element_size() / read_ms / 1e6,
                          "rel_err": float((gram - exact).abs().max() / exact.abs().max())})  # fmt: skip
        except Exception as error:  # e.g. the kernel failing to compile: the other methods still run
            results.emit({**case, "method": method, "error": _error_text(error)})


def _steps_body(rank: int, world: int, plan: Plan, results_path: str) -> None:
    """Per (K, ZeRO stage): linear vs K-pass RACO vs one-pass RACO, interleaved; MFU and peak memory."""
    device, results = _device(plan, rank), _Results(results_path, rank)
    for k in plan.ks:
        for stage in plan.stages:
            case: dict[str, Any] = {"kind": "steps", "stage": stage, "k": k, "precision": "bf16"}
            try:
                results.emit({**case, **_time_modes(plan, device, stage, k, rank)})
            except Exception as error:
                results.emit({**case, "error": _error_text(error)})
            # After the case's engine and hooks are gone (its locals): a 1B model's K shard rows are GiBs.
            _empty_cache(device)


def _time_modes(plan: Plan, device: torch.device, stage: int, k: int, rank: int) -> dict[str, Any]:
    """One engine: each mode's warm-up (peak memory), then the modes interleaved; medians, ratios, MFU."""
    spec = plan.model
    data = _on(_rank_pairs("objective", k, plan.pairs, spec, rank), device)
    rows = data.input_ids.shape[0]
    engine = _engine(spec, device, stage, rows, "bf16", exactness=False, checkpointing=True,
                     overlap_comm=device.type == "cuda")  # fmt: skip
    try:
        steps = Steps(engine, data, [1.0 / k] * k)
        modes = {"linear": steps.linear, "raco": steps.raco, "raco_onepass": steps.raco_onepass}
        out: dict[str, Any] = {"rows": rows, "tokens": rows * spec.seq, "model_tflop": _model_flops(spec, rows) / 1e12}
        if (reason := steps.onepass_reason()) is not None:
            del modes["raco_onepass"]
            out["onepass_skipped"] = reason
        peaks, errors = {}, {}
        for name in list(modes):  # warm-up; a mode that fails here is left out of the timing
            try:
                _reset_peak(device)
                modes[name]()
                _sync(device)
                peaks[name] = _peak_gib(device)
            except Exception as error:
                errors[name] = _error_text(error)
                del modes[name]
        samples = interleave({n: _synced(fn, device) for n, fn in modes.items()}, plan.reps, warmup=0)
        med = {name: medians(s) for name, s in samples.items()}
        peak_tflops = plan.peak_tflops or _peak_tflops(device)
        summaries = {name: _mode_summary(m, med.get("linear"), out["model_tflop"], peak_tflops) for name, m in med.items()}
        return {**out, "peak_gib": peaks, "errors": errors, "modes": summaries}
    finally:
        destroy_engine(engine)


def _mode_summary(m: dict[str, float], linear: dict[str, float] | None, model_tflop: float,
                  peak_tflops: float | None) -> dict[str, Any]:
    """ms/step, ratio to linear, achieved TFLOP/s and MFU of one mode's medians."""
    seconds = m["total"]
    achieved = model_tflop / seconds
    return {"ms": 1e3 * seconds, "x_linear": seconds / linear["total"] if linear else None,
            "tflop_s": achieved, "mfu": achieved / peak_tflops if peak_tflops else None,
            "hook_gram_ms": 1e3 * m["hook_gram"] if "hook_gram" in m else None}  # fmt: skip


def _model_flops(spec: ModelSpec, rows: int) -> float:
    """Model FLOPs of one training step over ``rows`` rows (PaLM's count: 6 x matmul parameters x tokens
    plus 12 x layers x hidden x seq per token for attention; recomputation not counted)."""
    with torch.device("meta"):
        model = spec.build()
    matmul_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    tokens = rows * spec.seq
    return 6.0 * matmul_params * tokens + 12.0 * spec.layers * spec.hidden * spec.seq * tokens


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS.items() if fragment in name), None)


def _device(plan: Plan, rank: int) -> torch.device:
    return torch.device("cuda", rank) if plan.device == "cuda" else torch.device("cpu")


def _empty_cache(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


PHASES: dict[str, Callable[[int, int, Plan, str], None]] = {
    "exactness": _exactness_body, "gram": _gram_body, "steps": _steps_body,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Running a phase: a worker process (killed when over budget), its ranks, the results it leaves


def _rank_body(rank: int, world: int, phase: str, plan: Plan, results_path: str) -> None:
    import logging
    import warnings

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # torch 2.13 deprecates the *_tensor collective names that DeepSpeed and raco_ds still call.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning)
    deepspeed.init_distributed(dist_backend=plan.backend)  # wraps the group already made
    PHASES[phase](rank, world, plan, results_path)


def run_worker(phase: str, world: int, plan: Plan, results_path: str) -> None:
    """In the phase's own process: run ``phase`` on ``world`` ranks (world 1 here, in this process)."""
    import torch.distributed as dist
    from multirank import free_port, run_ranks

    if world > 1:
        run_ranks(_rank_body, world, phase, plan, results_path, backend=plan.backend)
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))  # fmt: skip
    if plan.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(plan.backend, rank=0, world_size=1)
    _rank_body(0, 1, phase, plan, results_path)


def _phase_runs(plan: Plan) -> Iterator[tuple[str, str, int]]:
    """(label, phase, world) in the order run: the cheap checks first, the long timing last."""
    yield "exactness", "exactness", 1
    yield "gram", "gram", 1
    yield "steps", "steps", 1
    if plan.device == "cuda" and torch.cuda.device_count() >= 2:
        yield "exactness_world2", "exactness", 2


def run_phase(label: str, phase: str, world: int, plan: Plan, argv: list[str], deadline: float,
              scratch: Path) -> dict[str, Any]:
    """Run one phase in a worker process within its budget (and the run's deadline); its records and status."""
    budget = min(plan.budgets_s.get(label, plan.budgets_s[phase]), deadline - time.monotonic())
    if budget < 5:
        return {"status": "skipped", "world": world, "error": "no time left in the run's limit", "records": []}
    results = scratch / f"{label}.jsonl"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--phase", phase, "--world", str(world),
               "--results", str(results)]  # fmt: skip
    return {"world": world, **run_budgeted(command, budget, results, scratch / f"{label}.log")}


def run_budgeted(command: list[str], budget: float, results: Path, log: Path) -> dict[str, Any]:
    """Run ``command``, killed with all it spawned after ``budget`` seconds; the JSON lines it left in ``results``."""
    started = time.monotonic()
    with open(log, "w") as out:
        # Its own session: on timeout the worker and every rank it spawned are killed together.
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            rc = child.wait(timeout=budget)
            status, error = ("ok", None) if rc == 0 else ("failed", f"exit status {rc}")
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status, error = "timed_out", f"over its {budget:.0f} s budget: killed"
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    outcome = {"status": status, "seconds": round(time.monotonic() - started, 1), "budget_s": round(budget),
               "error": error, "records": records}  # fmt: skip
    if status != "ok":
        outcome["log_tail"] = log.read_text()[-3000:]
    return outcome


# ---------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(phases: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per record (and per phase that did not finish) for the single stdout table."""
    rows = []
    for label, outcome in phases.items():
        for r in outcome["records"]:
            if "error" in r and r.get("kind") != "steps":
                rows.append([label, _case(r), r.get("mode", r.get("method", "-")), "-", "-", "-", "-", "-", "ERROR: " + r["error"][:120]])
            elif r["kind"] == "exactness":
                errors = f"{r['gram_rel']:.1e}/{r['coef_abs']:.1e}/{r['update_rel']:.1e}"
                rows.append([label, _case(r), r["mode"], "-", "-", "-", "-", errors, "ok" if r["ok"] else "FAIL"])
            elif r["kind"] == "gram":
                rows.append([label, _case(r), r["method"], f"{r['ms']:.2f}", f"{r['x_read']:.2f} (read {r['read_ms']:.2f} ms)",
                             "-", "-", f"{r['rel_err']:.1e}", "ok"])  # fmt: skip
            elif "error" in r:
                rows.append([label, _case(r), "-", "-", "-", "-", "-", "-", "ERROR: " + r["error"][:120]])
            else:
                for mode, m in r["modes"].items():
                    rows.append([label, _case(r), mode, f"{m['ms']:.1f}", _fmt(m["x_linear"], ".2f"),
                                 _fmt(None if m["mfu"] is None else 100 * m["mfu"], ".1f"),
                                 _fmt(r["peak_gib"].get(mode), ".2f"), "-", "ok"])  # fmt: skip
                rows += [[label, _case(r), mode, "-", "-", "-", "-", "-", "ERROR: " + e[:120]] for mode, e in r["errors"].items()]
        if outcome["status"] != "ok":
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", f"{outcome['status'].upper()}: {outcome['error']}"])
    return rows


def _case(r: dict[str, Any]) -> str:
    if r["kind"] == "exactness":
        return f"{r['precision']} ZeRO-{r['stage']} {r['shape']} K={r['k']} N={r['world']}"
    if r["kind"] == "gram":
        return f"K={r['k']} n={r['numel']:.2e}"
    rows = f" {r['rows']}x{r['tokens'] // r['rows']}" if "rows" in r else ""
    return f"{r['precision']} ZeRO-{r['stage']} K={r['k']}{rows}"


def passed(phases: dict[str, dict[str, Any]]) -> bool:
    """Every phase finished, no record has an error, every exactness check is within tolerance."""
    for outcome in phases.values():
        if outcome["status"] != "ok":
            return False
        for r in outcome["records"]:
            if "error" in r or r.get("errors") or r.get("ok") is False:
                return False
    return True


def device_name(plan: Plan) -> str:
    """The GPU's name and count, or the CPU's."""
    if plan.device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU: {machine()['cpu']} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; --dry-run is --device cpu --tiny."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"), help="where to write the JSON results")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu needs --tiny")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (seconds): the CI dry run, or a quick GPU smoke")
    parser.add_argument("--dry-run", action="store_true", help="--device cpu --tiny")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device for MFU (default: by name)")
    worker = parser.add_argument_group("internal: one phase in a worker process")
    worker.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    worker.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    worker.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs only the tiny sizes: add --tiny (or use --dry-run)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device visible: run on a GPU machine, or --dry-run for the CPU smoke run")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every phase within the limits, print the table, write the JSON; 0 when everything passed."""
    args = parse_args(argv)
    plan = plan_for(args.device, args.tiny, args.peak_tflops)
    if args.phase:
        run_worker(args.phase, args.world, plan, args.results)
        # Leave without interpreter teardown: DeepSpeed's process groups and threads can abort in C++
        # destructors after the phase has finished (tests/multirank.py does the same).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    deadline = time.monotonic() + plan.total_s - 10  # 10 s for the start-up so far and the report
    worker_argv = ["--device", args.device] + (["--tiny"] if args.tiny else [])
    worker_argv += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    report: dict[str, Any] = {"benchmark": "gpu_check", "device": device_name(plan), "machine": machine(),
                              "plan": dataclasses.asdict(plan), "phases": {}}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {report['device']}: phases {[label for label, _, _ in _phase_runs(plan)]}, "
          f"limit {plan.total_s:.0f} s", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for label, phase, world in _phase_runs(plan):
            outcome = run_phase(label, phase, world, plan, worker_argv, deadline, Path(scratch))
            report["phases"][label] = outcome
            print(f"  {label}: {outcome['status']} in {outcome.get('seconds', 0)} s", flush=True)
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # partial results survive a later kill
    report["passed"] = passed(report["phases"])
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(
        f"raco_ds gpu_check: {report['device']}, torch {torch.__version__}, {report['machine']['date_utc']} UTC",
        ["phase", "case", "mode", "ms", "x", "MFU %", "peak GiB", "error", "status"],
        table_rows(report["phases"]),
        note="x: steps = ratio to linear (same engine, interleaved medians); gram = ratio to reading the K shards once. "
             "error: exactness = Gram rel / coefficients abs / update rel vs the single-process oracle; gram = max abs / max |H| "
             "vs float64. peak: CUDA max allocated (CPU: process peak RSS).",
    )  # fmt: skip
    print(f"{'PASSED' if report['passed'] else 'NOT PASSED'}; wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
