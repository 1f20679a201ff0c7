"""The training loop: RACO over K preference objectives on a DeepSpeed engine (nanoGPT-style).

:func:`train` is one straight path, split into commented phases:

0. setup       distributed (gloo on CPU), threads, seeds, run folder + lock, signals
1. build       tokenizer and model (bottom frozen), data split and streams, the
               DeepSpeed engine ("auto" fields filled from the config), RacoHook
2. reference   the initial model's log-probs of every used pair, computed once
               and saved in the run folder (a resumed run reuses them, or
               recomputes a missing or damaged file before loading its checkpoint)
3. resume      engine + trainer state from the newest verified checkpoint
4. evaluate    held-out per-objective accuracy before training
5. loop        fetch -> per-objective passes -> hook.step() -> log -> eval -> checkpoint
6. finish      evaluate after, final checkpoint, HF export, console summary

One optimizer step is a capture strategy's ``step`` (raco_ds.trainer.capture):
one forward and backward per micro-batch for all K objectives (one-pass capture,
the default where the engine supports it), or one pass per objective; then
``hook.step()`` forms the Gram, solves, writes the combined gradient and steps
the engine. Which capture ran is logged at start-up and in TensorBoard's text.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raco_ds.diskcache import atomic_file
from raco_ds.trainer.config import ConfigError, TrainConfig, save_config
from raco_ds.trainer.metrics import TAGS, memory_scalars, raco_scalars
from raco_ds.trainer.trackers import open_trackers

__all__ = ["RunResult", "TooManySkippedSteps", "train"]

logger = logging.getLogger("raco_ds.trainer")

_PER_OBJECTIVE = TAGS["per_objective"]  # loss, accuracy, margin, chosen_reward, rejected_reward


@dataclass
class RunResult:
    """What a finished (or stopped) run reports back to the launcher (identical on every rank)."""

    step: int
    """Optimizer steps completed."""
    objectives: list[str]
    """Objective names."""
    eval_before: dict[str, list[float]] | None
    """Held-out metrics before training ({metric: [per objective]})."""
    eval_after: dict[str, list[float]] | None
    """Held-out metrics after the last step."""
    output_dir: Path
    """The run folder."""
    export_dir: Path | None = None
    """The HF export folder (None when export is off)."""
    stopped_early: bool = False
    """True when the run checkpointed and stopped before max_steps (signal or stop_after_steps)."""
    seconds: float = 0.0
    """Wall time of train()."""
    history: list[dict[str, float]] = field(default_factory=list)
    """The per-step scalars logged in this process (also in <output_dir>/metrics.jsonl)."""
    intervals: dict[str, Any] = field(default_factory=dict)
    """Held-out accuracy/margin after training with bootstrap 95% intervals, per objective on all,
    disagreeing and agreeing pairs ({"<metric><subset>/<objective>": Estimate})."""


# ---------------------------------------------------------------------------
# Phase 0: setup.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed the way the ``deepspeed`` launcher expects; (rank, world, device).

    Plain ``python launchers/train.py`` has no launcher environment: it becomes
    a world of one. On CPU the backend is gloo (DeepSpeed's CPU accelerator
    would ask for oneCCL). Each rank gets an equal share of the cores, so
    ranks on one machine do not oversubscribe it.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, local_world)))
    if on_cpu:
        # DeepSpeed JIT-compiles a shared-memory op at start-up on CPU that only its *inference*
        # all-reduce uses (deepspeed/comm/torch.py); training collectives go through gloo. On a fresh
        # machine that build costs minutes of the main job's budget, so it is skipped here.
        # (importlib: the attribute deepspeed.comm.torch is shadowed by the real torch module.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not on_cpu:
        accelerator.set_device(local_rank)
    device = torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(local_rank))
    return dist.get_rank(), dist.get_world_size(), device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_logging(rank: int) -> None:
    # torch's c10d wrapper warns on every ZeRO reduce-scatter; DeepSpeed, not the user, must move.
    warnings.filterwarnings(
        "ignore",
        message=r".*torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor). is deprecated",
        category=FutureWarning,
    )
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[%(asctime)s raco] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass


# ---------------------------------------------------------------------------
# Phase 1: build.


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: the longest ModuleList in the model (model.layers, transformer.h, ...)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError(
            f"model.trainable_last_blocks: found no list of blocks in {type(model).__name__}; set it to -1 (train all)"
        )
    return max(lists, key=len)


def last_blocks(model: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The last ``count`` transformer blocks (-1: all), as model.trainable_last_blocks selects them."""
    blocks = list(_blocks(model))
    if count > len(blocks):
        raise ConfigError(
            f"model.trainable_last_blocks={count} but the model has {len(blocks)} blocks; "
            f"use at most {len(blocks)} or -1 for all parameters"
        )
    return blocks if count < 0 else blocks[len(blocks) - count :]


