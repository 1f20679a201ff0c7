"""Atomic, verified checkpoints: DeepSpeed's engine state plus the trainer's; resume from the newest intact one.

Layout under ``<output_dir>/checkpoints``::

    step_00000008/              a sealed checkpoint (never renamed into place before it is)
        ds/                     engine.save_checkpoint(tag="ds"): weights, optimizer, scheduler
        trainer_state.json      step, objectives, weights, data position, world size
        rng_rank<r>.pt          each rank's RNG states (tensors and numbers: weights_only-loadable)
        hook_state.pt           RacoHook.state_dict(), when the hook has state (weights_only-loadable)
        COMPLETE                the manifest: size and sha256 of every other file, written last
    latest                      name of the newest sealed checkpoint (a hint; atomically replaced)
    .tmp-step_00000008/         a save in progress (ignored; removed by the next save)

Why this is crash-safe: every rank writes into the ``.tmp-`` folder; then the
ranks hash its files (raco_ds.trainer.integrity), rank 0 writes the manifest
atomically and renames the folder to its final name in one ``os.rename``, then
replaces ``latest``. A crash at any point leaves either the previous checkpoint
as the newest sealed one or the new one sealed, never a half-written folder
under a valid name; a step saved again (a resumed run reaching a step it had
saved before) is moved aside before the new one takes its name and deleted after.

Why resume is safe: :func:`find_resumable` checks the newest sealed checkpoint
against its manifest, and every pickle in it with a safe unpickler, before
anything is loaded; a damaged one is reported by file and the next older one
is tried (or, with ``--resume strict``, the run stops). ``keep_last`` deletes
only checkpoints older than the one just sealed, so the newest verified
checkpoint is never deleted. A disk that fills during a save removes the
partial folder and raises an error naming the path and the space needed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raco_ds.diskspace import disk_full_error, is_disk_full
from raco_ds.trainer.config import ConfigError, TrainConfig
from raco_ds.trainer.integrity import MANIFEST_NAME, build_manifest, find_damage, manifest_bytes, manifest_text

__all__ = [
    "COMPLETE",
    "CheckpointError",
    "TrainerState",
    "VerifiedCheckpoint",
    "check_compatible",
    "find_latest",
    "find_resumable",
    "load_checkpoint",
    "loss_identity",
    "read_trainer_state",
    "resume_point",
    "save_checkpoint",
]

logger = logging.getLogger("raco_ds.trainer")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = MANIFEST_NAME
"""The manifest, written last into a checkpoint folder; a folder without it is never loaded."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed in this run; the message says why and what to do."""


