"""A RACO preference-training loop on megatron-core (TP x PP x DP, distributed optimizer), resumable.

:func:`train` takes the launcher's :class:`~raco_ds.megatron.config.MegatronTrainConfig`
(the DeepSpeed trainer's sections plus ``megatron``) and runs, in phases:

0. setup      torch.distributed + Megatron's parallel state, seeds, run folder + lock, stop signals
1. build      tokenizer, data (the trainer's held-out split and resumable per-DP-rank streams),
              policy GPTModel + a frozen reference copy, DDP, optimizer, RacoMegatron
2. resume     model, optimizer, RNG and data positions from the newest verified checkpoint
3. loop       reference pass -> one schedule pass per objective -> raco.step() -> log -> checkpoint
4. finish     held-out evaluation (before/after, the DeepSpeed launcher's summary), final checkpoint,
              HF export

The model is a Llama-style megatron-core GPTModel (RMSNorm, SwiGLU, RoPE).
For an HF ``model.name_or_path`` (a folder, or a short name such as ``tiny``)
raco_ds.megatron.hf builds it from the HF config (TP/PP from ``megatron.*``,
dtype from ``model.dtype``) and loads the HF weights, sharded, before the
optimizer is built; the tokenizer is the folder's. For ``random-gpt`` it is
built from the ``megatron.*`` shape, seeded, with the tiny locally trained
tokenizer. The reference is a frozen copy of the initial weights, run through
the same pipeline schedule with ``forward_only=True`` (a resumed run rebuilds
it from the HF weights or the same seed). With ``checkpointing.export`` the
finished model is written back as an HF folder, ``<output_dir>/export``, beside
the run's ``config.yaml`` (``launchers/eval.py --model <output_dir>`` reads both).
Megatron's GPTModel returns the per-token cross-entropy of the labels
(vocab-parallel aware), so a row's response log-prob is minus its sum over the
response tokens; the last stage computes the losses.

Checkpoints are raco_ds.trainer.checkpoint's (atomic, manifest-verified,
falling back to the newest intact one) over Megatron's distributed
checkpointing (raco_ds.megatron.checkpoint). A SIGUSR1/SIGTERM (SLURM's
time-limit warning) makes every rank checkpoint at the end of the step and
exit with :data:`raco_ds.preemption.EXIT_REQUEUE`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.megatron.config import MegatronTrainConfig
from raco_ds.trainer.config import ConfigError, save_config
from raco_ds.trainer.metrics import TAGS

logger = logging.getLogger(__name__)

__all__ = ["train"]


# ---------------------------------------------------------------------------
# Phase 0: setup.


def _init_distributed(cfg: MegatronTrainConfig) -> None:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    mc, world = cfg.megatron, dist.get_world_size()
    if world % (mc.tensor_parallel * mc.pipeline_parallel):
        raise ConfigError(
            f"world size {world} is not a multiple of megatron.tensor_parallel({mc.tensor_parallel}) x "
            f"megatron.pipeline_parallel({mc.pipeline_parallel}); launch a multiple of their product of ranks"
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=mc.tensor_parallel, pipeline_model_parallel_size=mc.pipeline_parallel
    )
    torch.manual_seed(cfg.optimisation.seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(cfg.optimisation.seed)


# ---------------------------------------------------------------------------
# Phase 1: build.


def _build_model(cfg: MegatronTrainConfig, vocab_size: int, hf_path: str | None) -> tuple[Any, Any, Any, Any]:
    """(TransformerConfig, policy, frozen reference with the policy's initial weights, HFGPTSpec or None).

    ``hf_path``: the HF folder to build and load from; None builds the seeded ``megatron.*`` shape.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from raco_ds.megatron.hf import config_from_hf, load_hf_into_megatron

    mc, bf16 = cfg.megatron, cfg.model.dtype == "bf16"
    spec = None
    if hf_path is not None:
        try:
            spec = config_from_hf(hf_path, tensor_parallel=mc.tensor_parallel,
                                  pipeline_parallel=mc.pipeline_parallel, dtype=cfg.model.dtype)  # fmt: skip
        except ValueError as err:  # an architecture or TP the conversion refuses: the user's fix, one line
            raise ConfigError(f"--model {cfg.model.name_or_path}: {err}") from None
        config, build = spec.transformer_config, spec.build_model
    else:
        dtype = torch.bfloat16 if bf16 else torch.float32
        config = TransformerConfig(
            num_layers=mc.num_layers, hidden_size=mc.hidden_size, num_attention_heads=mc.num_attention_heads,
            ffn_hidden_size=mc.ffn_hidden_size, normalization="RMSNorm", gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, add_bias_linear=False,
            tensor_model_parallel_size=mc.tensor_parallel, pipeline_model_parallel_size=mc.pipeline_parallel,
            pipeline_dtype=dtype, params_dtype=dtype, bf16=bf16,
            hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
        )  # fmt: skip
        # Pad the vocabulary so that every tensor-parallel rank holds an equal slice.
        padded_vocab = -(-vocab_size // (128 * mc.tensor_parallel)) * 128 * mc.tensor_parallel

        def build() -> Any:
            model = GPTModel(
                config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                vocab_size=padded_vocab, max_sequence_length=cfg.data.max_length, position_embedding_type="rope",
                pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                share_embeddings_and_output_weights=mc.tie_embeddings,
            )
            return model.cuda() if torch.cuda.is_available() else model

    policy = build()
    if hf_path is not None:
        load_hf_into_megatron([policy], hf_path)
    reference = build()
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False).eval()
    return config, policy, reference, spec


def _model_source(cfg: MegatronTrainConfig, rank: int) -> str | None:
    """The local HF folder of ``model.name_or_path`` (rank 0 builds a short name's cache first), or None."""
    from raco_ds.megatron.config import RANDOM_GPT
    from raco_ds.models import resolve_model_path

    if cfg.model.name_or_path == RANDOM_GPT:
        return None
    if rank == 0:
        resolve_model_path(cfg.model.name_or_path)
    dist.barrier()
    path = resolve_model_path(cfg.model.name_or_path)
    if not Path(path, "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={cfg.model.name_or_path!r} is not a local HF folder or a short name "
            "(the Megatron launcher loads offline): download the model first and pass its folder"
        )
    return path


def _pad(batch: Any, length: int, pad_id: int) -> Any:
    """Pad rows to the fixed pipeline sequence length (longer rows were truncated by tokenisation)."""
    extra = length - batch.input_ids.shape[1]
    pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)  # noqa: E731
    return dataclasses.replace(
        batch, input_ids=pad(batch.input_ids, pad_id), attention_mask=pad(batch.attention_mask, 0),
        response_mask=pad(batch.response_mask, False),
    )


