"""The trainer's configuration: typed, keyword-only dataclasses, loaded strictly.

One :class:`TrainConfig` describes a run. It is built in three layers, each
overriding the one before:

1. the defaults below (the README's main job: SmolLM2-135M-Instruct on the
   bundled HelpSteer sample, RACO over helpfulness/concise with weights 0.3/0.7,
   a budget chosen so the held-out table moves beyond its confidence intervals
   on a 2-core CPU), or a ``--preset``;
2. a YAML or JSON file (``--config run.yaml``), sections named like the
   dataclass fields (``optimisation: {lr: 1e-5}``);
3. command-line overrides: dotted (``--optimisation.lr 1e-5`` or
   ``--optimisation.lr=1e-5``) or one of the short aliases in :data:`ALIASES`
   (``--weights 0.3,0.7``).

Loading is strict (nanotron's rule): an unknown key is an error that names the
key, where it came from and the closest known key. Every field carries a
docstring, which is also its ``--help`` text (torchtitan's rule). The resolved
config is saved with the run (``config.yaml``) and :func:`load_config` reads
it back to an equal object.

Example:
    >>> cfg = parse_args(["--objectives", "helpful,harmless", "--weights", "0.3,0.7", "--optimisation.lr=1e-5"])
    >>> cfg.objectives.weights, cfg.optimisation.lr
    ([0.3, 0.7], 1e-05)
    >>> parse_args(["--optimisation.max_step", "1"])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    ConfigError: unknown option --optimisation.max_step (from the command line); did you mean --optimisation.max_steps? See --help.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import json
import math
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ALIASES",
    "PRESETS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "LoggingConfig",
    "LoraAdapterConfig",
    "LossConfig",
    "ModelConfig",
    "ObjectivesConfig",
    "OptimisationConfig",
    "RacoConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "help_text",
    "load_config",
    "parse_args",
    "run_config_root",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field and the fix."""


# ---------------------------------------------------------------------------
# The sections. Field docstrings are read from this source by help_text().


