"""What is checked before anything in a checkpoint folder is loaded: its manifest and its pickles.

The manifest (the checkpoint's ``COMPLETE`` file, written last and atomically)
records the size and sha256 of every other file in the folder, and the sha256
of its own content, so a damaged manifest is told apart from a damaged file. At resume each
file is checked against it, so a truncated, zeroed, bit-flipped or swapped file
is reported by its path before DeepSpeed reads a byte of it.

DeepSpeed unpickles its own files with ``weights_only=False``. So that not
even a file that matches its manifest (an attacker can rewrite both) can run
code there, every ``.pt`` file is also unpickled once with PyTorch's
``weights_only`` unpickler, which refuses any global outside an allowlist; the
allowlist adds only the plain data classes DeepSpeed itself writes
(:data:`DEEPSPEED_DATA_CLASSES`). Tensor storage is memory-mapped, so this
costs a parse of the small pickle, not a second read of the weights.
torch.distributed.checkpoint (Megatron's checkpoints) unpickles two things
without an allowlist: its ``.metadata`` file, parsed here first by an
unpickler that accepts only the metadata classes PyTorch writes there
(:data:`DCP_METADATA_GLOBALS`) and torch dtypes, and the non-tensor items
inside its ``.distcp`` files, which that metadata locates and which must pass
the same ``weights_only`` unpickler as a ``.pt`` file.

Both checks are collective when torch.distributed is initialised: rank r
checks every world-th file, and the findings are gathered on every rank so
that all ranks take the same decision.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DCP_METADATA_GLOBALS",
    "DEEPSPEED_DATA_CLASSES",
    "MANIFEST_NAME",
    "build_manifest",
    "find_damage",
    "manifest_bytes",
    "manifest_text",
]

MANIFEST_NAME = "COMPLETE"
"""The manifest's file name: its presence means the checkpoint was sealed."""

DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Classes DeepSpeed 0.19 pickles into its checkpoints (ZeRO 1-3, with and without offload), all
plain data whose unpickling runs no code of the file's choosing."""

DCP_METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
    )),
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "TensorWriteData", "WriteItem", "WriteItemType",
    )),
})  # fmt: skip
"""The globals (besides torch dtypes) that torch 2.13's checkpoint ``.metadata`` pickles name, as
found in Megatron-core 0.16 and ``dcp.save`` checkpoints: plain data classes, enums, a path and a
layout lookup."""

_BLOCK = 1 << 22


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered(mine: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [item for part in everyone for item in part]


def build_manifest(folder: Path) -> dict[str, Any]:
    """Size and sha256 of every file under ``folder`` (collective; identical on every rank)."""
    rank, world = _world()
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    mine = [(name, (folder / name).stat().st_size, _sha256(folder / name)) for name in names[rank::world]]
    files = {name: {"size": size, "sha256": digest} for name, size, digest in _gathered(mine)}
    return {"format": 1, "files": dict(sorted(files.items()))}


def _content_sha256(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest file's text: ``manifest`` plus the sha256 of its own content."""
    return json.dumps({**manifest, "manifest_sha256": _content_sha256(manifest)}, indent=1) + "\n"


def manifest_bytes(folder: Path) -> int:
    """Total size of the files a sealed checkpoint's manifest lists (0 when unreadable)."""
    try:
        return sum(entry["size"] for entry in _read(folder)["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _read(folder: Path) -> dict[str, Any]:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("it is not a manifest (no 'files' mapping)")
    if manifest.pop("manifest_sha256", None) != _content_sha256(manifest):
        raise ValueError("its content does not match its own checksum")
    return manifest


def _allowed_classes() -> list[type]:
    classes = []
    for dotted in DEEPSPEED_DATA_CLASSES:
        module, _, name = dotted.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: it cannot have written it
            pass
    return classes


def _unpickling_refusal(source: Path | io.BytesIO) -> str | None:
    """None when ``source`` (a file, or an item read from one) unpickles under the weights_only rules
    (+ DeepSpeed's data classes), else why not."""
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(source, Path))
    except Exception as err:  # noqa: BLE001 - any failure means "do not hand this file to an unpickler"
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return next((line for line in lines if "Unsupported global" in line), lines[0]).strip()[:200]
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def _metadata_refusal(path: Path) -> str | None:
    """None when a checkpoint ``.metadata`` pickle names only :data:`DCP_METADATA_GLOBALS` and dtypes,
    and every non-tensor item it locates passes :func:`_unpickling_refusal`; else why not."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        for index, where in metadata.storage_data.items():
            if not isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
                continue  # tensors: PyTorch reads them with weights_only=True itself
            if where.transform_descriptors:
                return f"item {index.fqn} is stored transformed ({where.transform_descriptors})"
            with open(path.parent / where.relative_path, "rb") as handle:
                handle.seek(where.offset)
                refused = _unpickling_refusal(io.BytesIO(handle.read(where.length)))
            if refused:
                return f"item {index.fqn} in {where.relative_path}: {refused}"
    except Exception as err:  # noqa: BLE001 - any failure means "do not hand this file to an unpickler"
        return str(err).strip()[:240] or type(err).__name__
    return None


def _check_file(folder: Path, name: str, entry: Any) -> str | None:
    path = folder / name
    try:
        size, digest = int(entry["size"]), str(entry["sha256"])
    except (KeyError, TypeError, ValueError):
        return f"{folder / MANIFEST_NAME}: the entry of {name} has no size/sha256"
    try:
        if not path.is_file():
            return f"{path}: missing (the manifest lists it)"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
        if _sha256(path) != digest:
            return f"{path}: its sha256 does not match the manifest (the bytes changed after the save)"
    except OSError as err:
        return f"{path}: unreadable ({err.strerror})"
    refused = None
    if path.suffix == ".pt":
        refused = _unpickling_refusal(path)
    elif path.name == ".metadata":
        refused = _metadata_refusal(path)
    return f"{path}: refused by the safe unpickler ({refused})" if refused else None


def find_damage(folder: str | Path) -> list[str]:
    """One line per damaged file of a sealed checkpoint (its path and what is wrong); [] when intact.

    Collective when torch.distributed is initialised; every rank gets the same list.
    """
    folder = Path(folder)
    rank, world = _world()
    try:
        files = _read(folder)["files"]
        mine = [p for name in sorted(files)[rank::world] if (p := _check_file(folder, name, files[name]))]
    except (OSError, ValueError) as err:
        # Every rank reads the same manifest and lands here; one report is enough.
        mine = [f"{folder / MANIFEST_NAME}: unreadable manifest ({err})"] if rank == 0 else []
    return sorted(_gathered(mine))
