"""The training loop: RACO over K preference objectives on a DeepSpeed engine.

:func:`train` reads top to bottom:

- setup      torch.distributed (gloo on CPU), logging, seeds; the run folder's
             checkpoints checked (before the slow model load) and the folder locked
- build      tokenizer and model (bottom frozen), data split and streams, the
             DeepSpeed engine ("auto" fields filled from the config), RacoHook and
             the capture strategy
- reference  the initial model's log-probs of every used pair, computed once and
             saved in the run folder (before resume: the engine still holds the
             initial weights)
- resume     engine and trainer state from the newest verified checkpoint
- train      held-out evaluation before; then per step :func:`train_step`, log,
             evaluate every N steps, checkpoint; a stop signal or the job's step
             budget ends the loop early
- finish     one way out: evaluate after, final checkpoint and HF export (a run
             stopped early skips these), close the logs, print the summary

One optimizer step is a capture strategy's ``step`` (raco_ds.trainer.capture):
one forward and backward per micro-batch for all K objectives (one-pass capture,
the default where the engine supports it), or one pass per objective; then
``hook.step()`` forms the Gram, solves, writes the combined gradient and steps
the engine. Which capture ran is logged at start-up and in TensorBoard's text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.data.batch import PreferenceBatch
from raco_ds.diskcache import atomic_file
from raco_ds.losses import PreferenceLosses
from raco_ds.preemption import OutputDirLock, PreemptionHandler
from raco_ds.trainer.checkpoint import VerifiedCheckpoint, resume_point
from raco_ds.trainer.config import TrainConfig, save_config
from raco_ds.trainer.eval import HELDOUT_SCORES_FILE, PairScores, save_heldout_scores
from raco_ds.trainer.metrics import METRICS_FILE, append_jsonl, eval_scalars, truncate_jsonl
from raco_ds.trainer.process import seed_everything, setup_distributed, setup_logging
from raco_ds.trainer.result import RunResult, clear_previous_results, format_summary
from raco_ds.trainer.step_record import SkipCounter, StepRecord, progress_text, step_scalars
from raco_ds.trainer.trackers import MetricsWriter, open_trackers

__all__ = ["Run", "train", "train_step"]

logger = logging.getLogger("raco_ds.trainer")

_CHECKPOINTS = "checkpoints"
"""The checkpoint folder inside the run folder (raco_ds.trainer.checkpoint's layout)."""


def train(cfg: TrainConfig, stopper: PreemptionHandler | None = None) -> RunResult:
    """Run the whole job described by ``cfg`` (on every rank) and return its result.

    ``stopper``: an installed :class:`raco_ds.preemption.PreemptionHandler` (a launcher
    installs one before its heavy imports, so that no early signal kills the job); None
    installs one here for the duration of the run.
    """
    # -- setup: this rank's process; a run folder that cannot continue is refused before the model loads --
    started = time.perf_counter()
    rank, world, device = setup_distributed()
    setup_logging(rank)
    seed_everything(cfg.optimisation.seed)
    out = Path(cfg.checkpointing.output_dir)
    latest = resume_point(cfg, out / _CHECKPOINTS, world)
    lock = OutputDirLock(out).acquire() if rank == 0 else None  # one job per run folder
    own_stopper = stopper is None
    stopper = PreemptionHandler().install() if own_stopper else stopper  # stop signals: a flag polled per step
    if rank == 0:
        if latest is None:
            clear_previous_results(out)
        save_config(cfg, out / "config.yaml")
    if world > 1:
        dist.barrier()
    try:
        # -- build: model, data, engine, hook, capture ------------------------------------------------
        run = _build(cfg, rank, world, device, out)

        # -- reference log-probs of the initial model, then resume ------------------------------------
        run.reference = _reference(run, resumed=latest is not None)
        if latest is not None:
            _resume(run, latest)
        elif cfg.checkpointing.resume:
            logger.info("--resume: no complete checkpoint in %s; starting from step 0", run.checkpoints)
        writer = _open_logs(run)

        # -- train ------------------------------------------------------------------------------------
        result = RunResult(run.step, run.names, _evaluate_before(run, writer), None, out)
        first_step, stop = run.step, None
        progress = _progress_bar(run)
        while run.step < cfg.optimisation.max_steps and stop is None:
            scalars, postfix = train_step(run)
            _log_step(run, writer, result, scalars)
            progress.update(1)
            progress.set_postfix_str(postfix)
            if _due(cfg.logging.eval_every, run.step) and run.step < cfg.optimisation.max_steps:
                writer.scalars(eval_scalars(_evaluate(run), run.names), run.step)  # the last one is in finish
            stop = _stop_reason(run, stopper, steps_this_job=run.step - first_step)
            if _due(cfg.checkpointing.save_every, run.step) or stop:
                _save(run)

        # -- finish -----------------------------------------------------------------------------------
        progress.close()
        return _finish(run, result, writer, stop, stopper, started)
    finally:
        if own_stopper:
            stopper.uninstall()
        if lock is not None:
            lock.release()


def train_step(run: Run) -> tuple[dict[str, float], str]:
    """One optimizer step: the capture's passes, then ``hook.step()``; (tagged scalars, progress text).

    Raises :class:`raco_ds.trainer.step_record.TooManySkippedSteps` when this step
    ends a run of ``raco.max_consecutive_skips`` skipped steps.
    """
    started = time.perf_counter()
    opt = run.cfg.optimisation
    lr = float(run.engine.get_lr()[0]) if run.engine.lr_scheduler is not None else opt.lr
    record = StepRecord(len(run.names))
    injected = run.cfg.debug.nonfinite_target(run.names)
    run.nonfinite_objective = injected[1] if injected and injected[0] == run.step + 1 else None
    stats = run.capture.step(run, record)  # the passes, then hook.step() (the optimizer step)
    run.step += 1
    run.skips.count(run.step, stats, run.checkpoints)
    seconds = time.perf_counter() - started
    means, tokens = record.reduced(run.world)
    run.tokens_seen += tokens
    scalars = step_scalars(run.names, record, means, stats, lr=lr, tokens=tokens, seconds=seconds)
    return scalars, progress_text(run.names, means, stats, seconds)


@dataclass
class Run:
    """Everything the phases share: built once, then the training state (step, tokens) as it advances.

    The capture strategies (raco_ds.trainer.capture) read ``cfg``, ``rank``,
    ``names``, ``engine``, ``hook``, ``dataset``, ``collator``, ``streams`` and
    ``device``, call :meth:`losses` / :meth:`losses_from_logits`, and may
    replace ``capture`` (a one-pass capture that fails its self-check).
    """

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
    skips: SkipCounter | None = None
    """Counts steps skipped in a row for non-finite gradients."""
    reference: PairScores | None = None
    """The initial model's scores of the run's pairs (raco_ds.trainer.reference)."""
    step: int = 0
    """Optimizer steps completed."""
    tokens_seen: int = 0
    """Tokens of every rank's micro-batches so far (saved in checkpoints)."""
    nonfinite_objective: int | None = None
    """The objective whose loss is made NaN in the current step (debug.inject_nonfinite), or None."""

    @property
    def checkpoints(self) -> Path:
        """The run's checkpoint folder."""
        return self.out / _CHECKPOINTS

    def losses_from_logits(self, batch: PreferenceBatch, logits: torch.Tensor) -> tuple[PreferenceLosses, torch.Tensor]:
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

    def losses(self, batch: PreferenceBatch) -> PreferenceLosses:
        """Forward a micro-batch through the engine; its K per-objective PreferenceLosses."""
        logits = self.engine(**batch.model_inputs(), use_cache=False).logits
        return self.losses_from_logits(batch, logits)[0]


def _build(cfg: TrainConfig, rank: int, world: int, device: torch.device, out: Path) -> Run:
    import deepspeed

    from raco_ds.deepspeed import RacoHook
    from raco_ds.trainer.capture import choose_capture
    from raco_ds.trainer.data import build_data
    from raco_ds.trainer.ds_config import fill_ds_config, read_ds_config
    from raco_ds.trainer.model import build_model

    # Read and check the DeepSpeed config before the (slow) model load: a mismatch fails in seconds.
    raw_ds, ds_name = read_ds_config(cfg.ds_config)
    fill_ds_config(raw_ds, cfg, world_size=world, hidden_size=1, name=ds_name)
    model, tokenizer = build_model(cfg, rank, world)
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
    names = list(cfg.objectives.names)
    run = Run(cfg, rank, world, device, names, engine, hook, tokenizer, dataset, collator, split, streams, out,
               skips=SkipCounter(cfg.raco.max_consecutive_skips, names))  # fmt: skip
    if cfg.data.padding_free:  # a model that ignores position-id packing would train on mixed sequences
        from raco_ds.data.packing import check_packed_forward

        check_packed_forward(engine, [dataset[i] for i in split.train_pools[0][:4]], collator)
    run.capture = choose_capture(run)

    opt = cfg.optimisation
    per_step = opt.micro_batch_size * opt.gradient_accumulation_steps * world
    shape = "shared pairs (one forward for all objectives)" if dataset.shared else "per-objective pairs (K passes)"
    logger.info("data %s: %d pairs, %s; %s", cfg.data.dataset, len(dataset), shape, split.describe())
    logger.info("batch: %d pairs/micro-batch/rank x %d micro-batches/objective x %d ranks = %d pairs per objective "
                "per step; %d steps", opt.micro_batch_size, opt.gradient_accumulation_steps, world, per_step,
                opt.max_steps)  # fmt: skip
    logger.info("DeepSpeed %s: %s", Path(ds_name).name, hook.engine_layout.describe())
    logger.info("RACO: objectives %s, weights %s, aggregator %s (c=%g), loss %s (beta=%g), capture %s",
                run.names, [round(w, 4) for w in cfg.objectives.weights], cfg.raco.aggregator, cfg.raco.c,
                cfg.loss.name, cfg.loss.beta, run.capture.name)  # fmt: skip
    return run


def _reference(run: Run, resumed: bool) -> PairScores:
    """The initial model's scores (raco_ds.trainer.reference); the collator attaches them to every batch."""
    from raco_ds.trainer.reference import initial_reference, reference_free

    scores = initial_reference(run.engine, run.dataset, run.collator, run.split, run.cfg, run.out, rank=run.rank,
                               resumed=resumed)  # fmt: skip
    if not reference_free(run.cfg):
        run.collator.reference_logps = scores.logps.to(torch.float32)
    return scores


def _resume(run: Run, latest: VerifiedCheckpoint) -> None:
    """Load engine, RNG, hook state and data positions from the verified checkpoint ``latest``."""
    from raco_ds.trainer.checkpoint import load_checkpoint

    state = load_checkpoint(run.engine, latest, run.names, run.hook)
    for stream, position in zip(run.streams, state.data_position["streams"]):
        stream.load_state_dict(position)
    run.step, run.tokens_seen = state.step, state.tokens_seen
    logger.info("resumed from %s at step %d", latest.folder, state.step)


def _save(run: Run) -> None:
    from raco_ds.trainer.checkpoint import TrainerState, loss_identity, save_checkpoint

    state = TrainerState(
        step=run.step, objectives=run.names, weights=list(run.cfg.objectives.weights),
        aggregator=run.cfg.raco.aggregator, world_size=run.world,
        data_position={"streams": [s.state_dict() for s in run.streams]}, tokens_seen=run.tokens_seen,
        loss=loss_identity(run.cfg),
    )  # fmt: skip
    started = time.perf_counter()
    path = save_checkpoint(run.engine, run.checkpoints, state, run.hook, keep_last=run.cfg.checkpointing.keep_last)
    logger.info("checkpoint %s (%.1fs)", path, time.perf_counter() - started)


def _open_logs(run: Run) -> MetricsWriter:
    """The trackers' writer; a resumed run's logs lose the steps a crashed run logged after its checkpoint."""
    writer = open_trackers(run.cfg, run.out, rank=run.rank, purge_step=run.step + 1 if run.step else None)
    if run.rank == 0:
        truncate_jsonl(run.out / METRICS_FILE, run.step)
        writer.text("config", "```\n" + (run.out / "config.yaml").read_text() + "\n```")
        writer.text("capture", run.capture.name)
    return writer


def _progress_bar(run: Run) -> Any:
    """A tqdm bar on rank 0 when logging.progress_bar is on; a disabled one (all calls no-ops) otherwise."""
    from tqdm.auto import tqdm

    enabled = run.rank == 0 and run.cfg.logging.progress_bar
    return tqdm(total=run.cfg.optimisation.max_steps, initial=run.step, desc="raco", dynamic_ncols=True,
                file=sys.stdout, disable=not enabled)  # fmt: skip


def _log_step(run: Run, writer: MetricsWriter, result: RunResult, scalars: dict[str, float]) -> None:
    """TensorBoard every logging.log_every steps and at the last; metrics.jsonl and the history every step."""
    if _due(run.cfg.logging.log_every, run.step) or run.step == run.cfg.optimisation.max_steps:
        writer.scalars(scalars, run.step)
    if run.rank == 0:
        append_jsonl(run.out / METRICS_FILE, {"step": run.step, **scalars})
        result.history.append({"step": run.step, **scalars})


def _due(every: int, step: int) -> bool:
    """True on the steps a schedule of ``every`` steps (0: never) falls on."""
    return bool(every) and step % every == 0


def _stop_reason(run: Run, stopper: PreemptionHandler, steps_this_job: int) -> str | None:
    """Why the loop must checkpoint and stop before max_steps (a stop signal, this job's step budget), or None."""
    if stopper.should_stop():
        return "signal"
    budget = run.cfg.checkpointing.stop_after_steps
    if budget and steps_this_job >= budget and run.step < run.cfg.optimisation.max_steps:
        return "checkpointing.stop_after_steps"
    return None


def _evaluate(run: Run, scores: PairScores | None = None) -> dict[str, list[float]]:
    """Held-out metrics of ``scores`` (default: the engine's current weights, scored now) against the reference."""
    from raco_ds.trainer.eval import evaluate, score_pairs

    cfg = run.cfg
    if scores is None:
        scores = score_pairs(run.engine, run.dataset, run.split.eval_indices, cfg.logging.eval_batch_size, run.collator)
    return evaluate(
        scores, run.reference, run.dataset, run.split.eval_indices, loss=cfg.loss.name, beta=cfg.loss.beta,
        options=cfg.loss.options,
    )  # fmt: skip


def _evaluate_before(run: Run, writer: MetricsWriter) -> dict[str, list[float]] | None:
    """Held-out metrics before training: computed at step 0 (and saved), read back by a resumed run."""
    path = run.out / "eval_before.json"
    if run.step:
        return json.loads(path.read_text()) if path.is_file() else None
    # The reference is the initial policy: its scores of the held-out pairs are the "before" scores.
    before = _evaluate(run, scores=run.reference)
    if run.rank == 0:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(before))
    writer.scalars(eval_scalars(before, run.names), 0)
    return before