@dataclass(kw_only=True)
class TrainerState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int
    """Optimizer steps completed."""
    objectives: list[str]
    """Objective names, in order (a resume with other objectives or another K is refused)."""
    weights: list[float]
    """User weights at save time (a resume with other weights is allowed, with a warning)."""
    aggregator: str
    """The aggregator at save time (informational)."""
    world_size: int
    """Data-parallel ranks at save time (ZeRO partitions are per rank)."""
    data_position: dict[str, Any]
    """The data streams' positions (epoch and cursor per stream)."""
    tokens_seen: int = 0
    """Training tokens processed so far (all ranks)."""
    loss: dict[str, Any] | None = None
    """The loss at save time (:func:`loss_identity`); a resume with another loss is refused (None: a
    checkpoint written before this field existed, not checked)."""

    def to_json(self) -> str:
        """JSON text of the state."""
        return json.dumps(self.__dict__, indent=2)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not dist.is_initialized():
        return flag
    on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    value = torch.tensor([1.0 if flag else 0.0], device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _rng_state() -> dict[str, Any]:
    # Only tensors, numbers and tuples: loadable with torch.load(weights_only=True).
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_tensors(path: Path) -> Any:
    """A trainer-written ``.pt`` file, unpickled by the safe (weights_only) unpickler."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unsafe or broken file is refused whatever the cause
        raise CheckpointError(f"{path} cannot be loaded safely ({str(err).splitlines()[0][:200]})") from None


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every filesystem allows opening a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sealed_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest(root: str | Path) -> Path | None:
    """The newest sealed checkpoint folder under ``root`` (``<output_dir>/checkpoints``), or None.

    Sealed is not verified: resume goes through :func:`find_resumable`.
    """
    sealed = _sealed_steps(Path(root))
    return sealed[-1][1] if sealed else None


def _estimated_bytes(engine, root: Path) -> int:
    """About how much one checkpoint of this run needs: the newest sealed one, else fp32 weights + Adam."""
    for _, folder in reversed(_sealed_steps(root)):
        size = manifest_bytes(folder)
        if size:
            return size
    params = {id(p): p for p in engine.module.parameters()}.values()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
    return 16 * trainable  # fp32 weights, fp32 master copy and Adam's two moments


def _write_parts(engine, tmp: Path, state: TrainerState, hook, rank: int) -> None:
    """Every rank's files of one checkpoint, into the temporary folder."""
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        _write_atomic(tmp / "trainer_state.json", state.to_json())
        if hook is not None and hasattr(hook, "state_dict"):
            torch.save(hook.state_dict(), tmp / "hook_state.pt")


def _prune(root: Path, newest: int, keep_last: int) -> None:
    """Delete sealed checkpoints older than step ``newest`` beyond the ``keep_last`` newest.

    Checkpoints of later steps are left alone: they are what a resume fell back from
    (damaged), and this run replaces them when it reaches their step.
    """
    older = [folder for step, folder in _sealed_steps(root) if step < newest]
    for folder in older[: max(0, len(older) - (keep_last - 1))]:
        # Renamed first, so that a crash mid-delete never leaves half a folder under a valid name.
        aside = root / f".old-{folder.name}"
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(engine, root: str | Path, state: TrainerState, hook=None, keep_last: int = 0) -> Path:
    """Save engine + trainer state as ``root/step_<step>`` atomically, sealed by a manifest (collective).

    Raises :class:`raco_ds.diskspace.DiskFullError` (naming the folder and the space needed)
    when the disk fills during the save; the partial folder is removed and the previous
    checkpoints are untouched.
    """
    root = Path(root)
    name = f"step_{state.step:08d}"
    final, tmp, aside = root / name, root / f".tmp-{name}", root / f".old-{name}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a crashed earlier attempt at this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    # 1. Every rank writes its part into the temporary folder; a failure anywhere stops all.
    failure: BaseException | None = None
    try:
        _write_parts(engine, tmp, state, hook, rank)
    except Exception as err:  # noqa: BLE001 - re-raised below, after every rank knows
        failure = err
    if _any_rank(failure is not None):
        needed = _estimated_bytes(engine, root)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if failure is None:
            raise CheckpointError(f"another rank failed to write checkpoint {tmp}; see its error above")
        if is_disk_full(failure, root, needed):
            raise disk_full_error(root, needed, f"checkpoint {tmp.name}", then="rerun with --resume") from failure
        raise failure

    # 2. Seal: the manifest (hashed by all ranks), written atomically, then one rename and `latest`.
    manifest = build_manifest(tmp)
    if rank == 0:
        _write_atomic(tmp / COMPLETE, manifest_text({"step": state.step, **manifest}))
        if final.exists():  # re-saving a step: keep the old one until the new one has its name
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", name + "\n")
        if keep_last > 0:
            _prune(root, state.step, keep_last)
        for stale in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def read_trainer_state(folder: str | Path) -> TrainerState:
    """The :class:`TrainerState` stored in a checkpoint folder."""
    return TrainerState(**json.loads((Path(folder) / "trainer_state.json").read_text()))


def loss_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The loss a run optimises (name, beta and options), as stored in its checkpoints."""
    return json.loads(json.dumps({"name": cfg.loss.name, "beta": cfg.loss.beta, "options": dict(cfg.loss.options)}))


def check_compatible(
    state: TrainerState,
    folder: Path,
    objectives: list[str],
    world_size: int,
    weights: list[float] | None = None,
    aggregator: str | None = None,
    loss: dict[str, Any] | None = None,
) -> list[str]:
    """Raise CheckpointError if this run cannot continue ``state``; return warnings for tolerable differences."""
    if list(state.objectives) != list(objectives):
        raise CheckpointError(
            f"cannot resume from {folder}: it was trained with K={len(state.objectives)} objectives "
            f"{state.objectives}, this run has K={len(objectives)} {list(objectives)}. Resume with "
            f"--objectives {','.join(state.objectives)}, or pass a new --output-dir to start a fresh run."
        )
    if state.world_size != world_size:
        raise CheckpointError(
            f"cannot resume from {folder}: it was saved by {state.world_size} ranks and this run has {world_size}; "
            f"ZeRO partitions are per rank. Relaunch with {state.world_size} ranks (--num_gpus {state.world_size}), "
            "or convert it with DeepSpeed's zero_to_fp32.py and start a new run from the weights."
        )
    if loss is not None and state.loss is not None and state.loss != loss:
        saved = state.loss
        raise CheckpointError(
            f"cannot resume from {folder}: it was trained with loss {saved['name']} (beta {saved['beta']}, options "
            f"{saved['options']}) and this run has {loss['name']} (beta {loss['beta']}, options {loss['options']}); "
            f"a resumed run keeps its loss. Resume with --loss {saved['name']} --loss.beta {saved['beta']} and the "
            "same --loss.options, or pass a new --output-dir to start a fresh run."
        )
    notes = []
    if weights is not None and [round(w, 12) for w in state.weights] != [round(w, 12) for w in weights]:
        notes.append(f"resuming with weights {weights} (the checkpoint was trained with {state.weights})")
    if aggregator is not None and state.aggregator != aggregator:
        notes.append(f"resuming with aggregator {aggregator!r} (the checkpoint was trained with {state.aggregator!r})")
    return notes


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint folder whose files matched its manifest and whose pickles passed the safe unpickler."""

    folder: Path
    """The checkpoint folder (``.../checkpoints/step_<step>``)."""
    state: TrainerState
    """Its trainer state (read after the verification)."""
    damaged: tuple[str, ...] = ()
    """One line per damaged file of the newer checkpoints that were passed over."""


def _damage_summary(folder: Path, damage: list[str]) -> str:
    more = f" (and {len(damage) - 1} more damaged files)" if len(damage) > 1 else ""
    return f"checkpoint {folder} is damaged: {damage[0]}{more}"


def find_resumable(root: str | Path, strict: bool = False) -> VerifiedCheckpoint | None:
    """The newest sealed checkpoint under ``root`` that verifies, or None when there is none at all (collective).

    Damaged newer checkpoints are passed over (listed in ``damaged``). Raises
    :class:`CheckpointError` naming the damaged file when every checkpoint is damaged,
    or when ``strict`` and the newest one is.
    """
    root = Path(root)
    damaged: list[str] = []
    sealed = _sealed_steps(root)
    for _, folder in reversed(sealed):
        damage = find_damage(folder)
        if not damage:
            if strict and damaged:
                raise CheckpointError(
                    f"--resume strict: {damaged[0]}. Rerun with --resume to continue from the newest intact "
                    f"checkpoint {folder.name}, or restore the damaged file"
                )
            return VerifiedCheckpoint(folder, read_trainer_state(folder), tuple(damaged))
        damaged.append(_damage_summary(folder, damage))
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint to resume in {root}: {damaged[0]}"
            + (f" ({len(damaged) - 1} older checkpoints are damaged too)" if len(damaged) > 1 else "")
            + ". Restore the damaged file, or start a new run with another --output-dir"
        )
    return None