def freeze_bottom(model: torch.nn.Module, cfg: TrainConfig) -> tuple[int, int]:
    """Apply model.trainable_last_blocks / train_final_norm / train_embeddings; (trainable, total) params.

    Freezing the bottom of the network also ends the backward at the first
    trainable block: nothing below it needs an activation gradient. With LoRA
    (model.lora.r > 0, ``model`` from raco_ds.lora.add_lora) peft has already
    frozen everything but the adapters, which sit on those same blocks.
    """
    mc = cfg.model
    if mc.trainable_last_blocks >= 0 and not mc.lora.r:
        model.requires_grad_(False)
        for block in last_blocks(model, mc.trainable_last_blocks):
            block.requires_grad_(True)
        if mc.train_final_norm:
            inner = getattr(model, "base_model", model)
            norm = (
                getattr(inner, "norm", None) or getattr(inner, "final_layernorm", None) or getattr(inner, "ln_f", None)
            )
            if norm is None:
                raise ConfigError("model.train_final_norm: the model has no final norm named norm/final_layernorm/ln_f")
            norm.requires_grad_(True)
        if mc.train_embeddings:
            model.get_input_embeddings().requires_grad_(True)
            if model.get_output_embeddings() is not None:
                model.get_output_embeddings().requires_grad_(True)
        if mc.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    if trainable == 0:
        raise ConfigError("no trainable parameters: raise model.trainable_last_blocks or set it to -1")
    return trainable, sum(p.numel() for p in unique)


@dataclass
class _Run:
    """Everything the phases share (built once in phase 1)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    names: list[str]
    engine: Any
    hook: Any
    tokenizer: Any
    dataset: Any
    collator: Any
    split: Any
    streams: list
    out: Path
    capture: Any = None
    """The step's capture strategy (raco_ds.trainer.capture), chosen once after the hook exists."""
    nonfinite_objective: int | None = None
    """The objective whose loss is made NaN in the current step (debug.inject_nonfinite), or None."""

    def losses_from_logits(self, batch, logits: torch.Tensor):
        """(PreferenceLosses, summed response log-probs (2B,)) of a micro-batch from its logits."""
        from raco_ds.losses import preference_losses

        logps, tokens = batch.response_logps(logits)
        b, ref = batch.num_pairs, batch.reference_logps
        out = preference_losses(
            logps[:b], logps[b:], batch.labels,
            reference_logps_a=None if ref is None else ref[:b], reference_logps_b=None if ref is None else ref[b:],
            loss=self.cfg.loss.name, beta=self.cfg.loss.beta, lengths_a=tokens[:b], lengths_b=tokens[b:],
            **self.cfg.loss.options,
        )  # fmt: skip
        if self.nonfinite_objective is not None:
            from raco_ds.trainer.faults import with_nan_loss

            out = dataclasses.replace(out, losses=with_nan_loss(out.losses, self.nonfinite_objective))
        return out, logps

    def losses(self, batch):
        """Forward a micro-batch through the engine; its K per-objective PreferenceLosses."""
        logits = self.engine(**batch.model_inputs(), use_cache=False).logits
        return self.losses_from_logits(batch, logits)[0]