def _evaluate_after(run: Run, writer: MetricsWriter, result: RunResult) -> PairScores:
    """Held-out metrics and bootstrap intervals after the last step, into ``result`` and the run folder;
    returns the held-out scores."""
    from raco_ds.evaluation.bootstrap import estimates
    from raco_ds.trainer.eval import heldout_items, score_pairs

    cfg, split = run.cfg, run.split
    scores = score_pairs(run.engine, run.dataset, split.eval_indices, cfg.logging.eval_batch_size, run.collator)
    result.eval_after = _evaluate(run, scores=scores)
    result.intervals = estimates(heldout_items(scores, run.reference, run.dataset, split.eval_indices, split.groups,
                                               loss=cfg.loss.name, beta=cfg.loss.beta))  # fmt: skip
    writer.scalars(eval_scalars(result.eval_after, run.names), run.step)
    if run.rank == 0:
        (run.out / "eval_after.json").write_text(json.dumps(result.eval_after))
    return scores


def _export(run: Run) -> Path:
    """The trained model in Hugging Face format under ``<out>/export``; with LoRA also the adapter alone."""
    from raco_ds.trainer.export import export_hf, export_lora

    folder = run.out / "export"
    if run.cfg.model.lora.r:  # the merged model in export/, the adapter alone in export_adapter/
        export_lora(run.engine.module, run.tokenizer, run.out / "export_adapter", folder, run.cfg.model.dtype)
    else:
        export_hf(run.engine.module, run.tokenizer, folder)
    return folder


