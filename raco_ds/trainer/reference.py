"""The reference log-probs: the initial model's scores of the run's pairs, computed once per run folder.

DPO-style losses compare the policy with the frozen initial model.
:func:`initial_reference` scores every pair the run uses (the held-out pairs,
and the training pairs unless the loss is reference-free) with the engine
before its first step, through :func:`raco_ds.trainer.eval.score_pairs`
(spread over the ranks; every rank ends with the full table), and saves them.

``<output_dir>/reference_logps.safetensors`` holds the scores with the key
they are valid for (:func:`reference_key`: data fingerprint, model identity,
pair indices), written and read by :mod:`raco_ds.trainer.scores_file` (no
pickle; a damaged file is reported and recomputed). A rerun or resumed run in
the same folder reuses it, and so does the held-out evaluator
(:mod:`raco_ds.pareto.evaluate`); a resumed run computes it before loading its
checkpoint, so a missing or damaged file is recomputed from the same initial
weights instead of ending the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from raco_ds.data.batch import PreferenceCollator
from raco_ds.data.tokenization import PreferenceDataset
from raco_ds.trainer.config import ConfigError, TrainConfig
from raco_ds.trainer.data import DataSplit
from raco_ds.trainer.eval import PairScores, score_pairs
from raco_ds.trainer.scores_file import OtherKeyError, load_scores, save_scores

__all__ = ["REFERENCE_FILE", "initial_reference", "reference_free", "reference_key", "saved_reference"]

logger = logging.getLogger("raco_ds.trainer")

REFERENCE_FILE = "reference_logps.safetensors"
"""The file name inside the run folder."""


def reference_key(dataset: PreferenceDataset, split: DataSplit, cfg: TrainConfig) -> dict[str, Any]:
    """What the run's reference scores are valid for: the tokenised data, the initial weights and the
    scored pairs (the held-out pairs, and the training pairs unless the loss is reference-free)."""
    from raco_ds.models import model_identity

    indices = sorted(set(split.eval_indices).union(*([] if reference_free(cfg) else split.train_pools)))
    return {"dataset": dataset.fingerprint, "model": model_identity(cfg.model.name_or_path, cfg.model.dtype),
            "indices": indices}  # fmt: skip


def saved_reference(run_dir: str | Path, dataset: PreferenceDataset, split: DataSplit, cfg: TrainConfig) -> PairScores | None:
    """The reference scores a run saved in ``run_dir``, if they are valid for this data, split and model."""
    try:
        return load_scores(Path(run_dir) / REFERENCE_FILE, reference_key(dataset, split, cfg))
    except OtherKeyError:
        return None


def reference_free(cfg: TrainConfig) -> bool:
    """True when the configured loss needs no reference model (SimPO)."""
    from raco_ds.losses import get_loss

    return get_loss(cfg.loss.name).reference_free


def initial_reference(
    engine: Any,
    dataset: PreferenceDataset,
    collator: PreferenceCollator,
    split: DataSplit,
    cfg: TrainConfig,
    out: Path,
    *,
    rank: int,
    resumed: bool,
) -> PairScores:
    """The initial model's scores of every pair the run uses, from ``<out>/REFERENCE_FILE`` or computed and saved.

    Collective: every rank calls it while ``engine`` still holds the initial
    weights. ``resumed``: a file for other data or another model stops a
    resumed run (which must keep them) and is recomputed otherwise.
    """
    from raco_ds.lora import adapters_disabled

    path = out / REFERENCE_FILE
    key = reference_key(dataset, split, cfg)
    try:
        cached = load_scores(path, key)
    except OtherKeyError as err:
        if resumed:
            raise ConfigError(
                f"{err}; a resumed run must keep --model and the data options of the run it resumes"
            ) from None
        cached = None
    if cached is not None:
        return cached
    started = time.perf_counter()
    with adapters_disabled(engine):  # with LoRA the reference is the base model (the initial one: B = 0)
        scores = score_pairs(engine, dataset, key["indices"], cfg.logging.eval_batch_size, collator)
    logger.info("reference log-probs of %d pairs in %.1fs (the initial model is the reference)",
                len(key["indices"]), time.perf_counter() - started)  # fmt: skip
    if rank == 0:
        save_scores(path, key, scores)
    return scores