def build_data(cfg: TrainConfig, tokenizer, rank: int, world: int):
    """Load, tokenise and split the run's data; return (dataset, collator, split, per-rank batch streams)."""
    from raco_ds.data.batch import PreferenceCollator
    from raco_ds.data.loading import load_preference_data
    from raco_ds.data.tokenization import TokenizationConfig, tokenize_preference_data
    from raco_ds.trainer.data import BatchStream, split_pairs

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


def _build(cfg: TrainConfig, rank: int, world: int, device: torch.device, out: Path) -> _Run:
    import deepspeed

    from raco_ds.deepspeed import RacoHook
    from raco_ds.models import load_model, load_tokenizer, resolve_model_path
    from raco_ds.trainer.capture import choose_capture
    from raco_ds.trainer.ds_config import fill_ds_config, read_ds_config

    # Read and check the DeepSpeed config before the (slow) model load: a mismatch fails in seconds.
    raw_ds, ds_name = read_ds_config(cfg.ds_config)
    fill_ds_config(raw_ds, cfg, world_size=world, hidden_size=1, name=ds_name)

    # A short model name is converted/built once into the cache on first use: rank 0 does it alone.
    if rank == 0:
        resolve_model_path(cfg.model.name_or_path)
    if world > 1:
        dist.barrier()
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load_model(
        cfg.model.name_or_path, dtype=cfg.model.dtype, gradient_checkpointing=cfg.model.gradient_checkpointing
    )
    if cfg.model.lora.r:
        from raco_ds.lora import add_lora

        blocks = last_blocks(model, cfg.model.trainable_last_blocks)
        model = add_lora(model, cfg.model.lora, blocks, base_name=cfg.model.name_or_path)
    trainable, total = freeze_bottom(model, cfg)
    dataset, collator, split, streams = build_data(cfg, tokenizer, rank, world)

    hidden = getattr(model.config, "hidden_size", None)
    ds_config = fill_ds_config(raw_ds, cfg, world_size=world, hidden_size=hidden, name=ds_name)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
    )
    hook = RacoHook(
        engine, weights=cfg.objectives.weights, aggregator=cfg.raco.aggregator, c=cfg.raco.c,
        on_nonfinite=cfg.raco.on_nonfinite,
    )  # fmt: skip
    run = _Run(cfg, rank, world, device, list(cfg.objectives.names), engine, hook, tokenizer, dataset, collator,
               split, streams, out)  # fmt: skip
    if cfg.data.padding_free:  # a model that ignores position-id packing would train on mixed sequences
        from raco_ds.data.packing import check_packed_forward

        check_packed_forward(engine, [dataset[i] for i in split.train_pools[0][:4]], collator)
    run.capture = choose_capture(run)

    opt = cfg.optimisation
    per_step = opt.micro_batch_size * opt.gradient_accumulation_steps * world
    shape = "shared pairs (one forward for all objectives)" if dataset.shared else "per-objective pairs (K passes)"
    last = cfg.model.trainable_last_blocks
    if cfg.model.lora.r:
        from raco_ds.lora import describe_lora

        trained = f"{describe_lora(model)} of {'all blocks' if last < 0 else f'the last {last} blocks'}"
    else:
        trained = "all" if last < 0 else f"last {last} blocks{' + final norm' if cfg.model.train_final_norm else ''}"
    logger.info("model %s: %.2fM parameters, %.2fM trainable (%s)", cfg.model.name_or_path, total / 1e6,
                trainable / 1e6, trained)  # fmt: skip
    logger.info("data %s: %d pairs, %s; %s", cfg.data.dataset, len(dataset), shape, split.describe())
    logger.info("batch: %d pairs/micro-batch/rank x %d micro-batches/objective x %d ranks = %d pairs per objective "
                "per step; %d steps", opt.micro_batch_size, opt.gradient_accumulation_steps, world, per_step,
                opt.max_steps)  # fmt: skip
    logger.info("DeepSpeed %s: %s", Path(ds_name).name, hook.engine_layout.describe())
    logger.info("RACO: objectives %s, weights %s, aggregator %s (c=%g), loss %s (beta=%g), capture %s",
                run.names, [round(w, 4) for w in cfg.objectives.weights], cfg.raco.aggregator, cfg.raco.c,
                cfg.loss.name, cfg.loss.beta, run.capture.name)  # fmt: skip
    return run