def load_checkpoint(engine, checkpoint: VerifiedCheckpoint, objectives: list[str], hook=None) -> TrainerState:
    """Restore engine, RNG and hook state from a verified checkpoint (collective).

    Call :func:`check_compatible` first for the user-facing refusal; it is repeated here
    so that no caller can load an incompatible checkpoint by accident.
    """
    folder, state = checkpoint.folder, checkpoint.state
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_compatible(state, folder, objectives, world)
    load_path, _ = engine.load_checkpoint(
        str(folder), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {folder / 'ds'}; the folder may be damaged")
    _set_rng_state(_load_tensors(folder / f"rng_rank{_rank()}.pt"))
    hook_file = folder / "hook_state.pt"
    if hook is not None and hook_file.is_file() and hasattr(hook, "load_state_dict"):
        hook.load_state_dict(_load_tensors(hook_file))
    return state


def resume_point(cfg: TrainConfig, root: Path, world: int) -> VerifiedCheckpoint | None:
    """The verified checkpoint under ``root`` that this run continues from, or None (collective).

    Called before minutes of model loading, so that a run that cannot continue is
    refused at once: checkpoints without ``--resume``, or an incompatible one. It
    is the newest intact checkpoint, passing over damaged ones (``--resume strict``
    stops instead).
    """
    if find_latest(root) is None:
        return None
    if not cfg.checkpointing.resume:
        raise ConfigError(
            f"{root.parent} already holds checkpoints; pass --resume to continue that run, or a new --output-dir"
        )
    latest = find_resumable(root, strict=cfg.checkpointing.resume == "strict")
    for damage in latest.damaged:
        logger.warning("%s; resuming from the newest intact checkpoint %s", damage, latest.folder.name)
    names, weights = list(cfg.objectives.names), cfg.objectives.weights
    for note in check_compatible(latest.state, latest.folder, names, world, weights, cfg.raco.aggregator,
                                 loss_identity(cfg)):  # fmt: skip
        logger.warning(note)
    return latest
