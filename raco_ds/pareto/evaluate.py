"""Held-out evaluation of a saved model against its initial model (used by sweeps and launchers/eval.py).

The scoring and the per-objective metrics are the trainer's own (:mod:`raco_ds.trainer.eval`:
``score_pairs`` and ``evaluate``, the training loss's definitions); this module only loads a
saved HF folder outside DeepSpeed, rebuilds the run's held-out split, and adds two views the
sweep reports:

``kl_proxy/<objective>``
    Mean policy/reference log-ratio ``log pi(y|x) - log ref(y|x)`` (summed over the response
    tokens) on the response objective k prefers, over its held-out non-tie pairs: a sample
    estimate of how far the policy moved from the reference on preferred data (a KL proxy;
    it is not the KL under the policy's own samples).
``accuracy_conflict/<objective>``, ``margin_conflict/<objective>``
    The same metrics on the held-out pairs where the objectives disagree (shared pairs only):
    the only pairs on which a trade-off between objectives can show.

Every metric is reported flat as ``"<metric>/<objective>"``.

The held-out split is the trainer's (:func:`raco_ds.trainer.data.split_pairs`): the first
``data.num_eval_pairs`` pairs of a permutation seeded by ``optimisation.seed``. The reference is
the run's initial model (``model.name_or_path`` of its config); its scores are computed once per
(model, data, split) and shared by every point of a sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["EvalReport", "HeldOutEvaluator", "format_report", "resolve_run"]

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """Per-objective held-out metrics of one model."""

    objectives: list[str]
    """Objective names, in label order."""
    metrics: dict[str, list[float]]
    """Metric name -> one value per objective (see the module docstring and raco_ds.trainer.eval)."""
    model: str = ""
    """The evaluated model folder."""
    reference: str = ""
    """The reference (initial) model."""
    num_eval_pairs: int = 0
    """Held-out pairs scored."""
    num_conflict_pairs: int = 0
    """Held-out pairs on which the objectives disagree (shared pairs)."""

    def flat(self) -> dict[str, float]:
        """``{"<metric>/<objective>": value}``, what sweeps store."""
        return {f"{m}/{name}": float(v) for m, values in self.metrics.items() for name, v in zip(self.objectives, values)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the file launchers/eval.py writes)."""
        return {
            "model": self.model,
            "reference": self.reference,
            "objectives": self.objectives,
            "num_eval_pairs": self.num_eval_pairs,
            "num_conflict_pairs": self.num_conflict_pairs,
            "metrics": self.metrics,
        }


def format_report(report: EvalReport) -> str:
    """A small fixed-width table: one row per metric, one column per objective."""
    width = max(12, *(len(n) + 2 for n in report.objectives))
    lines = [f"{'metric':<22}" + "".join(f"{n:>{width}}" for n in report.objectives)]
    for metric, values in report.metrics.items():
        lines.append(f"{metric:<22}" + "".join(f"{v:>{width}.4f}" for v in values))
    return "\n".join(lines)


def resolve_run(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, the run's config.yaml or None) for a run folder or its ``export/`` folder.

    A run folder (with ``config.yaml`` and ``export/``) evaluates its exported model; an export
    folder inside a run folder finds the run's config beside it; any other HF folder has none.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such folder; pass a run folder or an exported HF model folder")
    if (path / "config.yaml").is_file() and (path / "export").is_dir():
        return path / "export", path / "config.yaml"
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is a run folder without export/; train with --checkpointing.export true, or pass a model folder"
        )
    if (path.parent / "config.yaml").is_file():
        return path, path.parent / "config.yaml"
    return path, None


