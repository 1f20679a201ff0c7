"""The Megatron launcher's configuration: the trainer's :class:`TrainConfig` plus one ``megatron`` section.

One source of truth: objectives, weights, aggregator, c, loss, beta, data,
optimisation, seed, max_steps, output_dir, checkpointing and logging are the
very sections and fields of ``launchers/train.py`` (raco_ds.trainer.config),
parsed by the same strict parser (``--config run.yaml``, dotted options, the
short aliases) and validated by the same checks. Only what is Megatron's own
is added, in :class:`MegatronConfig` (``--megatron.tensor_parallel 2``).

Where a trainer field already says it, the Megatron launcher reads it rather
than repeating it: the sequence length is ``data.max_length`` (every
micro-batch is padded to it: pipeline shapes are fixed), bf16 is
``model.dtype=bf16``, pairs per micro-batch are
``optimisation.micro_batch_size`` and micro-batches per objective per step are
``optimisation.gradient_accumulation_steps``. Options of the DeepSpeed trainer
that this launcher does not implement are refused by name (never silently
ignored), see :data:`NOT_ON_MEGATRON`.

The model is ``model.name_or_path``: an HF folder or a name raco_ds.models
resolves offline (``tiny``, ``smollm2-135m``), converted by raco_ds.megatron.hf
(its shape, vocabulary and RoPE come from the HF config), or
:data:`RANDOM_GPT`, a randomly initialised GPT of the ``megatron.*`` shape
(the default preset: no model to convert, so tests and smoke runs are fast).

Example:
    >>> cfg = parse_megatron_args(["--megatron.tensor_parallel", "2", "--weights", "0.3,0.7"])
    >>> cfg.megatron.tensor_parallel, cfg.objectives.weights, cfg.data.max_length, cfg.model.name_or_path
    (2, [0.3, 0.7], 96, 'random-gpt')
    >>> parse_megatron_args(["--model.lora.r", "8"])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    ConfigError: model.lora.r=8 is not supported by the Megatron launcher: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raco_ds.trainer.config import ConfigError, TrainConfig, help_text, parse_args

__all__ = ["MEGATRON_PRESETS", "NOT_ON_MEGATRON", "RANDOM_GPT", "MegatronConfig", "MegatronTrainConfig",
           "megatron_help_text", "parse_megatron_args"]  # fmt: skip

RANDOM_GPT = "random-gpt"
"""``model.name_or_path`` of a randomly initialised GPT built from the ``megatron.*`` shape (no HF weights)."""


@dataclass(kw_only=True)
class MegatronConfig:
    """Megatron-core's parallel layout and the GPT model's shape."""

    tensor_parallel: int = 1
    """Tensor-parallel size (divides megatron.num_attention_heads)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (divides megatron.num_layers); the data-parallel size is the world size
    divided by tensor_parallel x pipeline_parallel."""
    distributed_optimizer: bool = True
    """Shard the optimizer state and the fp32 main parameters over data-parallel ranks (Megatron's
    distributed optimizer); false: every rank keeps them whole."""
    num_layers: int = 2
    """Transformer layers of the GPT model. This and the four shape options below apply to
    model.name_or_path=random-gpt only: an HF model's shape comes from its config."""
    hidden_size: int = 64
    """Hidden size."""
    num_attention_heads: int = 4
    """Attention heads."""
    ffn_hidden_size: int = 128
    """MLP hidden size (SwiGLU)."""
    tie_embeddings: bool = True
    """Tie the input embeddings and the output layer (across pipeline stages when pipeline_parallel > 1)."""


@dataclass(kw_only=True)
class MegatronTrainConfig(TrainConfig):
    """A whole Megatron training run: every trainer section plus ``megatron``."""

    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    """Parallel layout and model shape."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_megatron(self)


NOT_ON_MEGATRON: dict[str, Any] = {
    "ds_config": None,
    "model.lora.r": 0,
    "model.gradient_checkpointing": False,
    "model.trainable_last_blocks": -1,
    "raco.capture": "k_pass",
    "optimisation.warmup_steps": 0,
    "logging.eval_every": 0,
    "logging.tensorboard": False,
    "logging.progress_bar": False,
    "debug.inject_nonfinite": None,
}
"""Trainer options the Megatron launcher does not implement, with the only value it accepts. Held-out
evaluation runs once, at the end of the run (no eval_every); one-pass capture is not built for
Megatron's gradient buffers (docs/megatron.md)."""

