"""The run folder's reference log-probs file: safetensors with its key and checksum, never a pickle.

``<output_dir>/reference_logps.safetensors`` holds the initial model's scores
of the run's pairs (tensors ``logps`` and ``lengths``). Its metadata holds the
key the scores are valid for (data fingerprint, model identity, pair indices)
and the sha256 of the tensors' bytes. Reading it parses a JSON header and raw
tensor bytes, so a planted file cannot run code; a damaged file (unreadable,
or bytes that no longer match the checksum) is reported and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from raco_ds.trainer.eval import PairScores

__all__ = ["REFERENCE_FILE", "OtherRunReferenceError", "load_reference", "save_reference"]

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
