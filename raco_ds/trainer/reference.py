"""The reference log-probs: the initial model's scores of the run's pairs, computed once per run folder.

DPO-style losses compare the policy with the frozen initial model.
:func:`initial_reference` scores every pair the run uses (the held-out pairs,
and the training pairs unless the loss is reference-free) with the engine
before its first step, through :func:`raco_ds.trainer.eval.score_pairs`
(spread over the ranks; every rank ends with the full table), and saves them.

``<output_dir>/reference_logps.safetensors`` holds the scores (tensors
``logps`` and ``lengths``). Its metadata holds the key the scores are valid
for (data fingerprint, model identity, pair indices) and the sha256 of the
tensors' bytes. Reading it parses a JSON header and raw tensor bytes, so a
planted file cannot run code; a damaged file (unreadable, or bytes that no
longer match the checksum) is reported and recomputed. A rerun or resumed run
in the same folder reuses it; a resumed run computes it before loading its
checkpoint, so a missing or damaged file is recomputed from the same initial
weights instead of ending the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from raco_ds.data.batch import PreferenceCollator
from raco_ds.data.tokenization import PreferenceDataset
from raco_ds.trainer.config import ConfigError, TrainConfig
from raco_ds.trainer.data import DataSplit
from raco_ds.trainer.eval import PairScores, score_pairs

__all__ = [
    "REFERENCE_FILE",
    "OtherRunReferenceError",
    "initial_reference",
    "load_reference",
    "reference_free",
    "save_reference",
]

logger = logging.getLogger("raco_ds.trainer")

REFERENCE_FILE = "reference_logps.safetensors"
"""The file name inside the run folder."""


class OtherRunReferenceError(ValueError):
    """The file holds scores computed for other data, another model or other pairs."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_reference(path: str | Path, key: dict[str, Any], scores: PairScores) -> None:
    """Write ``scores`` for ``key`` atomically (a temporary file, then one rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"logps": scores.logps.contiguous(), "lengths": scores.lengths.contiguous()}
    metadata = {"key": json.dumps(key, sort_keys=True), "sha256": _checksum(tensors)}
    tmp = path.with_name(".tmp-" + path.name)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_reference(path: str | Path, key: dict[str, Any]) -> PairScores | None:
    """The cached scores for ``key``; None when the file is missing or damaged (logged).

    Raises :class:`OtherRunReferenceError` when the file is intact but holds another key.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in ("logps", "lengths")}
        if metadata.get("sha256") != _checksum(tensors):
            raise ValueError("its tensors do not match the checksum stored with them")
        saved_key = json.loads(metadata["key"])
    except Exception as err:  # noqa: BLE001 - any unreadable file is recomputed, whatever the cause
        logger.warning("%s is damaged (%s); recomputing the reference log-probs", path, str(err)[:200])
        return None
    if saved_key != json.loads(json.dumps(key, sort_keys=True)):
        raise OtherRunReferenceError(f"{path} was computed for other data or another model ({saved_key})")
    return PairScores(tensors["logps"], tensors["lengths"])


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
    from raco_ds.models import model_identity

    path = out / REFERENCE_FILE
    indices = sorted(set(split.eval_indices).union(*([] if reference_free(cfg) else split.train_pools)))
    # Valid for the same tokenised data, the same initial weights and the same pairs (a rerun reuses it).
    key = {"dataset": dataset.fingerprint, "model": model_identity(cfg.model.name_or_path, cfg.model.dtype),
           "indices": indices}  # fmt: skip
    try:
        cached = load_reference(path, key)
    except OtherRunReferenceError as err:
        if resumed:
            raise ConfigError(
                f"{err}; a resumed run must keep --model and the data options of the run it resumes"
            ) from None
        cached = None
    if cached is not None:
        return cached
    started = time.perf_counter()
    with adapters_disabled(engine):  # with LoRA the reference is the base model (the initial one: B = 0)
        scores = score_pairs(engine, dataset, indices, cfg.logging.eval_batch_size, collator)
    logger.info("reference log-probs of %d pairs in %.1fs (the initial model is the reference)",
                len(indices), time.perf_counter() - started)  # fmt: skip
    if rank == 0:
        save_reference(path, key, scores)
    return scores
