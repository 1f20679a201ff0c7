"""A RACO preference-training loop on megatron-core (TP x PP x DP, distributed optimizer).

The model is a megatron-core GPTModel built from the config (Llama-style:
RMSNorm, SwiGLU, RoPE, untied or tied embeddings), trained from its
initialisation; the reference model is a frozen copy of it, run through the
same pipeline schedule with ``forward_only=True``. Each optimizer step takes
``micro_batches`` micro-batches of pairs per data-parallel rank and runs one
schedule pass per objective inside ``RacoMegatron.objective(k)``, then
``RacoMegatron.step()``.

Log-probs: Megatron's GPTModel returns the per-token cross-entropy of the
labels (vocab-parallel aware), so a row's response log-prob is minus the sum
of that cross-entropy over its response tokens; every stage runs the same
code, the last stage computes the losses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["MegatronTrainConfig", "train"]


@dataclass(kw_only=True)
class MegatronTrainConfig:
    """Everything ``launchers/train_megatron.py`` accepts (each field is a ``--flag``)."""

    tensor_parallel: int = 1
    """Tensor-parallel size."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (needs num_layers divisible by it)."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Hidden size."""
    num_attention_heads: int = 4
    """Attention heads (divisible by tensor_parallel)."""
    ffn_hidden_size: int = 128
    """MLP hidden size (SwiGLU)."""
    tie_embeddings: bool = True
    """Tie input embeddings and the output layer (across pipeline stages when PP > 1)."""
    tokenizer: str = "tiny"
    """A local Hugging Face tokenizer folder, or "tiny" (byte-level BPE trained on the bundled data)."""
    dataset: str = "pku_saferlhf"
    """A raco_ds.data preset (bundled samples) or a TRL-format preference file."""
    seq_length: int = 128
    """Tokens per row (prompt + response); every micro-batch is padded to it (pipeline shapes are fixed)."""
    micro_batch_pairs: int = 2
    """Preference pairs per micro-batch (2x rows: response A rows, then response B rows)."""
    micro_batches: int = 2
    """Micro-batches per objective per optimizer step on each data-parallel rank."""
    weights: str = ""
    """Comma-separated objective weights on the simplex; empty = uniform."""
    aggregator: str = "raco"
    """raco, cagrad, linear (weighted-loss DPO) or mgda."""
    c: float = 0.4
    """RACO's conflict radius."""
    loss: str = "dpo"
    """Per-objective preference loss: dpo, ipo, hinge, simpo."""
    beta: float = 0.2
    """Preference loss inverse temperature."""
    lr: float = 1e-4
    """Adam learning rate."""
    clip_grad: float = 1.0
    """Megatron's global gradient-norm clip (of the combined RACO gradient)."""
    bf16: bool = False
    """Train in bf16 with fp32 main parameters and fp32 gradient reduction (GPUs)."""
    max_steps: int = 4
    """Optimizer steps."""
    seed: int = 0
    """Seed for initialisation and data order."""


def _init_distributed(cfg: MegatronTrainConfig) -> None:
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    if world % (cfg.tensor_parallel * cfg.pipeline_parallel):
        raise ValueError(
            f"world size {world} is not a multiple of tensor_parallel({cfg.tensor_parallel}) x "
            f"pipeline_parallel({cfg.pipeline_parallel}); launch a multiple of their product of ranks"
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_parallel, pipeline_model_parallel_size=cfg.pipeline_parallel
    )
    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(cfg.seed)


def _tokenizer(cfg: MegatronTrainConfig) -> Any:
    if cfg.tokenizer == "tiny":
        from raco_ds.tiny_models import train_tiny_tokenizer

        return train_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)


def _build_model(cfg: MegatronTrainConfig, vocab_size: int) -> tuple[Any, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        tensor_model_parallel_size=cfg.tensor_parallel, pipeline_model_parallel_size=cfg.pipeline_parallel,
        pipeline_dtype=dtype, params_dtype=dtype, bf16=cfg.bf16,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
    )
    # Pad the vocabulary so that every tensor-parallel rank holds an equal slice.
    padded_vocab = -(-vocab_size // (128 * cfg.tensor_parallel)) * 128 * cfg.tensor_parallel

    def build() -> Any:
        model = GPTModel(
            config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=padded_vocab, max_sequence_length=cfg.seq_length, position_embedding_type="rope",
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=cfg.tie_embeddings,
        )
        return model.cuda() if torch.cuda.is_available() else model

    policy = build()
    reference = build()
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False).eval()
    return config, (policy, reference)


def _pad(batch: Any, length: int, pad_id: int) -> Any:
    """Pad rows to the fixed pipeline sequence length (longer rows were truncated by tokenisation)."""
    extra = length - batch.input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"a row has {batch.input_ids.shape[1]} tokens > seq_length={length}")
    pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)
    return dataclasses.replace(
        batch, input_ids=pad(batch.input_ids, pad_id), attention_mask=pad(batch.attention_mask, 0),
        response_mask=pad(batch.response_mask, False),
    )


