"""Fill a DeepSpeed JSON config's "auto" fields from the trainer config, and check the rest agree.

The rule is Hugging Face's (``HfTrainerDeepSpeedConfig``): a DeepSpeed value
written as ``"auto"`` is filled from the trainer's config; a concrete value must
equal what the trainer would have filled, otherwise the run stops before
DeepSpeed starts with one line per disagreement saying both ways to fix it.
Only one source of truth per number is allowed to win silently: the trainer's.

Batch arithmetic (RACO-specific): ``gradient_accumulation_steps`` counts
micro-batches *per objective* (the hook accumulates each objective separately,
HOOKS.md), so DeepSpeed's ``train_batch_size`` = micro-batch x accumulation x
world size is the number of pairs each objective sees per optimizer step.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from raco_ds.trainer.config import ConfigError, TrainConfig

__all__ = ["DEFAULT_DS_CONFIG", "fill_ds_config", "read_ds_config", "zero_stage"]

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json"
"""The config used when no ``--ds_config`` is given (the README main job's)."""


def read_ds_config(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config as a dict and a name for messages; ``None`` means :data:`DEFAULT_DS_CONFIG`."""
    path = Path(path) if path is not None else DEFAULT_DS_CONFIG
    if not path.is_file():
        raise ConfigError(f"--ds_config {path}: no such file (the repository ships ds_configs/zero{{1,2,3}}.json)")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds_config {path} is not valid JSON: {err}") from None


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage a (filled or raw) DeepSpeed config asks for (0 when absent)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


class _Filler:
    """Walks dotted keys of one DeepSpeed config, filling "auto" and collecting disagreements."""

    def __init__(self, config: dict[str, Any], name: str) -> None:
        self.config, self.name, self.mismatches = config, name, []

    def _node(self, dotted: str) -> tuple[dict[str, Any] | None, str]:
        *parents, leaf = dotted.split(".")
        node: Any = self.config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return None, leaf
        return node, leaf

    def fill(
        self, dotted: str, value: Any, option: str | None = None, must_match: bool = True,
        option_value: dict[Any, str] | None = None, fix: str | None = None,
    ) -> None:  # fmt: skip
        """Replace "auto" at ``dotted`` by ``value``; else record a mismatch against ``option``.

        ``option_value`` maps a DeepSpeed value to the ``--option`` value that produces it
        (bf16.enabled true -> bf16) where the two differ; ``fix`` replaces the suggested
        command-line fix where no option produces the file's value.
        """
        node, leaf = self._node(dotted)
        if node is None or leaf not in node:
            return
        if node[leaf] == "auto":
            node[leaf] = value
        elif must_match and not _same(node[leaf], value):
            spell = (option_value or {}).get
            if fix is None:
                fix = f"pass --{option} {spell(node[leaf], _cli(node[leaf]))}" if option else "remove the key"
            yours = f"--{option}={spell(value, _cli(value))}" if option else f"the trainer's {_cli(value)}"
            self.mismatches.append(
                f"- {self.name}: {dotted}={json.dumps(node[leaf])} but {yours}; "
                f'set it to "auto" in {Path(self.name).name} (then it follows the trainer) or {fix}'
            )

    def remaining_auto(self) -> list[str]:
        """Dotted keys still set to "auto" (no trainer value fills them)."""
        found: list[str] = []

        def walk(node: Any, prefix: str) -> None:
            """Collect "auto" leaves under ``node``."""
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{prefix}{key}.")
            elif node == "auto":
                found.append(prefix.rstrip("."))

        walk(self.config, "")
        return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _cli(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def fill_ds_config(
    raw: dict[str, Any], cfg: TrainConfig, *, world_size: int, hidden_size: int | None, name: str = "ds_config"
) -> dict[str, Any]:
    """A copy of ``raw`` with every "auto" filled from ``cfg``; ConfigError listing all disagreements.

    ``hidden_size`` (the model's) sizes ZeRO's buckets the way HF does; pass
    None before the model is known only if the config has no such "auto" keys.

    Example:
        >>> from raco_ds.trainer.config import TrainConfig
        >>> ds = fill_ds_config({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2},
        ...                     TrainConfig(), world_size=2, hidden_size=8)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        ConfigError: the DeepSpeed config disagrees with the trainer: ...
    """
    opt = cfg.optimisation
    filler = _Filler(copy.deepcopy(raw), name)
    fill = filler.fill
    # Batch arithmetic (per objective; see the module docstring).
    fill("train_micro_batch_size_per_gpu", opt.micro_batch_size, "optimisation.micro_batch_size")
    fill("gradient_accumulation_steps", opt.gradient_accumulation_steps, "optimisation.gradient_accumulation_steps")
    train_batch = opt.micro_batch_size * opt.gradient_accumulation_steps * world_size
    node, _ = filler._node("train_batch_size")
    if (
        node is not None
        and node.get("train_batch_size") not in ("auto", None)
        and node["train_batch_size"] != train_batch
    ):
        filler.mismatches.append(
            f"- {name}: train_batch_size={node['train_batch_size']} but micro_batch_size {opt.micro_batch_size} x "
            f"gradient_accumulation_steps {opt.gradient_accumulation_steps} x world size {world_size} = {train_batch}; "
            f'set it to "auto" or change --optimisation.micro_batch_size / --optimisation.gradient_accumulation_steps'
        )
    else:
        fill("train_batch_size", train_batch)
    # Optimizer, schedule, clipping.
    fill("gradient_clipping", opt.max_grad_norm, "optimisation.max_grad_norm")
    fill("optimizer.params.lr", opt.lr, "optimisation.lr")
    fill("optimizer.params.betas", list(opt.betas), "optimisation.betas")
    fill("optimizer.params.eps", opt.eps, "optimisation.eps")
    fill("optimizer.params.weight_decay", opt.weight_decay, "optimisation.weight_decay")
    # DeepSpeed's warm-up starts at warmup_min_lr and needs >= 1 warm-up step: without warm-up,
    # start at the peak (min = max) instead of spending steps at lr 0.
    fill("scheduler.params.warmup_min_lr", 0.0 if opt.warmup_steps else opt.lr, must_match=False)
    fill("scheduler.params.warmup_max_lr", opt.lr, "optimisation.lr")
    fill("scheduler.params.warmup_num_steps", max(1, opt.warmup_steps), "optimisation.warmup_steps")
    fill("scheduler.params.total_num_steps", opt.max_steps, "optimisation.max_steps")
    # Precision follows the model's dtype.
    fill("bf16.enabled", cfg.model.dtype == "bf16", "model.dtype", option_value={True: "bf16", False: "fp32"})
    fill("fp16.enabled", False, "model.dtype", option_value={False: cfg.model.dtype},
         fix="set it to false (fp16 is refused: its loss scaling would rescale each objective differently; "
             "--model.dtype bf16 gives half precision)")  # fmt: skip
    # ZeRO bucket sizes from the hidden size (HF's rule).
    if hidden_size is not None:
        fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size, must_match=False)
        fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), must_match=False)
        fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, must_match=False)

    if filler.mismatches:
        raise ConfigError("the DeepSpeed config disagrees with the trainer:\n" + "\n".join(filler.mismatches))
    left = filler.remaining_auto()
    if left:
        raise ConfigError(f'{name}: no trainer value fills the "auto" of {left}; write concrete values there')
    return filler.config