@dataclass(kw_only=True)
class LoraAdapterConfig:
    """LoRA adapters through the peft library (r > 0): only the adapters train; the frozen base is the reference."""

    r: int = 0
    """Adapter rank (TRL: peft_config=LoraConfig(r=...)); 0 disables LoRA (then model.trainable_last_blocks
    decides what trains). With r > 0 every
    base weight is frozen and adapters go on the linear layers of the last model.trainable_last_blocks blocks
    (-1: all blocks); train_final_norm and train_embeddings do not apply."""
    alpha: float = 16.0
    """LoraConfig's lora_alpha. Scaling numerator: the adapter's output is multiplied by alpha / r (alpha /
    sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """LoraConfig's lora_dropout. Dropout on the adapters' input (replayed exactly by one-pass capture's self-check)."""
    target_modules: list[str] | None = None
    """Names (last component, e.g. q_proj,v_proj) of the block linear layers that get adapters. None: every
    linear layer of the blocks (attention and MLP; never the embeddings or the LM head)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA). One-pass capture has no rule for its magnitude vectors and refuses them
    by name, so raco.capture=auto runs K passes."""


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to train and which of its parameters move."""

    name_or_path: str = "smollm2-135m"
    """The model to train (TRL: DPOTrainer's model; the frozen initial model is the reference, ref_model=None).
    A local HF folder, or a short name known to raco_ds.models ("smollm2-135m": the packaged
    SmolLM2-135M-Instruct; "tiny": a tiny random Llama with a locally trained tokenizer)."""
    dtype: str = "fp32"
    """Parameter dtype (TRL: bf16=True is "bf16"): "fp32" or "bf16" (fills the DeepSpeed config's bf16/fp16 "auto"
    fields; fp16 is refused: its loss scaling would rescale each objective differently). CPUs want
    fp32; GPUs want bf16."""
    gradient_checkpointing: bool = False
    """TRL: gradient_checkpointing. Recompute activations in the backward to save memory (slower; for long
    sequences on GPU)."""
    trainable_last_blocks: int = 4
    """Train only the last N transformer blocks (plus the final norm if train_final_norm); -1 trains
    every parameter. Freezing the bottom of the network also stops the backward there, which is
    what lets the CPU main job finish in minutes. On GPUs set -1."""
    train_final_norm: bool = True
    """Also train the final normalisation layer when trainable_last_blocks >= 0 (without LoRA)."""
    train_embeddings: bool = False
    """Also train the input embeddings (and a tied LM head) when trainable_last_blocks >= 0."""
    lora: LoraAdapterConfig = field(default_factory=LoraAdapterConfig)
    """LoRA adapters (--model.lora.r 16 turns them on)."""


@dataclass(kw_only=True)
class DataConfig:
    """Which preference data, how it is tokenised, and the held-out split."""

    dataset: str = "helpsteer"
    """What DPOTrainer's train_dataset is in TRL. A bundled sample ("helpsteer"; "pku_saferlhf": shared pairs;
    "hh_rlhf": per-objective pairs), a full Hub data set with a preset (PKU-Alignment/PKU-SafeRLHF,
    Anthropic/hh-rlhf, nvidia/HelpSteer, nvidia/HelpSteer2, openai/summarize_from_feedback; docs/data.md),
    any other Hub name or local folder laid out like a Hub repository (read by datasets.load_dataset, TRL
    prompt/chosen/rejected columns, objective "preference"), or a local jsonl/json/parquet file or
    save_to_disk folder in TRL format."""
    data_dir: str | None = None
    """Folder holding the preset's files: for a bundled sample, files under their bundled names (e.g. a full
    PKU-SafeRLHF export as pku_saferlhf_sample.jsonl); for a Hub preset, a local copy of its Hub repository
    (huggingface_hub.snapshot_download). None: the bundled samples (data/), or the Hub."""
    config_name: str | None = None
    """The Hub configuration (load_dataset's name, e.g. alpaca-7b for PKU-SafeRLHF); None: the default one."""
    split: str | None = None
    """The split read through load_dataset; None: the preset's (train)."""
    revision: str | None = None
    """The Hub revision (branch, tag or commit) read through load_dataset; None: the preset's (main)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column renames before parsing, {name in the data: name raco_ds reads}, e.g. {question: prompt}
    (a Hub name or Hub-layout folder only)."""
    max_length: int = 192
    """Tokens per row (prompt + response); longer rows are truncated. TRL: max_length."""
    max_prompt_length: int = 64
    """Prompt tokens kept (from the end of the prompt, TRL's truncation_mode keep_end) before the response.
    TRL: max_prompt_length."""
    num_train_pairs: int | None = 96
    """Use at most this many training pairs (None: all but the held-out pairs)."""
    num_eval_pairs: int = 64
    """Held-out pairs for evaluation, split off the data before training by whole prompts (a prompt's
    pairs, and pairs sharing a response with them, are all held out or all train)."""
    split_seed: int = 0
    """Seed of the held-out split, independent of optimisation.seed so that the seeds of a sweep
    share one held-out set."""
    shuffle: bool = True
    """Shuffle the training pairs each epoch (seeded by optimisation.seed and the epoch)."""
    skip_invalid: bool = False
    """Skip malformed data rows (counted and summarised in one warning) instead of stopping at the
    first one with its file:row:field."""
    padding_free: bool = False
    """Pack each micro-batch's sequences into rows without padding (TRL's padding_free; positions
    restart per sequence; flash-attention varlen on GPU, a block-diagonal causal mask with sdpa/eager).
    Needs a model whose attention honours position-id packing (checked on the first micro-batch);
    one-pass capture cannot split packed rows, so raco.capture=auto runs K passes."""

    def spec(self, objectives: list[str]) -> Any:
        """The :class:`~raco_ds.data.objectives.DatasetSpec` these options name, with ``objectives`` selected."""
        from raco_ds.data.objectives import resolve_dataset  # here: configs parse before the data code loads
        from raco_ds.data.records import DataError

        try:
            return resolve_dataset(self.dataset, objectives=objectives, data_dir=self.data_dir,
                                   config_name=self.config_name, split=self.split, revision=self.revision,
                                   columns=self.columns)  # fmt: skip
        except DataError as err:  # a name or option that matches no data: the config's to fix
            raise ConfigError(str(err)) from None


@dataclass(kw_only=True)
class ObjectivesConfig:
    """The preference objectives and the user's weights over them."""

    names: list[str] = field(default_factory=lambda: ["helpfulness", "concise"])
    """Objective names, as the dataset preset knows them (K = len(names))."""
    weights: list[float] = field(default_factory=lambda: [0.3, 0.7])
    """User weights w on the simplex, one per objective; normalised to sum to 1."""


@dataclass(kw_only=True)
class LossConfig:
    """The per-objective preference loss."""

    name: str = "dpo"
    """A raco_ds.losses registry name: "dpo", "ipo", "hinge", "simpo" (reference-free). TRL: loss_type
    ("sigmoid" is "dpo"; CPOTrainer's "simpo" is "simpo")."""
    beta: float = 0.2
    """Inverse temperature (0.2 is the RACO paper's value; SimPO wants ~2.0). TRL: beta."""
    options: dict[str, float] = field(default_factory=dict)
    """Loss-specific options, e.g. {label_smoothing: 0.1} for dpo (TRL: label_smoothing) or {gamma: 0.5} for
    simpo."""


@dataclass(kw_only=True)
class RacoConfig:
    """How the per-objective gradients are combined each optimizer step."""

    aggregator: str = "raco"
    """A raco_ds.solver aggregator: "raco", "cagrad", "linear" (weighted-loss DPO baseline), "mgda"."""
    c: float = 0.4
    """Conflict radius c in [0, 1) of raco/cagrad (paper default 0.4)."""
    on_nonfinite: str = "skip"
    """What the hook does when an objective's gradient is not finite: "skip" the step or "raise"."""
    capture: str = "auto"
    """How the K per-objective gradients are captured: "onepass" (one forward and backward for all,
    raco_ds.onepass), "k_pass" (one backward per objective), or "auto" (onepass where supported and
    where it passes its self-check; K passes otherwise, with the reason logged)."""
    verify_onepass: bool = True
    """Check one-pass gradients against autograd on the first step (two extra forward and backward
    passes, once); a mismatch falls back to K passes ("auto") or stops the run ("onepass")."""
    verify_every: int = 0
    """Repeat the one-pass self-check every N steps (0: only the first step)."""
    max_consecutive_skips: int = 3
    """Stop the run with an error after this many steps in a row skipped for non-finite gradients
    (the checkpoints written before stay); 0: never stop."""


@dataclass(kw_only=True)
class OptimisationConfig:
    """Optimizer, schedule, batch arithmetic and the step budget."""

    max_steps: int = 12
    """Optimizer steps to train. TRL: max_steps (there is no num_train_epochs: pools cycle in seeded epochs)."""
    micro_batch_size: int = 4
    """Pairs per micro-batch per rank (fills DeepSpeed's train_micro_batch_size_per_gpu). TRL:
    per_device_train_batch_size."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per objective per optimizer step (fills DeepSpeed's gradient_accumulation_steps). TRL:
    gradient_accumulation_steps."""
    lr: float = 1.5e-4
    """Peak learning rate (fills the DeepSpeed optimizer's and scheduler's "auto" lr). TRL: learning_rate."""
    warmup_steps: int = 0
    """TRL: warmup_steps. With N > 0: DeepSpeed's WarmupDecayLR warms up linearly from 0 over N steps (its first step
    runs at lr 0), then decays linearly to 0 at max_steps. With 0: a constant lr (that schedule
    decays towards its start value, so starting at lr leaves nothing to decay)."""
    weight_decay: float = 0.0
    """AdamW weight decay. TRL: weight_decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas. TRL: adam_beta1, adam_beta2."""
    eps: float = 1e-8
    """AdamW epsilon. TRL: adam_epsilon."""
    max_grad_norm: float = 1.0
    """Clip the combined update to this norm (DeepSpeed's gradient_clipping); 0 disables. TRL: max_grad_norm."""
    seed: int = 0
    """Seed of model init, data order and every RNG (identical on every rank). TRL: seed."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Console, trackers (TensorBoard, wandb) and held-out evaluation."""

    eval_every: int = 0
    """Held-out evaluation every N steps (0: only before and after training). TRL: eval_steps."""
    eval_batch_size: int = 8
    """Pairs per evaluation batch per rank. TRL: per_device_eval_batch_size."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where scalars go, as in transformers/TRL: "tensorboard" (event files under <output_dir>/tensorboard),
    "wandb" (Weights & Biases; WANDB_MODE, WANDB_PROJECT, WANDB_DIR apply; needs pip install wandb), both
    (tensorboard,wandb), or "none". The same scalar names in each; rank 0 only."""
    run_name: str | None = None
    """The run's name in wandb (TRL: run_name); None: the output folder's name."""
    tensorboard: bool = True
    """False turns TensorBoard off even when report_to names it (kept for configs written before
    report_to)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    log_every: int = 1
    """Write training scalars every N steps. TRL: logging_steps."""

    def trackers(self) -> list[str]:
        """The trackers that receive scalars (report_to, without tensorboard when tensorboard is false)."""
        return [name for name in self.report_to if name != "none" and (name != "tensorboard" or self.tensorboard)]


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where the run writes, checkpoints, resume and export."""

    output_dir: str = "outputs/raco"
    """Run folder: config.yaml, tensorboard/, checkpoints/, export/. TRL: output_dir."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end when save_final is set). TRL: save_steps."""
    save_final: bool = False
    """Also checkpoint after the last step (needed to --resume beyond max_steps later)."""
    keep_last: int = 2
    """TRL: save_total_limit. Complete checkpoints kept; older ones are deleted after a newer one is complete
    (0: keep all)."""
    stop_after_steps: int = 0
    """Checkpoint and stop after this many steps in this job (0: run to max_steps); continue with
    --resume. For time-sliced allocations; the LR schedule still spans max_steps."""
    resume: Literal[False, True, "strict"] = False
    """TRL: resume_from_checkpoint=True. Continue from the newest intact checkpoint in output_dir/checkpoints
    (if there is one); a
    damaged newer one (a file that no longer matches the checkpoint's manifest) is reported and passed
    over. "strict" (--resume strict) stops with an error instead of passing over a damaged one."""
    export: bool = True
    """Write the final model as a HF folder with safetensors to <output_dir>/export (with LoRA: the merged model,
    and the adapter alone as a PEFT folder in <output_dir>/export_adapter)."""


@dataclass(kw_only=True)
class DebugConfig:
    """Fault injection for tests and for checking a cluster's handling of bad steps."""

    inject_nonfinite: str | None = None
    """"STEP:OBJECTIVE": on optimizer step STEP (1-based) the loss of OBJECTIVE (its name or 0-based
    index) becomes NaN on every rank, so the step is skipped (or raises with raco.on_nonfinite=raise)."""

    def nonfinite_target(self, names: list[str]) -> tuple[int, int] | None:
        """(step, objective index) of ``inject_nonfinite``, or None; raises ConfigError when malformed."""
        if self.inject_nonfinite is None:
            return None
        step, sep, objective = str(self.inject_nonfinite).partition(":")
        if not sep or not step.strip().isdigit() or int(step) < 1:
            raise ConfigError(
                f"debug.inject_nonfinite={self.inject_nonfinite!r} must be STEP:OBJECTIVE with STEP >= 1, "
                f"e.g. --debug.inject_nonfinite 2:{names[0]}"
            )
        objective = objective.strip()
        if objective in names:
            return int(step), names.index(objective)
        if objective.isdigit() and int(objective) < len(names):
            return int(step), int(objective)
        raise ConfigError(
            f"debug.inject_nonfinite={self.inject_nonfinite!r}: objective {objective!r} is neither one of {names} "
            f"nor an index below {len(names)}; e.g. --debug.inject_nonfinite {step}:{names[0]}"
        )


@dataclass(kw_only=True)
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model and its trainable parameters."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data, tokenisation and the held-out split."""
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    """Objectives and user weights."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Per-objective preference loss."""
    raco: RacoConfig = field(default_factory=RacoConfig)
    """Gradient combination."""
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    """Optimizer and batch arithmetic."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, TensorBoard and evaluation."""
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints, resume and export."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Fault injection."""
    ds_config: str | None = None
    """TRL: deepspeed. DeepSpeed JSON config ("auto" fields are filled from this config). None:
    ds_configs/zero3.json."""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_objectives(self) -> int:
        """K, the number of objectives."""
        return len(self.objectives.names)


# ---------------------------------------------------------------------------
# Presets and short aliases.

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded defaults are the README main job; "main" names them explicitly. Measured on 2 CPU
    # ranks (README): 12 steps of 8 pairs move held-out concise accuracy to 0.74 [0.58, 0.90].
    "main": {},
    # About a minute on 2 CPU cores: a tiny random Llama, the real bundled PKU-SafeRLHF pairs.
    "tiny": {
        "model": {"name_or_path": "tiny", "trainable_last_blocks": -1},
        "data": {"dataset": "pku_saferlhf", "max_length": 64, "max_prompt_length": 32, "num_train_pairs": 64,
                 "num_eval_pairs": 16},
        "objectives": {"names": ["helpful", "harmless"], "weights": [0.5, 0.5]},
        "optimisation": {"max_steps": 8, "micro_batch_size": 4, "lr": 1e-3},
        "logging": {"eval_every": 4, "eval_batch_size": 8},
        "checkpointing": {"output_dir": "outputs/tiny"},
    },
}
"""Named starting points (``--preset NAME``), applied before the config file and the CLI."""