def _row_logps(model: Any, batch: Any) -> torch.Tensor | None:
    """(2B,) summed response log-probs on the last stage (its output tensor on other stages)."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    # Megatron's loss at position t is for labels[t]: predict token t+1 from position t.
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=0)
    return model(ids, positions, None, labels=labels)


def _logps_from_token_losses(per_token: torch.Tensor, batch: Any) -> torch.Tensor:
    scored = torch.nn.functional.pad(batch.response_mask[:, 1:], (0, 1), value=False).to(per_token.device)
    return -(per_token.float() * scored).sum(-1)


def train(cfg: MegatronTrainConfig) -> list[dict[str, float]]:
    """Train for ``cfg.max_steps`` optimizer steps; return the per-step scalars (last stage, DP rank 0)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from raco_ds.data import (
        DistributedPairSampler,
        PreferenceCollator,
        TokenizationConfig,
        get_preset,
        load_preference_data,
        tokenize_preference_data,
        trl_spec,
    )
    from raco_ds.data.objectives import PRESETS
    from raco_ds.losses import preference_losses
    from raco_ds.megatron import RacoMegatron

    _init_distributed(cfg)
    tokenizer = _tokenizer(cfg)
    spec = get_preset(cfg.dataset) if cfg.dataset in PRESETS else trl_spec([cfg.dataset])
    dataset = tokenize_preference_data(load_preference_data(spec), tokenizer, TokenizationConfig(max_length=cfg.seq_length))
    k_objectives = dataset.num_objectives
    weights = [float(w) for w in cfg.weights.split(",")] if cfg.weights else [1.0 / k_objectives] * k_objectives
    collate = PreferenceCollator(pad_token_id=dataset.pad_token_id, num_objectives=k_objectives)
    sampler = DistributedPairSampler(
        len(dataset), world_size=ps.get_data_parallel_world_size(), rank=ps.get_data_parallel_rank(), seed=cfg.seed,
        batch_size=cfg.micro_batch_pairs,
    )
    order = iter(sampler)

    def next_batch() -> Any:
        nonlocal order
        items = []
        while len(items) < cfg.micro_batch_pairs:
            try:
                items.append(dataset[next(order)])
            except StopIteration:
                order = iter(sampler)
        return _pad(collate(items), cfg.seq_length, dataset.pad_token_id)

    config, (policy, reference) = _build_model(cfg, len(tokenizer))
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), policy
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, bf16=cfg.bf16, params_dtype=config.params_dtype,
                        clip_grad=cfg.clip_grad, use_distributed_optimizer=True),
        [ddp],
    )
    raco = RacoMegatron(ddp, optimizer, weights, aggregator=cfg.aggregator, c=cfg.c)
    schedule = get_forward_backward_func()
    rows = 2 * cfg.micro_batch_pairs
    log_here = ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    history = []
    for step in range(cfg.max_steps):
        started = time.perf_counter()
        batches = [next_batch() for _ in range(cfg.micro_batches)]

        # Reference log-probs, one forward-only pipeline pass (kept on the last stage).
        ref_logps: list[torch.Tensor] = []

        def reference_step(data_iterator: Any, model: Any, ref_logps: list = ref_logps) -> Any:
            batch = next(data_iterator)

            def collect(per_token: torch.Tensor) -> Any:
                ref_logps.append(_logps_from_token_losses(per_token, batch).detach())
                return per_token.sum() * 0.0, {}

            return _row_logps(model, batch), collect

        with torch.no_grad():
            schedule(forward_step_func=reference_step, data_iterator=iter(batches), model=[reference],
                     num_microbatches=cfg.micro_batches, seq_length=cfg.seq_length, micro_batch_size=rows,
                     forward_only=True)

        # One schedule pass per objective; RACO captures each objective's owned shard.
        losses = torch.zeros(k_objectives)
        for k in range(k_objectives):
            micro = iter(range(cfg.micro_batches))

            def policy_step(
                data_iterator: Any, model: Any, k: int = k, micro: Any = micro, ref_logps: list = ref_logps,
                losses: torch.Tensor = losses,
            ) -> Any:
                m = next(micro)
                batch = next(data_iterator)

                def loss_fn(per_token: torch.Tensor) -> Any:
                    logps = _logps_from_token_losses(per_token, batch)
                    ref = ref_logps[m]
                    out = preference_losses(
                        logps[: rows // 2], logps[rows // 2 :], batch.labels.to(logps.device),
                        reference_logps_a=ref[: rows // 2], reference_logps_b=ref[rows // 2 :],
                        loss=cfg.loss, beta=cfg.beta,
                    )
                    losses[k] += float(out.losses[k].detach()) / cfg.micro_batches
                    return out.losses[k], {}

                return _row_logps(model, batch), loss_fn

            with raco.objective(k):
                schedule(forward_step_func=policy_step, data_iterator=iter(batches), model=[ddp],
                         num_microbatches=cfg.micro_batches, seq_length=cfg.seq_length, micro_batch_size=rows,
                         forward_only=False)
        stats = raco.step()
        scalars = stats.scalars()
        scalars.update({f"loss/{i}": float(losses[i]) for i in range(k_objectives)})
        scalars["seconds_step"] = time.perf_counter() - started
        history.append(scalars)
        if log_here:
            a = "" if stats.coefficients is None else " a=" + ",".join(f"{x:.3f}" for x in stats.coefficients.tolist())
            logger.warning(
                "step %d losses=%s%s |g|=%s skipped=%s %.2fs", step,
                ",".join(f"{float(x):.4f}" for x in losses), a,
                ",".join(f"{x:.3g}" for x in stats.grad_norms.tolist()), stats.skipped, scalars["seconds_step"],
            )
    return history