def _row_token_losses(model: Any, batch: Any) -> torch.Tensor:
    """Per-token cross-entropy (last stage; the stage's output tensor on the others)."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    # Megatron's loss at position t is for labels[t]: predict token t+1 from position t.
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=0)
    return model(ids, positions, None, labels=labels)


def _logps_and_lengths(per_token: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    scored = torch.nn.functional.pad(batch.response_mask[:, 1:], (0, 1), value=False).to(per_token.device)
    return -(per_token.float() * scored).sum(-1), scored.sum(-1)


def _score_heldout(model: Any, dataset: Any, collator: Any, indices: list[int], cfg: MegatronTrainConfig) -> Any:
    """raco_ds.trainer.eval's PairScores of ``indices`` under ``model``, through the pipeline (every rank).

    Data-parallel replica d scores pairs d, d + DP, ...; each batch has micro_batch_size pairs (a short
    last batch repeats its first pair: pipeline shapes are fixed) and the repeats are dropped again.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from raco_ds.trainer.eval import PairScores

    pairs, length = cfg.optimisation.micro_batch_size, cfg.data.max_length
    mine = indices[ps.get_data_parallel_rank() :: ps.get_data_parallel_world_size()]
    chunks = [mine[i : i + pairs] for i in range(0, len(mine), pairs)]
    batches = [_pad(collator([dataset[i] for i in c + c[:1] * (pairs - len(c))]), length, dataset.pad_token_id)
               for c in chunks]  # fmt: skip
    logps = torch.zeros(len(dataset), 2, dtype=torch.float64)
    lengths = torch.zeros(len(dataset), 2, dtype=torch.long)
    # Every tensor-parallel rank of the last stage computes the same scores; one of them records them.
    records = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0

    def score_step(data_iterator: Any, stage: Any) -> Any:
        batch, count = next(data_iterator)

        def record(per_token: torch.Tensor) -> Any:
            if records:
                sums, counts = _logps_and_lengths(per_token, batch)
                index = batch.pair_index[:count]
                logps[index] = torch.stack([sums[:count], sums[pairs : pairs + count]], 1).double().cpu()
                lengths[index] = torch.stack([counts[:count], counts[pairs : pairs + count]], 1).cpu()
            return per_token.sum() * 0.0, {}

        return _row_token_losses(stage, batch), record

    if batches:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=score_step, data_iterator=iter(zip(batches, map(len, chunks))), model=[model],
                num_microbatches=len(batches), seq_length=length, micro_batch_size=2 * pairs, forward_only=True,
            )  # fmt: skip
        model.train(was_training)
    # Each pair was recorded on exactly one rank; the others hold zeros there.
    dist.all_reduce(logps)
    dist.all_reduce(lengths)
    unscored = torch.ones(len(dataset), dtype=torch.bool)
    unscored[indices] = False
    logps[unscored] = float("nan")
    return PairScores(logps, lengths)