ALIASES: dict[str, str] = {
    "--model": "model.name_or_path",
    "--data": "data.dataset",
    "--objectives": "objectives.names",
    "--weights": "objectives.weights",
    "--aggregator": "raco.aggregator",
    "--c": "raco.c",
    "--beta": "loss.beta",
    "--loss": "loss.name",
    "--max-steps": "optimisation.max_steps",
    "--output-dir": "checkpointing.output_dir",
    "--resume": "checkpointing.resume",
    "--ds_config": "ds_config",
    "--ds-config": "ds_config",
    "--capture": "raco.capture",
    "--seed": "optimisation.seed",
}
"""Short command-line options and the dotted field each one sets."""

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_CAPTURES = ("auto", "onepass", "k_pass")
_DTYPES = ("fp32", "bf16")  # fp16 loss scaling would rescale each objective differently


# ---------------------------------------------------------------------------
# Validation: each error names the field, what was found and the fix.


def _validate(cfg: TrainConfig) -> None:
    from raco_ds.losses import LOSSES  # here: this module imports no torch (configs parse before it loads)
    from raco_ds.solver import AGGREGATORS
    from raco_ds.step import ON_NONFINITE

    names, weights = cfg.objectives.names, cfg.objectives.weights
    if not names:
        raise ConfigError("objectives.names is empty; pass at least one objective, e.g. --objectives helpful,harmless")
    if len(set(names)) != len(names):
        raise ConfigError(f"objectives.names has duplicates {names}; each objective must be named once")
    if len(weights) != len(names):
        raise ConfigError(
            f"objectives.weights has {len(weights)} entries {weights} for {len(names)} objectives {names}; "
            f"pass one weight per objective, e.g. --weights {','.join(['%.3g' % (1 / len(names))] * len(names))}"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"objectives.weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights)
    cfg.objectives.weights = [float(w) / total for w in weights]  # the simplex; saved normalised

    if cfg.loss.name not in LOSSES:
        raise ConfigError(f"loss.name={cfg.loss.name!r} is not a registered loss; use one of {sorted(LOSSES)}")
    if not math.isfinite(cfg.loss.beta) or cfg.loss.beta <= 0:
        raise ConfigError(f"loss.beta must be a positive number, got {cfg.loss.beta}")
    if cfg.raco.aggregator not in AGGREGATORS:
        raise ConfigError(f"raco.aggregator={cfg.raco.aggregator!r} is not registered; use one of {sorted(AGGREGATORS)}")
    if not 0.0 <= cfg.raco.c < 1.0:
        raise ConfigError(f"raco.c must be in [0, 1), got {cfg.raco.c}")
    for name, value, allowed in (
        ("raco.capture", cfg.raco.capture, _CAPTURES),
        ("raco.on_nonfinite", cfg.raco.on_nonfinite, ON_NONFINITE),
        ("model.dtype", cfg.model.dtype, _DTYPES),
    ):
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not allowed; use one of {list(allowed)}")

    opt = cfg.optimisation
    for name, value in (
        ("optimisation.max_steps", opt.max_steps),
        ("optimisation.micro_batch_size", opt.micro_batch_size),
        ("optimisation.gradient_accumulation_steps", opt.gradient_accumulation_steps),
        ("data.max_length", cfg.data.max_length),
        ("data.num_eval_pairs", cfg.data.num_eval_pairs),
        ("logging.eval_batch_size", cfg.logging.eval_batch_size),
        ("logging.log_every", cfg.logging.log_every),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if not 0 < cfg.data.max_prompt_length < cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length={cfg.data.max_prompt_length} must be in [1, data.max_length={cfg.data.max_length}) "
            "so that some response tokens remain"
        )
    if cfg.data.num_train_pairs is not None and cfg.data.num_train_pairs < 1:
        raise ConfigError(f"data.num_train_pairs must be >= 1 or null (all), got {cfg.data.num_train_pairs}")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"optimisation.betas must be two numbers in [0, 1), got {opt.betas}")
    if not math.isfinite(opt.lr) or opt.lr <= 0:
        raise ConfigError(f"optimisation.lr must be a positive number, got {opt.lr}")
    for name, value in (
        ("optimisation.warmup_steps", opt.warmup_steps),
        ("optimisation.max_grad_norm", opt.max_grad_norm),
        ("optimisation.weight_decay", opt.weight_decay),
        ("logging.eval_every", cfg.logging.eval_every),
        ("checkpointing.save_every", cfg.checkpointing.save_every),
        ("checkpointing.keep_last", cfg.checkpointing.keep_last),
        ("checkpointing.stop_after_steps", cfg.checkpointing.stop_after_steps),
        ("raco.verify_every", cfg.raco.verify_every),
        ("raco.max_consecutive_skips", cfg.raco.max_consecutive_skips),
    ):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    cfg.debug.nonfinite_target(names)
    _validate_report_to(cfg.logging.report_to)
    if cfg.model.trainable_last_blocks < -1:
        raise ConfigError(
            f"model.trainable_last_blocks must be -1 (all) or >= 0, got {cfg.model.trainable_last_blocks}"
        )
    _validate_lora(cfg.model)