def _finish(run: Run, result: RunResult, writer: MetricsWriter, stop: str | None, stopper: PreemptionHandler,
            started: float) -> RunResult:  # fmt: skip
    """The one way out of the loop: at max_steps evaluate, checkpoint, export and print the summary;
    stopped early (``stop``) only say how to continue, and on a signal exit with the requeue status."""
    result.step = run.step
    cc = run.cfg.checkpointing
    if stop is None:
        scores = _evaluate_after(run, writer, result)
        if cc.save_final and not _due(cc.save_every, run.step):  # not saved on schedule this very step
            _save(run)
        if cc.export:
            result.export_dir = _export(run)
            if run.rank == 0:  # keyed by the export's weight files: an evaluator of export/ reuses them
                save_heldout_scores(run.out / HELDOUT_SCORES_FILE, run.dataset, run.split.eval_indices, scores,
                                    result.export_dir, run.cfg.model.dtype)  # fmt: skip
    writer.close()
    result.seconds = time.perf_counter() - started
    if stop is not None:
        result.stopped_early = True
        logger.info("stopped after step %d (%s); continue with --resume", run.step, stop)
        if stop == "signal":
            stopper.exit()  # barrier, then exit with the requeue status
    elif run.rank == 0:
        print(format_summary(result), flush=True)
        print(f"[raco] done: {run.step} steps in {result.seconds:.0f}s", flush=True)
    return result
