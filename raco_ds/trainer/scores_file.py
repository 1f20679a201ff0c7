"""Pair scores on disk: safetensors tensors, the key they are valid for, and a checksum.

The initial model's scores (``reference_logps.safetensors``) and the trained
model's held-out scores (``heldout_logps.safetensors``) live in the run folder,
where anybody may have put a file of that name. Reading one parses a JSON
header and raw tensor bytes, so a planted file cannot run code. A damaged file
(unreadable, or bytes that no longer match the checksum) reads as missing; an
intact file written for another key raises :class:`OtherKeyError`, so the
caller decides whether that is an error or a cache miss.
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

__all__ = ["OtherKeyError", "load_scores", "save_scores"]

logger = logging.getLogger("raco_ds.trainer")


class OtherKeyError(ValueError):
    """The file is intact but holds scores computed for another key (data, model or pairs)."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_scores(path: str | Path, key: dict[str, Any], scores: PairScores) -> None:
    """Write ``scores`` for ``key`` atomically (a temporary file, then one rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"logps": scores.logps.contiguous(), "lengths": scores.lengths.contiguous()}
    metadata = {"key": json.dumps(key, sort_keys=True), "sha256": _checksum(tensors)}
    tmp = path.with_name(".tmp-" + path.name)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_scores(path: str | Path, key: dict[str, Any]) -> PairScores | None:
    """The saved scores for ``key``; None when the file is missing or damaged (logged).

    Raises :class:`OtherKeyError` when the file is intact but holds another key.
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
        logger.warning("%s is damaged (%s); computing its scores again", path, str(err)[:200])
        return None
    if saved_key != json.loads(json.dumps(key, sort_keys=True)):
        raise OtherKeyError(f"{path} was computed for other data, another model or other pairs ({saved_key})")
    return PairScores(tensors["logps"], tensors["lengths"])