def _validate_report_to(report_to: list[str]) -> None:
    from raco_ds.trainer.trackers import TRACKERS  # here: trackers.py imports this module

    allowed = [*TRACKERS, "none"]
    unknown = [name for name in report_to if name not in allowed]
    if unknown or not report_to:
        raise ConfigError(f"logging.report_to={report_to} names {unknown or 'nothing'}; use one or more of "
                          f"{allowed}, e.g. --logging.report_to tensorboard,wandb")  # fmt: skip
    if "none" in report_to and len(report_to) > 1:
        raise ConfigError(f"logging.report_to={report_to} mixes none with trackers; pass none alone, or drop it")


def _validate_lora(model: ModelConfig) -> None:
    lora = model.lora
    if lora.r < 0:
        raise ConfigError(f"model.lora.r must be >= 0 (0 disables LoRA), got {lora.r}")
    if lora.r == 0:
        chosen = [name for name, value in (("target_modules", lora.target_modules), ("use_rslora", lora.use_rslora),
                                           ("use_dora", lora.use_dora)) if value]  # fmt: skip
        if chosen:
            raise ConfigError(f"model.lora.{chosen[0]} is set but LoRA is off; pass --model.lora.r (e.g. 16)")
        return
    if not math.isfinite(lora.alpha) or lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha must be a positive number, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError("model.lora.target_modules is empty; name layers (e.g. q_proj,v_proj) or null for all")
    if model.trainable_last_blocks == 0:
        raise ConfigError("model.lora.r > 0 with model.trainable_last_blocks=0 puts adapters on no block; "
                          "use -1 (all blocks) or N >= 1")
    if model.train_embeddings:
        raise ConfigError("model.train_embeddings does not apply with LoRA (only adapters train); "
                          "set --model.train_embeddings false or --model.lora.r 0")