_TINY: dict[str, Any] = {
    "model": {"name_or_path": RANDOM_GPT, "trainable_last_blocks": -1},
    "data": {"dataset": "pku_saferlhf", "max_length": 96, "max_prompt_length": 48, "num_train_pairs": 64,
             "num_eval_pairs": 16},
    "objectives": {"names": ["helpful", "harmless"], "weights": [0.5, 0.5]},
    "raco": {"capture": "k_pass"},
    "optimisation": {"max_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "lr": 1e-4},
    "logging": {"tensorboard": False, "progress_bar": False},
    "checkpointing": {"output_dir": "outputs/megatron", "export": False},
}  # fmt: skip

MEGATRON_PRESETS: dict[str, dict[str, Any]] = {"main": _TINY, "tiny": _TINY}
"""Named starting points of the Megatron launcher; "main" (the default) is a tiny random GPT on the bundled
PKU-SafeRLHF sample, so that a bare ``torchrun ... launchers/train_megatron.py`` runs on any machine
(``--model tiny`` starts from the packaged tiny HF Llama instead)."""

_USAGE = ("usage: torchrun --nproc_per_node N launchers/train_megatron.py [--preset NAME] [--config FILE]\n"
          "                                [--OPTION VALUE ...]")  # fmt: skip


def _dotted(cfg: TrainConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "tie_embeddings")


def _validate_megatron(cfg: MegatronTrainConfig) -> None:
    for dotted, allowed in NOT_ON_MEGATRON.items():
        value = _dotted(cfg, dotted)
        if value != allowed and not (dotted == "raco.capture" and value == "auto"):
            raise ConfigError(
                f"{dotted}={value!r} is not supported by the Megatron launcher: set --{dotted} {allowed} "
                "(or use launchers/train.py, the DeepSpeed launcher, which has it)"
            )
    mc = cfg.megatron
    for name in ("tensor_parallel", "pipeline_parallel", "num_layers", "hidden_size", "num_attention_heads",
                 "ffn_hidden_size"):  # fmt: skip
        if getattr(mc, name) < 1:
            raise ConfigError(f"megatron.{name} must be >= 1, got {getattr(mc, name)}")
    if cfg.model.name_or_path != RANDOM_GPT:
        # An HF model's shape is its config's; raco_ds.megatron.hf checks TP/PP against it when building.
        default = MegatronConfig()
        shaped = [name for name in _SHAPE if getattr(mc, name) != getattr(default, name)]
        if shaped:
            raise ConfigError(
                f"megatron.{shaped[0]} sets the shape of --model {RANDOM_GPT}; model.name_or_path="
                f"{cfg.model.name_or_path!r} takes its shape from its HF config: drop the megatron.{shaped[0]} option"
            )
        return
    if cfg.checkpointing.export:
        raise ConfigError(
            f"checkpointing.export=True needs an HF model (--model tiny, an HF folder); --model {RANDOM_GPT} has no "
            "HF config to export to: set --checkpointing.export false"
        )
    if mc.num_attention_heads % mc.tensor_parallel:
        raise ConfigError(
            f"megatron.num_attention_heads={mc.num_attention_heads} is not divisible by megatron.tensor_parallel="
            f"{mc.tensor_parallel}; each tensor-parallel rank holds whole heads"
        )
    if mc.num_layers % mc.pipeline_parallel:
        raise ConfigError(
            f"megatron.num_layers={mc.num_layers} is not divisible by megatron.pipeline_parallel="
            f"{mc.pipeline_parallel}; each pipeline stage holds the same number of layers"
        )
    if mc.hidden_size % mc.num_attention_heads:
        raise ConfigError(
            f"megatron.hidden_size={mc.hidden_size} is not divisible by megatron.num_attention_heads="
            f"{mc.num_attention_heads}"
        )


def parse_megatron_args(argv: list[str]) -> MegatronTrainConfig:
    """The Megatron launcher's config from ``--preset``, ``--config`` and dotted/alias options (strict)."""
    return parse_args(argv, root=MegatronTrainConfig, presets=MEGATRON_PRESETS)  # type: ignore[return-value]


def megatron_help_text() -> str:
    """``--help`` of the Megatron launcher: every option, the ``megatron.*`` section included."""
    return help_text(MegatronTrainConfig, MEGATRON_PRESETS, _USAGE)