# ---------------------------------------------------------------------------
# Logging and the metrics file (written by the logging rank: last stage, TP and DP rank 0).


def _append_metrics(path: Path, record: dict[str, float]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop lines logged after ``step``: a stopped run may have logged steps it never checkpointed."""
    from raco_ds.diskcache import atomic_file

    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        with atomic_file(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def train(cfg: MegatronTrainConfig, stopper: Any = None) -> list[dict[str, float]]:
    """Train to ``optimisation.max_steps`` (or a stop); return this job's per-step scalars (every rank).

    ``stopper``: an installed :class:`raco_ds.preemption.PreemptionHandler` (the launcher installs
    one before its heavy imports); None installs one for the duration of the run.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from raco_ds.losses import get_loss, preference_losses
    from raco_ds.megatron import RacoMegatron
    from raco_ds.megatron.checkpoint import MegatronCheckpointEngine
    from raco_ds.megatron.hf import export_megatron_to_hf
    from raco_ds.models import load_tokenizer
    from raco_ds.preemption import OutputDirLock, PreemptionHandler
    from raco_ds.tiny_models import train_tiny_tokenizer
    from raco_ds.trainer.checkpoint import TrainerState, load_checkpoint, loss_identity, resume_point, save_checkpoint
    from raco_ds.trainer.data import build_data
    from raco_ds.trainer.eval import evaluate
    from raco_ds.trainer.result import RunResult, clear_previous_results, format_summary

    # -- 0. setup ---------------------------------------------------------------------------------
    _init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.checkpointing.output_dir)
    ckpt_root, metrics_file = out / "checkpoints", out / "metrics.jsonl"
    latest = resume_point(cfg, ckpt_root, world)
    lock = OutputDirLock(out).acquire() if rank == 0 else None
    own_stopper = stopper is None
    stopper = PreemptionHandler().install() if own_stopper else stopper
    if rank == 0:
        if latest is None:
            clear_previous_results(out)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    try:
        # -- 1. build -----------------------------------------------------------------------------
        opt, cc, mc, names = cfg.optimisation, cfg.checkpointing, cfg.megatron, list(cfg.objectives.names)
        hf_path = _model_source(cfg, rank)
        tokenizer = train_tiny_tokenizer() if hf_path is None else load_tokenizer(hf_path)
        dataset, collator, split, streams = build_data(
            cfg, tokenizer, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        )
        logger.info(split.describe())
        config, policy, reference, spec = _build_model(cfg, len(tokenizer), hf_path)
        ddp = DistributedDataParallel(
            config, DistributedDataParallelConfig(use_distributed_optimizer=mc.distributed_optimizer,
                                                  grad_reduce_in_fp32=True), policy,
        )  # fmt: skip
        beta1, beta2 = opt.betas
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=opt.lr, weight_decay=opt.weight_decay, adam_beta1=beta1,
                            adam_beta2=beta2, adam_eps=opt.eps, bf16=cfg.model.dtype == "bf16",
                            params_dtype=config.params_dtype, clip_grad=opt.max_grad_norm,
                            use_distributed_optimizer=mc.distributed_optimizer),
            [ddp],
        )  # fmt: skip
        raco = RacoMegatron(ddp, optimizer, cfg.objectives.weights, aggregator=cfg.raco.aggregator, c=cfg.raco.c,
                            on_nonfinite=cfg.raco.on_nonfinite)  # fmt: skip
        engine = MegatronCheckpointEngine(
            policy, optimizer, {"tensor_parallel": mc.tensor_parallel, "pipeline_parallel": mc.pipeline_parallel}
        )
        log_here = (ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0
                    and ps.get_tensor_model_parallel_rank() == 0)  # fmt: skip

        # -- 2. resume ----------------------------------------------------------------------------
        step = 0
        if latest is not None:
            step = load_checkpoint(engine, latest, names).step
            for stream, position in zip(streams, latest.state.data_position["streams"]):
                stream.load_state_dict(position)
            logger.warning("resumed from %s at step %d", latest.folder, step)
        if log_here:
            _keep_metrics_until(metrics_file, step)

        def checkpoint() -> None:
            state = TrainerState(step=step, objectives=names, weights=list(cfg.objectives.weights),
                                 aggregator=cfg.raco.aggregator, world_size=world,
                                 data_position={"streams": [s.state_dict() for s in streams]},
                                 loss=loss_identity(cfg))  # fmt: skip
            save_checkpoint(engine, ckpt_root, state, keep_last=cc.keep_last)

        # -- 3. the loop --------------------------------------------------------------------------
        schedule = get_forward_backward_func()
        micro, pairs, length = opt.gradient_accumulation_steps, opt.micro_batch_size, cfg.data.max_length
        reference_free = get_loss(cfg.loss.name).reference_free
        history: list[dict[str, float]] = []
        steps_this_job = 0
        while step < opt.max_steps:
            started = time.perf_counter()
            # Shared pairs: one stream for every objective; per-objective data: stream k for objective k.
            by_stream = [[_pad(s.next(), length, dataset.pad_token_id) for _ in range(micro)] for s in streams]
            batches = [by_stream[k if len(streams) > 1 else 0] for k in range(len(names))]

            # Reference log-probs of every micro-batch, forward only (kept on the last stage).
            ref_logps: list[list[torch.Tensor]] = [[] for _ in by_stream]
            for s, stream_batches in enumerate(by_stream if not reference_free else []):

                def reference_step(data_iterator: Any, model: Any, sink: list = ref_logps[s]) -> Any:
                    batch = next(data_iterator)

                    def collect(per_token: torch.Tensor) -> Any:
                        sink.append(_logps_and_lengths(per_token, batch)[0].detach())
                        return per_token.sum() * 0.0, {}

                    return _row_token_losses(model, batch), collect

                with torch.no_grad():
                    schedule(forward_step_func=reference_step, data_iterator=iter(stream_batches), model=[reference],
                             num_microbatches=micro, seq_length=length, micro_batch_size=2 * pairs,
                             forward_only=True)  # fmt: skip

            # One schedule pass per objective; RACO captures each objective's owned gradient shard.
            losses = torch.zeros(len(names), dtype=torch.float64)
            for k in range(len(names)):
                counter = iter(range(micro))
                refs = ref_logps[k if len(streams) > 1 else 0]

                def policy_step(data_iterator: Any, model: Any, k: int = k, counter: Any = counter,
                                refs: list = refs) -> Any:  # fmt: skip
                    m, batch = next(counter), next(data_iterator)

                    def loss_fn(per_token: torch.Tensor) -> Any:
                        logps, lengths = _logps_and_lengths(per_token, batch)
                        ref = refs[m] if refs else None
                        result = preference_losses(
                            logps[:pairs], logps[pairs:], batch.labels.to(logps.device),
                            reference_logps_a=None if ref is None else ref[:pairs],
                            reference_logps_b=None if ref is None else ref[pairs:], loss=cfg.loss.name,
                            beta=cfg.loss.beta, lengths_a=lengths[:pairs], lengths_b=lengths[pairs:],
                            **cfg.loss.options,
                        )  # fmt: skip
                        losses[k] += float(result.losses[k].detach()) / micro
                        return result.losses[k], {}

                    return _row_token_losses(model, batch), loss_fn

                with raco.objective(k):
                    schedule(forward_step_func=policy_step, data_iterator=iter(batches[k]), model=[ddp],
                             num_microbatches=micro, seq_length=length, micro_batch_size=2 * pairs,
                             forward_only=False)  # fmt: skip
            stats = raco.step()
            step += 1
            steps_this_job += 1

            # Log: the losses averaged over data-parallel ranks (they live on the last stage).
            if ps.is_pipeline_last_stage():
                dist.all_reduce(losses, group=ps.get_data_parallel_group())
                losses /= ps.get_data_parallel_world_size()
            scalars = {"step": step, **stats.scalars(), TAGS["step_time"]: time.perf_counter() - started}
            scalars.update({f"loss/{name}": float(losses[k]) for k, name in enumerate(names)})
            history.append(scalars)
            if log_here:
                _append_metrics(metrics_file, scalars)
                if step % cfg.logging.log_every == 0 or step == opt.max_steps:
                    a = "skipped" if stats.coefficients is None else ",".join(f"{x:.3f}" for x in stats.coefficients)
                    logger.warning("step %d %s a=%s %.2fs", step,
                                   " ".join(f"{n}={float(losses[k]):.4f}" for k, n in enumerate(names)), a,
                                   scalars[TAGS["step_time"]])  # fmt: skip

            # Checkpoint on schedule, on a stop signal (then exit for requeue), or at this job's budget.
            signalled = stopper.should_stop()
            budget = cc.stop_after_steps and steps_this_job >= cc.stop_after_steps and step < opt.max_steps
            if (cc.save_every and step % cc.save_every == 0) or signalled or budget:
                checkpoint()
            if signalled:
                stopper.exit()  # barrier, then exit with the requeue status
            if budget:
                return history

        # -- 4. finish ----------------------------------------------------------------------------
        # Held-out evaluation: the frozen reference is the initial policy, so its scores are "before".
        scored = {name: _score_heldout(model, dataset, collator, split.eval_indices, cfg)
                  for name, model in (("reference", reference), ("policy", policy))}  # fmt: skip
        loss_args = {"loss": cfg.loss.name, "beta": cfg.loss.beta, "options": cfg.loss.options}
        result = RunResult(step, names, evaluate(scored["reference"], scored["reference"], dataset,
                                                 split.eval_indices, **loss_args),
                           evaluate(scored["policy"], scored["reference"], dataset, split.eval_indices, **loss_args),
                           out)  # fmt: skip
        if rank == 0:
            for name, metrics in (("eval_before", result.eval_before), ("eval_after", result.eval_after)):
                (out / f"{name}.json").write_text(json.dumps(metrics))
        if cc.save_final and not (cc.save_every and step % cc.save_every == 0):
            checkpoint()
        if cc.export:  # validation allows it only for an HF model, so spec and hf_path are set
            export_megatron_to_hf([policy], out / "export", spec.hf_config, tokenizer=hf_path)
            result.export_dir = out / "export"
        if rank == 0:
            print(format_summary(result), flush=True)
        return history
    finally:
        if own_stopper:
            stopper.uninstall()
        if lock is not None:
            lock.release()