# ---------------------------------------------------------------------------
# Phase 3: the reference log-probs.


def _reference(run: _Run, resumed: bool):
    """The initial model's scores of every train and held-out pair, computed once per run folder.

    Called before a resumed run loads its checkpoint, so a missing or damaged file is
    recomputed from the same initial weights instead of ending the run.
    """
    from raco_ds.lora import adapters_disabled
    from raco_ds.losses import get_loss
    from raco_ds.models import model_identity
    from raco_ds.trainer.eval import score_pairs
    from raco_ds.trainer.reference_cache import REFERENCE_FILE, OtherRunReferenceError, load_reference, save_reference

    path = run.out / REFERENCE_FILE
    reference_free = get_loss(run.cfg.loss.name).reference_free
    indices = sorted(set(run.split.eval_indices).union(*([] if reference_free else run.split.train_pools)))
    # Valid for the same tokenised data, the same initial weights and the same pairs (a rerun reuses it).
    key = {
        "dataset": run.dataset.fingerprint,
        "model": model_identity(run.cfg.model.name_or_path, run.cfg.model.dtype),
        "indices": indices,
    }
    try:
        cached = load_reference(path, key)
    except OtherRunReferenceError as err:
        if resumed:
            raise ConfigError(
                f"{err}; a resumed run must keep --model and the data options of the run it resumes"
            ) from None
        cached = None
    if cached is not None:
        return cached
    started = time.perf_counter()
    with adapters_disabled(run.engine):  # with LoRA the reference is the base model (the initial one: B = 0)
        scores = score_pairs(run.engine, run.dataset, indices, run.cfg.logging.eval_batch_size, run.collator)
    logger.info("reference log-probs of %d pairs in %.1fs (the initial model is the reference)",
                len(indices), time.perf_counter() - started)  # fmt: skip
    if run.rank == 0:
        save_reference(path, key, scores)
    return scores


# ---------------------------------------------------------------------------
# Phase 5: what one optimizer step records (the step itself: raco_ds.trainer.capture).