# ---------------------------------------------------------------------------
# Dict <-> dataclass, strictly.


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {known}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a value from a file or the CLI to the annotated type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping like {{name: value}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:  # a few allowed values; booleans among them are spelled as bools are
        for choice in args:
            if isinstance(choice, bool) and isinstance(value, (bool, str)):
                if str(value).lower() in (_TRUE if choice else _FALSE):
                    return choice
            elif value == choice:
                return choice
        allowed = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
        raise ConfigError(f"{where} must be one of {allowed}; got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value, 0)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"config field {where} has an unsupported type {tp}")  # a bug in this module


def _merge(base: dict[str, Any], update: dict[str, Any], cls: type, source: str, prefix: str = "") -> None:
    """Merge ``update`` into ``base`` in place, rejecting keys that ``cls`` does not have."""
    if not isinstance(update, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} in {source} must be a mapping, got {update!r}")
    hints = _hints(cls)
    for key, value in update.items():
        if key not in hints:
            raise ConfigError(f"unknown key {prefix + str(key)!r} in {source}{_suggest(str(key), list(hints))}")
        if _is_section(hints[key]):
            _merge(base.setdefault(key, {}), value or {}, hints[key], source, f"{prefix}{key}.")
        else:
            base[key] = _coerce(value, hints[key], prefix + key)


def config_from_dict(
    data: dict[str, Any], source: str = "a dict", base: dict[str, Any] | None = None, root: type = TrainConfig
) -> TrainConfig:
    """A validated ``root`` (:class:`TrainConfig` or a subclass with more sections) from nested ``data``
    (strict: unknown keys raise)."""
    merged: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    _merge(merged, data, root, source)
    return _build(root, merged)


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = _hints(cls)
    kwargs = {k: _build(hints[k], v) if _is_section(hints[k]) else v for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML; :func:`load_config` reads it back to an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved raco_ds training config (reload with --config this-file)\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"--config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {path} must hold a mapping of sections (model:, data:, ...), got {type(data).__name__}"
        )
    return data


def load_config(path: str | Path, root: type = TrainConfig) -> TrainConfig:
    """Read a YAML/JSON config file (e.g. a run's saved config.yaml) strictly, as a ``root``."""
    return config_from_dict(_read_file(path), source=str(path), root=root)


def run_config_root(path: str | Path) -> type:
    """The config class of a run's saved config: MegatronTrainConfig when it has the Megatron launcher's
    ``megatron`` section (so that launchers/eval.py reads Megatron runs too), else TrainConfig."""
    if "megatron" in _read_file(path):
        from raco_ds.megatron.config import MegatronTrainConfig

        return MegatronTrainConfig
    return TrainConfig


# ---------------------------------------------------------------------------
# The command line.


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field of a dataclass (torchtitan-style), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        is_doc = (
            isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
        )
        if is_field and is_doc:
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flat_fields(cls: type = TrainConfig, prefix: str = "") -> dict[str, tuple[Any, str, Any]]:
    """Every leaf option: dotted name -> (type, docstring, default)."""
    out: dict[str, tuple[Any, str, Any]] = {}
    hints, docs = _hints(cls), field_docs(cls)
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in hints.items():
        if _is_section(tp):
            out.update(_flat_fields(tp, f"{prefix}{name}."))
        else:
            f = defaults[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[prefix + name] = (tp, docs.get(name, ""), default)
    return out


_USAGE = (
    "usage: [deepspeed --num_gpus N] launchers/train.py [--ds_config FILE] [--preset NAME] [--config FILE]\n"
    "                                [--OPTION VALUE ...]"
)


def help_text(root: type = TrainConfig, presets: dict[str, dict[str, Any]] | None = None, usage: str = _USAGE) -> str:
    """The ``--help`` text: usage, aliases, presets and every dotted option of ``root`` with its docstring."""
    lines = [
        usage,
        "",
        f"presets: {', '.join(PRESETS if presets is None else presets)} (default: the README main job)",
        "coming from TRL: docs/trl.md maps each DPOConfig option to its option here ('TRL: name' below)",
        "short options:",
    ]
    lines += [f"  {alias:<14} = --{dotted}" for alias, dotted in ALIASES.items()]
    lines.append("options (lists are comma-separated; bools take true/false, a bare flag means true):")
    for dotted, (tp, doc, default) in _flat_fields(root).items():
        type_name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  --{dotted} ({type_name}, default {default!r})")
        lines.extend("      " + line for line in textwrap.wrap(doc, 92))
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[leaf] = value


def parse_args(
    argv: list[str], root: type = TrainConfig, presets: dict[str, dict[str, Any]] | None = None
) -> TrainConfig:
    """Build the config from ``--preset``, ``--config`` and dotted/alias overrides (strict).

    ``--local_rank`` (added by the ``deepspeed`` launcher) is accepted and ignored:
    the rank comes from the environment. ``--help`` is handled by the caller
    (see :func:`help_text`). ``root`` and ``presets``: another launcher's config class
    (a :class:`TrainConfig` subclass with its own sections) and its named starting points.
    """
    presets = PRESETS if presets is None else presets
    flat = _flat_fields(root)
    preset, config_file, overrides = "main", None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --optimisation.lr 1e-5")
        key, has_value, value = arg.partition("=")
        takes_next = not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if key == "--local_rank":
            i += 1 if has_value or not takes_next else 2
            continue
        dotted = ALIASES.get(key, key[2:])
        if key in ("--preset", "--config") or dotted in flat:
            if not has_value:
                tp = flat[dotted][0] if dotted in flat else str
                if takes_next:
                    value, i = argv[i + 1], i + 1
                elif tp is bool or True in typing.get_args(tp):
                    value = "true"  # a bare boolean flag, e.g. --resume
                else:
                    raise ConfigError(f"option {key} needs a value")
            if key == "--preset":
                preset = value
            elif key == "--config":
                config_file = value
            else:
                overrides[dotted] = _coerce(value, flat[dotted][0], f"--{dotted}")
            i += 1
            continue
        known = list(flat) + [a[2:] for a in ALIASES] + ["preset", "config"]
        close = difflib.get_close_matches(key[2:], known, n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        raise ConfigError(f"unknown option {key} (from the command line){hint} See --help.")

    if preset not in presets:
        raise ConfigError(f"--preset {preset!r} is unknown; use one of {list(presets)}")
    data: dict[str, Any] = json.loads(json.dumps(presets[preset]))
    if config_file is not None:
        _merge(data, _read_file(config_file), root, config_file)
    cli: dict[str, Any] = {}
    for dotted, value in overrides.items():
        _set_dotted(cli, dotted, value)
    cfg = config_from_dict(cli, source="the command line", base=data, root=root)
    from raco_ds.trainer.trackers import require_tracker_packages

    require_tracker_packages(cfg.logging.trackers())  # a missing wandb must not cost a DeepSpeed start-up
    return cfg