class _PlainEngine:
    """The few engine attributes raco_ds.trainer.eval.score_pairs uses, over a plain HF model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model
        self.device = next(model.parameters()).device

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def eval(self) -> None:
        self.module.eval()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def empty_partition_cache(self) -> None:
        """Nothing is partitioned outside ZeRO-3."""


@dataclass
class _Split:
    dataset: Any
    indices: list[int]
    conflict: list[int]
    collator: Any
    reference: Any  # PairScores of the initial model


class HeldOutEvaluator:
    """Evaluate saved models on their run's held-out pairs; the reference is scored once and cached.

    Call it as a sweep evaluator (``evaluator(point, train_dir)``) or use :meth:`evaluate`.
    """

    def __init__(self, batch_size: int | None = None, device: str | None = None) -> None:
        """``batch_size``: pairs per forward (None: the run's logging.eval_batch_size);
        ``device``: where models run (None: cuda when available, else cpu)."""
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._splits: dict[str, _Split] = {}
        self._models: dict[str, tuple[Any, Any]] = {}  # reference name -> (model, tokenizer)

    def __call__(self, point: Any, train_dir: Path) -> dict[str, float]:
        """Sweep evaluator: the flat metrics of ``train_dir``'s exported model."""
        return self.evaluate(train_dir).flat()

    def evaluate(self, model_path: str | Path, cfg: Any | None = None, reference: str | None = None) -> EvalReport:
        """Evaluate a run folder or model folder.

        Args:
            model_path: a run folder (its ``export/`` is evaluated) or an HF model folder.
            cfg: the :class:`~raco_ds.trainer.config.TrainConfig` giving the data, split, loss and
                reference; None: the run's saved ``config.yaml`` (required then).
            reference: override the reference model (default: ``cfg.model.name_or_path``).
        """
        from raco_ds.models import load_model
        from raco_ds.trainer.config import load_config
        from raco_ds.trainer.eval import evaluate, score_pairs

        model_dir, config_path = resolve_run(model_path)
        if cfg is None:
            if config_path is None:
                raise ValueError(
                    f"{model_dir} has no run config.yaml beside it; pass the config that says which data, split and "
                    "reference to use (launchers/eval.py: --config RUN/config.yaml or --preset/--data options)"
                )
            cfg = load_config(config_path)
        reference = reference or cfg.model.name_or_path
        split = self._split(cfg, reference)
        batch_size = self.batch_size or cfg.logging.eval_batch_size

        policy = load_model(str(model_dir), dtype=cfg.model.dtype).to(self.device)
        engine = _PlainEngine(policy)
        scores = score_pairs(engine, split.dataset, split.indices, batch_size, split.collator)
        loss_args = {"loss": cfg.loss.name, "beta": cfg.loss.beta, "options": dict(cfg.loss.options)}
        metrics = evaluate(scores, split.reference, split.dataset, split.indices, **loss_args)
        # KL proxy: the chosen response's log-ratio, i.e. DPO's chosen reward at beta = 1.
        metrics["kl_proxy"] = evaluate(scores, split.reference, split.dataset, split.indices, loss="dpo", beta=1.0)[
            "chosen_reward"
        ]
        if split.conflict:
            conflict = evaluate(scores, split.reference, split.dataset, split.conflict, **loss_args)
            metrics["accuracy_conflict"] = conflict["accuracy"]
            metrics["margin_conflict"] = conflict["margin"]
        del policy, engine
        return EvalReport(
            objectives=list(split.dataset.objective_names),
            metrics={k: [float(x) for x in v] for k, v in metrics.items()},
            model=str(model_dir),
            reference=reference,
            num_eval_pairs=len(split.indices),
            num_conflict_pairs=len(split.conflict),
        )

    def _split(self, cfg: Any, reference: str) -> _Split:
        """The held-out pairs of ``cfg`` tokenised for ``reference``, with the reference's scores (cached)."""
        from raco_ds.models import load_model, load_tokenizer
        from raco_ds.trainer.eval import score_pairs

        key = hashlib.sha256(json.dumps({
            "reference": reference, "dtype": cfg.model.dtype, "data": vars(cfg.data),
            "seed": cfg.optimisation.seed, "objectives": cfg.objectives.names,
        }, sort_keys=True, default=str).encode()).hexdigest()
        if key in self._splits:
            return self._splits[key]
        tokenizer = load_tokenizer(reference)
        dataset, collator, indices = _held_out_data(cfg, tokenizer)
        conflict = _conflict_pairs(dataset, indices)
        model = load_model(reference, dtype=cfg.model.dtype).to(self.device)
        scores = score_pairs(_PlainEngine(model), dataset, indices, self.batch_size or cfg.logging.eval_batch_size, collator)
        del model
        logger.info("held-out split: %d pairs (%d with conflicting labels); reference %s scored",
                    len(indices), len(conflict), reference)
        self._splits[key] = _Split(dataset, indices, conflict, collator, scores)
        return self._splits[key]


def _held_out_data(cfg: Any, tokenizer: Any) -> tuple[Any, Any, list[int]]:
    """The run's tokenised dataset, collator and held-out indices, by the trainer's own code (rank 0 of 1)."""
    from raco_ds.trainer.loop import build_data

    dataset, collator, split, _streams = build_data(cfg, tokenizer, 0, 1)
    return dataset, collator, split.eval_indices


def _conflict_pairs(dataset: Any, indices: list[int]) -> list[int]:
    """Held-out shared pairs on which two objectives give opposite non-tie labels."""
    if not dataset.shared:
        return []
    out = []
    for i in indices:
        labels = [x for x in dataset[i].labels if x != 0]
        if len(set(labels)) > 1:
            out.append(i)
    return out