class _StepRecord:
    """Per-objective metric sums of one step (pair-weighted), tokens and pass times."""

    def __init__(self, k: int) -> None:
        self.sums = torch.zeros(k, len(_PER_OBJECTIVE) + 1, dtype=torch.float64)  # metrics..., pairs
        self.tokens = 0
        self.pass_seconds = [float("nan")] * k  # per objective; NaN where passes are not per objective
        self.passes_seconds = 0.0  # forward + backward of the step (all objectives), up to hook.step()
        self.scatter_seconds = float("nan")  # one-pass capture's reduce-scatter into the hook's buffer

    def add(self, out, objectives: range | list[int]) -> None:
        """Add a micro-batch's PreferenceLosses for ``objectives``."""
        values = [out.losses.detach(), out.accuracy, out.margin, out.chosen_reward, out.rejected_reward]
        n = out.num_pairs.to(torch.float64)
        for k in objectives:
            if n[k] > 0:
                self.sums[k, :-1] += torch.stack([v[k].double().cpu() for v in values]) * n[k]
                self.sums[k, -1] += n[k]

    def reduced(self, world: int) -> tuple[torch.Tensor, int]:
        """Metric means per objective over all ranks ((K, 5), NaN without pairs) and the total tokens."""
        flat = torch.cat([self.sums.flatten(), torch.tensor([float(self.tokens)], dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(flat)
        sums = flat[:-1].view_as(self.sums)
        pairs = sums[:, -1:]
        means = torch.where(pairs > 0, sums[:, :-1] / pairs.clamp_min(1), torch.full_like(sums[:, :-1], float("nan")))
        return means, int(flat[-1])


class TooManySkippedSteps(RuntimeError):
    """``raco.max_consecutive_skips`` steps in a row were skipped for non-finite gradients."""


class _SkipCounter:
    """Counts steps skipped in a row for non-finite gradients and stops the run past the limit."""

    def __init__(self, limit: int, names: list[str]) -> None:
        self.limit, self.names = limit, names
        self.steps: list[int] = []
        self.objectives: set[int] = set()

    def count(self, step: int, stats, checkpoints: Path) -> None:
        """Note ``step``'s outcome; raise :class:`TooManySkippedSteps` at the limit (no checkpoint is written)."""
        if not stats.skipped:
            self.steps, self.objectives = [], set()
            return
        self.steps.append(step)
        self.objectives.update(stats.nonfinite_objectives)  # the hook has logged the step's objectives
        if self.limit and len(self.steps) >= self.limit:
            from raco_ds.trainer.checkpoint import find_latest

            latest = find_latest(checkpoints)
            raise TooManySkippedSteps(
                f"{len(self.steps)} consecutive steps ({self.steps[0]}-{self.steps[-1]}) skipped for non-finite "
                f"gradients in {sorted(self.names[k] for k in self.objectives)}; stopping "
                + (f"(the last checkpoint, {latest}, is untouched; resume from it with --resume). " if latest
                   else "(no checkpoint was written). ")
                + "Lower optimisation.lr, check those objectives' data, or raise raco.max_consecutive_skips"
            )  # fmt: skip


# ---------------------------------------------------------------------------
# Phases 4 and 6: evaluation and the summary.


def _evaluate(run: _Run, reference, scores=None) -> dict[str, list[float]]:
    from raco_ds.trainer.eval import evaluate, score_pairs

    cfg = run.cfg
    if scores is None:
        scores = score_pairs(run.engine, run.dataset, run.split.eval_indices, cfg.logging.eval_batch_size, run.collator)
    return evaluate(
        scores, reference, run.dataset, run.split.eval_indices, loss=cfg.loss.name, beta=cfg.loss.beta,
        options=cfg.loss.options,
    )  # fmt: skip


def _eval_scalars(result: dict[str, list[float]], names: list[str]) -> dict[str, float]:
    return {
        TAGS["eval"].format(metric=metric, objective=name): value
        for metric, values in result.items()
        if metric != "num_pairs"
        for name, value in zip(names, values)
    }


def format_summary(result: RunResult) -> str:
    """The console table: held-out per-objective metrics before and after training."""
    before, after = result.eval_before, result.eval_after
    if after is None:
        return "no held-out evaluation"
    rows = [
        ("accuracy", "reward accuracy (implicit reward, preferred > other)"),
        ("likelihood_accuracy", "likelihood accuracy (mean log-prob, preferred > other)"),
        ("margin", "reward margin"),
        ("loss", "loss"),
    ]
    pairs = after.get("num_pairs", [])
    lines = [f"held-out evaluation after {result.step} steps ({'/'.join(str(int(p)) for p in pairs)} pairs)",
             f"  {'objective':<12}{'metric':<56}{'before':>9}{'after':>9}"]  # fmt: skip
    for k, name in enumerate(result.objectives):
        for key, label in rows:
            b = f"{before[key][k]:9.3f}" if before else f"{'-':>9}"
            lines.append(f"  {name if key == 'accuracy' else '':<12}{label:<56}{b}{after[key][k]:9.3f}")
    lines.append(
        "  (reward accuracy is 0 before training by construction: the reference is the initial model, so every "
        "implicit reward starts at 0;\n   likelihood accuracy is the model's own preference, comparable before and after)"
    )
    if result.intervals:
        from raco_ds.trainer.eval import format_intervals

        lines.append("held-out after training, mean [95% bootstrap interval over prompts] (n = pairs); "
                     "both are 0 before training. Learning shows where an interval excludes 0 (margin) or 0.5 "
                     "(accuracy):")
        lines.append(format_intervals(result.intervals, result.objectives, ("margin", "accuracy")))
    lines.append(
        f"run folder: {result.output_dir}" + (f"; HF export: {result.export_dir}" if result.export_dir else "")
    )
    lines.append("next: the same comparison over weights, aggregators and seeds, with generation judges: "
                 "python launchers/sweep.py --help (recorded runs: benchmarks/quality/README.md)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The loop.


def _step_scalars(names, record: _StepRecord, means: torch.Tensor, stats, *, lr: float, tokens: int,
                  seconds: float) -> dict[str, float]:  # fmt: skip
    """Every scalar of one step, tagged as in metrics.TAGS."""
    scalars: dict[str, float] = {}
    for k, name in enumerate(names):
        for m, metric in enumerate(_PER_OBJECTIVE):
            scalars[TAGS["train"].format(metric=metric, objective=name)] = float(means[k, m])
        if not math.isnan(record.pass_seconds[k]):
            scalars[TAGS["pass_time"].format(objective=name)] = record.pass_seconds[k]
    scalars.update(raco_scalars(stats, names))
    scalars[TAGS["lr"]] = lr
    scalars[TAGS["tokens_per_s"]] = tokens / seconds
    scalars[TAGS["step_time"]] = seconds
    scalars[TAGS["passes_time"]] = record.passes_seconds
    if not math.isnan(record.scatter_seconds):
        scalars[TAGS["scatter_time"]] = record.scatter_seconds
    scalars.update(memory_scalars())
    return scalars


def _progress_text(names, means: torch.Tensor, stats, seconds: float) -> str:
    losses = " ".join(f"{name}={means[k, 0]:.3f}" for k, name in enumerate(names))
    coefficients = "skipped" if stats.coefficients is None else ",".join(f"{float(a):.2f}" for a in stats.coefficients)
    return f"{losses} a={coefficients} {seconds:.1f}s/step"


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line torn by a crash mid-write
        return None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a crashed run may have logged steps it never checkpointed)."""
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= last_step]
        with atomic_file(path) as tmp:  # a crash now must not cost the lines kept
            tmp.write_text("".join(line + "\n" for line in kept))


def _checked_resume_point(cfg: TrainConfig, root: Path, world: int):
    """The verified checkpoint this run continues from (or None), refused now, before minutes of model loading,
    if it cannot: the newest intact one, passing over damaged ones (``--resume strict`` stops instead)."""
    from raco_ds.trainer import checkpoint as ckpt

    if ckpt.find_latest(root) is None:
        return None
    if not cfg.checkpointing.resume:
        raise ConfigError(
            f"{root.parent} already holds checkpoints; pass --resume to continue that run, or a new --output-dir"
        )
    latest = ckpt.find_resumable(root, strict=cfg.checkpointing.resume == "strict")
    for damage in latest.damaged:
        logger.warning("%s; resuming from the newest intact checkpoint %s", damage, latest.folder.name)
    names, weights = list(cfg.objectives.names), cfg.objectives.weights
    for note in ckpt.check_compatible(latest.state, latest.folder, names, world, weights, cfg.raco.aggregator):
        logger.warning(note)
    return latest


def _resume(run: _Run, latest) -> tuple[int, int]:
    """Load engine, RNG, hook state and data positions from the verified checkpoint ``latest``; (step, tokens)."""
    from raco_ds.trainer.checkpoint import load_checkpoint

    state = load_checkpoint(run.engine, latest, run.names, run.hook)
    for stream, position in zip(run.streams, state.data_position["streams"]):
        stream.load_state_dict(position)
    logger.info("resumed from %s at step %d", latest.folder, state.step)
    return state.step, state.tokens_seen


def train(cfg: TrainConfig, stopper=None) -> RunResult:
    """Run the whole job described by ``cfg`` (on every rank) and return its result.

    ``stopper``: an installed :class:`raco_ds.preemption.PreemptionHandler` (a launcher
    installs one before its heavy imports, so that no early signal kills the job); None
    installs one here for the duration of the run.
    """
    # -- 0. setup -------------------------------------------------------------------------------
    t_start = time.perf_counter()
    rank, world, device = setup_distributed()
    _setup_logging(rank)
    _seed_everything(cfg.optimisation.seed)
    out = Path(cfg.checkpointing.output_dir)
    ckpt_root = out / "checkpoints"
    latest = _checked_resume_point(cfg, ckpt_root, world)
    # One job per run folder (rank 0 holds an fcntl lock); stop signals become a flag polled per step.
    from raco_ds.preemption import OutputDirLock, PreemptionHandler

    lock = OutputDirLock(out).acquire() if rank == 0 else None
    own_stopper = stopper is None
    stopper = PreemptionHandler().install() if own_stopper else stopper
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    if world > 1:
        dist.barrier()

    try:
        # -- 1. build -------------------------------------------------------------------------
        run = _build(cfg, rank, world, device, out)
        engine, names = run.engine, run.names

        # -- 2. reference log-probs of the initial model (still the initial weights: before resume) --
        reference = _reference(run, resumed=latest is not None)
        if not get_loss_reference_free(cfg):
            run.collator.reference_logps = reference.logps.to(torch.float32)

        # -- 3. resume ------------------------------------------------------------------------
        step, tokens_seen = _resume(run, latest) if latest is not None else (0, 0)
        if latest is None and cfg.checkpointing.resume:
            logger.info("--resume: no complete checkpoint in %s; starting from step 0", ckpt_root)

        writer = open_trackers(cfg, out, rank=rank, purge_step=step + 1 if step else None)
        metrics_file = out / "metrics.jsonl"
        if rank == 0:
            _truncate_jsonl(metrics_file, step)
            writer.text("config", "```\n" + (out / "config.yaml").read_text() + "\n```")
            writer.text("capture", run.capture.name)

        # -- 4. evaluate before ---------------------------------------------------------------
        before_file = out / "eval_before.json"
        if step == 0:
            # The reference is the initial policy: its scores of the held-out pairs are the "before" scores.
            eval_before = _evaluate(run, reference, scores=reference)
            if rank == 0:
                with atomic_file(before_file) as tmp:
                    tmp.write_text(json.dumps(eval_before))
            writer.scalars(_eval_scalars(eval_before, names), 0)
        else:
            eval_before = json.loads(before_file.read_text()) if before_file.is_file() else None

        # -- 5. the loop ------------------------------------------------------------------------
        opt, cc = cfg.optimisation, cfg.checkpointing
        result = RunResult(step, names, eval_before, None, out)
        progress = None
        if rank == 0 and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=opt.max_steps, initial=step, desc="raco", dynamic_ncols=True, file=sys.stdout)
        steps_this_job = 0
        injected, skips = cfg.debug.nonfinite_target(names), _SkipCounter(cfg.raco.max_consecutive_skips, names)
        while step < opt.max_steps:
            step_started = time.perf_counter()
            lr = float(engine.get_lr()[0]) if engine.lr_scheduler is not None else opt.lr
            record = _StepRecord(len(names))
            run.nonfinite_objective = injected[1] if injected and injected[0] == step + 1 else None
            stats = run.capture.step(run, record)  # the passes, then hook.step() (the optimizer step)
            step += 1
            steps_this_job += 1
            skips.count(step, stats, ckpt_root)
            seconds = time.perf_counter() - step_started
            means, tokens = record.reduced(world)
            tokens_seen += tokens

            # log: per-objective metrics, RACO internals, timings, memory
            scalars = _step_scalars(names, record, means, stats, lr=lr, tokens=tokens, seconds=seconds)
            if step % cfg.logging.log_every == 0 or step == opt.max_steps:
                writer.scalars(scalars, step)
            if rank == 0:
                _append_jsonl(metrics_file, {"step": step, **scalars})
                result.history.append({"step": step, **scalars})
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(_progress_text(names, means, stats, seconds))

            # evaluate every N steps (the final evaluation is phase 6)
            if cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step < opt.max_steps:
                writer.scalars(_eval_scalars(_evaluate(run, reference), names), step)

            # checkpoint: on schedule, on a stop signal, or at this job's step budget
            signalled = stopper.should_stop()
            budget = cc.stop_after_steps and steps_this_job >= cc.stop_after_steps and step < opt.max_steps
            if (cc.save_every and step % cc.save_every == 0) or signalled or budget:
                _save(run, ckpt_root, step, tokens_seen)
            if signalled or budget:
                result.step, result.stopped_early = step, True
                writer.close()
                if progress is not None:
                    progress.close()
                logger.info("stopped after step %d (%s); continue with --resume", step,
                            "signal" if signalled else "checkpointing.stop_after_steps")  # fmt: skip
                if signalled:
                    stopper.exit()  # barrier, then exit with the requeue status
                result.seconds = time.perf_counter() - t_start
                return result
        if progress is not None:
            progress.close()

        # -- 6. finish: evaluate after, checkpoint, export, summary -----------------------------
        result.step = step
        from raco_ds.evaluation.bootstrap import estimates
        from raco_ds.trainer.eval import HELDOUT_SCORES_FILE, heldout_items, save_heldout_scores, score_pairs

        scores = score_pairs(engine, run.dataset, run.split.eval_indices, cfg.logging.eval_batch_size, run.collator)
        result.eval_after = _evaluate(run, reference, scores=scores)
        result.intervals = estimates(heldout_items(scores, reference, run.dataset, run.split.eval_indices,
                                                   run.split.groups, loss=cfg.loss.name, beta=cfg.loss.beta))
        writer.scalars(_eval_scalars(result.eval_after, names), step)
        if rank == 0:
            (out / "eval_after.json").write_text(json.dumps(result.eval_after))
            save_heldout_scores(out / HELDOUT_SCORES_FILE, run.dataset, run.split.eval_indices, scores)
        if cc.save_final and not (cc.save_every and step % cc.save_every == 0):
            _save(run, ckpt_root, step, tokens_seen)
        if cc.export:
            from raco_ds.trainer.export import export_hf, export_lora

            result.export_dir = out / "export"
            if cfg.model.lora.r:  # the merged model in export/, the adapter alone in export_adapter/
                export_lora(engine.module, run.tokenizer, out / "export_adapter", result.export_dir, cfg.model.dtype)
            else:
                export_hf(engine.module, run.tokenizer, result.export_dir)
        writer.close()
        result.seconds = time.perf_counter() - t_start
        if rank == 0:
            print(format_summary(result), flush=True)
            print(f"[raco] done: {step} steps in {result.seconds:.0f}s", flush=True)
        return result
    finally:
        if own_stopper:
            stopper.uninstall()
        if lock is not None:
            lock.release()


def get_loss_reference_free(cfg: TrainConfig) -> bool:
    """True when the configured loss needs no reference model (SimPO)."""
    from raco_ds.losses import get_loss

    return get_loss(cfg.loss.name).reference_free


def _save(run: _Run, root: Path, step: int, tokens_seen: int) -> None:
    from raco_ds.trainer.checkpoint import TrainerState, save_checkpoint

    state = TrainerState(
        step=step, objectives=run.names, weights=list(run.cfg.objectives.weights), aggregator=run.cfg.raco.aggregator,
        world_size=run.world, data_position={"streams": [s.state_dict() for s in run.streams]}, tokens_seen=tokens_seen,
    )  # fmt: skip
    started = time.perf_counter()
    path = save_checkpoint(run.engine, root, state, run.hook, keep_last=run.cfg.checkpointing.keep_last)
    logger.info("checkpoint %s (%.1fs)", path, time.perf_counter() - started)
