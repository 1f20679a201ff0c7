"""The trainer's model: load it, add LoRA adapters, freeze the bottom, say what trains.

``model.trainable_last_blocks`` picks the top blocks that train (-1: all);
``train_final_norm`` and ``train_embeddings`` add those layers. With LoRA
(``model.lora.r > 0``) the adapters go on the linear layers of the same blocks
and peft freezes everything else.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.trainer.config import ConfigError, TrainConfig

__all__ = ["build_model", "freeze_bottom", "last_blocks"]

logger = logging.getLogger("raco_ds.trainer")


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


def build_model(cfg: TrainConfig, rank: int, world: int) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) as ``cfg.model`` describes them: bottom frozen or LoRA added; logs what trains."""
    from raco_ds.models import load_model, load_tokenizer, resolve_model_path

    mc = cfg.model
    # A short model name is converted/built once into the cache on first use: rank 0 does it alone.
    if rank == 0:
        resolve_model_path(mc.name_or_path)
    if world > 1:
        dist.barrier()
    tokenizer = load_tokenizer(mc.name_or_path)
    model = load_model(mc.name_or_path, dtype=mc.dtype, gradient_checkpointing=mc.gradient_checkpointing)
    if mc.lora.r:
        from raco_ds.lora import add_lora

        model = add_lora(model, mc.lora, last_blocks(model, mc.trainable_last_blocks), base_name=mc.name_or_path)
    trainable, total = freeze_bottom(model, cfg)
    logger.info("model %s: %.2fM parameters, %.2fM trainable (%s)", mc.name_or_path, total / 1e6, trainable / 1e6,
                _trained(model, cfg))  # fmt: skip
    return model, tokenizer


def _trained(model: torch.nn.Module, cfg: TrainConfig) -> str:
    last = cfg.model.trainable_last_blocks
    if cfg.model.lora.r:
        from raco_ds.lora import describe_lora

        return f"{describe_lora(model)} of {'all blocks' if last < 0 else f'the last {last} blocks'}"
    return "all" if last < 0 else f"last {last} blocks{' + final norm' if cfg.model.train_final_norm else ''}"
