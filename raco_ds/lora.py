"""LoRA adapters through the ``peft`` library: adding them, the reference without them, saving and merging.

With ``--model.lora.r R`` the trainer wraps the loaded model with
:func:`add_lora`: every base weight is frozen and peft's LoRA layers go on the
block linear layers, so the engine, the K gradient shards, the Gram and the
combination only ever see the adapter parameters. peft keeps each adapter as
plain ``nn.Linear`` modules (``lora_A`` / ``lora_B``, after an ``nn.Dropout``)
beside the frozen base layer, which one-pass capture's Linear rule covers
exactly; DoRA's magnitude vectors have no rule and are refused by name.

The reference policy is the base model: :func:`adapters_disabled` runs a forward
without the adapters (no second copy of the weights). A trained run is saved as
a PEFT adapter folder (``PeftModel.save_pretrained``; see
raco_ds.trainer.export.export_lora) and as a merged HF model (:func:`load_merged`,
then ``save_pretrained``); :func:`is_adapter_folder` lets loaders accept either.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from raco_ds.trainer.config import LoraAdapterConfig

__all__ = ["adapters_disabled", "add_lora", "describe_lora", "is_adapter_folder", "is_peft_model", "load_merged",
           "lora_target_names"]  # fmt: skip

ADAPTER_CONFIG = "adapter_config.json"
"""The file that marks a PEFT adapter folder."""


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's transposed linear), the layers peft's LoRA wraps."""
    cls = type(module)
    return isinstance(module, nn.Linear) or (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"))


def lora_target_names(model: nn.Module, blocks: Sequence[nn.Module], target_modules: Sequence[str] | None) -> list[str]:
    """Full module names of the linear layers inside ``blocks`` whose last name component is in ``target_modules``
    (every linear layer of the blocks when None). Raises ConfigError naming the available layers when a requested
    name matches none."""
    from raco_ds.trainer.config import ConfigError

    inside = {id(m) for block in blocks for m in block.modules()}
    linear = [(name, name.rsplit(".", 1)[-1]) for name, m in model.named_modules() if id(m) in inside and _is_linear(m)]
    wanted = set(target_modules) if target_modules is not None else {leaf for _, leaf in linear}
    available = sorted({leaf for _, leaf in linear})
    if not available:
        raise ConfigError(f"model.lora: the chosen blocks of {type(model).__name__} hold no linear layer for adapters")
    missing = sorted(wanted.difference(available))
    if missing:
        raise ConfigError(
            f"model.lora.target_modules: {missing} name no linear layer of the chosen blocks; the blocks' linear "
            f"layers are {available} (or pass null for all of them)"
        )
    return [name for name, leaf in linear if leaf in wanted]


def add_lora(model: nn.Module, options: LoraAdapterConfig, blocks: Sequence[nn.Module], base_name: str) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model`` with adapters on the linear layers of ``blocks``.

    Every base parameter is frozen; the adapters (LoRA B initialised to zero, so the
    wrapped model computes exactly what the base model does) are the only trainable
    parameters. ``base_name`` (a raco_ds short name or a folder) is recorded in the
    adapter config as the base model to load it onto.
    """
    import peft

    config = peft.LoraConfig(
        r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
        target_modules=lora_target_names(model, blocks, options.target_modules), use_rslora=options.use_rslora,
        use_dora=options.use_dora, bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = base_name
    return wrapped


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (False, without importing peft, when it is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def describe_lora(model: nn.Module) -> str:
    """One line for the start-up log: rank, alpha, variants and how many layers carry adapters."""
    config = model.peft_config[model.active_adapter]
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(f"lora_A.{model.active_adapter}"))
    variants = "".join(f", {v}" for v, on in (("rsLoRA", config.use_rslora), ("DoRA", config.use_dora)) if on)
    return f"LoRA r={config.r} alpha={config.lora_alpha:g} dropout={config.lora_dropout:g}{variants} on {layers} layers"


def adapters_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which ``model`` (a PeftModel, possibly inside a DeepSpeed engine) runs as its base model.

    A no-op for any other model, whose reference is simply the initial model.
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model as .module
    return module.disable_adapter() if is_peft_model(module) else contextlib.nullcontext()


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_merged(folder: str | Path, dtype: str = "fp32", base: str | None = None) -> nn.Module:
    """The base model named in the adapter folder's config (or ``base``) with the adapter merged in: a plain
    HF model (``save_pretrained`` writes it as a merged export)."""
    from peft import PeftModel

    from raco_ds.models import load_model

    base = base or json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    if not base:
        raise ValueError(f"{folder}/{ADAPTER_CONFIG} names no base model; pass the base model explicitly")
    return PeftModel.from_pretrained(load_model(base, dtype=dtype), str(folder)).merge_and_unload()
