"""Atomic checkpoints: DeepSpeed's engine state plus the trainer's, and resume from the latest.

Layout under ``<output_dir>/checkpoints``::

    step_00000008/              a complete checkpoint (never renamed into place before it is)
        ds/                     engine.save_checkpoint(tag="ds"): weights, optimizer, scheduler
        trainer_state.json      step, objectives, weights, data position, world size
        rng_rank<r>.pt          each rank's RNG states (python, numpy, torch, cuda)
        hook_state.pt           RacoHook.state_dict(), when the hook has state
        COMPLETE                written last; a folder without it is never loaded
    latest                      name of the newest complete checkpoint (atomically replaced)
    .tmp-step_00000008/         a save in progress (ignored; removed by the next save)

Why this is crash-safe: every rank writes into the ``.tmp-`` folder; after a
barrier rank 0 writes ``COMPLETE`` and renames the folder to its final name in
one ``os.rename``, then replaces ``latest``. A crash at any point leaves either
the previous checkpoint as the latest complete one or the new one complete, never
a half-written folder under a valid name. Resume trusts only folders with
``COMPLETE`` (``latest`` is a hint, checked too).
"""

from __future__ import annotations

import json
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

__all__ = [
    "CheckpointError",
    "TrainerState",
    "check_compatible",
    "find_latest",
    "load_checkpoint",
    "read_trainer_state",
    "save_checkpoint",
]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
"""Marker file written last into a checkpoint folder."""


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

    def to_json(self) -> str:
        """JSON text of the state."""
        return json.dumps(self.__dict__, indent=2)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``<output_dir>/checkpoints``), or None."""
    root = Path(root)
    complete = _complete_steps(root)
    hint = root / "latest"
    if hint.is_file():
        named = root / hint.read_text().strip()
        # `latest` is replaced after the rename, so it can only lag; trust the newest complete folder.
        if (named / COMPLETE).is_file() and (not complete or complete[-1][1] == named):
            return named
    return complete[-1][1] if complete else None


def save_checkpoint(engine, root: str | Path, state: TrainerState, hook=None, keep_last: int = 0) -> Path:
    """Save engine + trainer state as ``root/step_<step>`` atomically (collective: call on every rank)."""
    root = Path(root)
    name = f"step_{state.step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a crashed earlier attempt at this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    # 1. Every rank writes its part into the temporary folder.
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        _write_atomic(tmp / "trainer_state.json", state.to_json())
        if hook is not None and hasattr(hook, "state_dict"):
            torch.save(hook.state_dict(), tmp / "hook_state.pt")
    _barrier()

    # 2. Rank 0 seals it: COMPLETE, one rename, then the `latest` hint; then prunes old ones.
    if rank == 0:
        _write_atomic(tmp / COMPLETE, json.dumps({"step": state.step, "objectives": state.objectives}) + "\n")
        if final.exists():  # re-saving a step (e.g. a resumed run ending where it started)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", name + "\n")
        if keep_last > 0:
            for _, old in _complete_steps(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def read_trainer_state(folder: str | Path) -> TrainerState:
    """The :class:`TrainerState` stored in a checkpoint folder."""
    return TrainerState(**json.loads((Path(folder) / "trainer_state.json").read_text()))


def check_compatible(
    state: TrainerState,
    folder: Path,
    objectives: list[str],
    world_size: int,
    weights: list[float] | None = None,
    aggregator: str | None = None,
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
    notes = []
    if weights is not None and [round(w, 12) for w in state.weights] != [round(w, 12) for w in weights]:
        notes.append(f"resuming with weights {weights} (the checkpoint was trained with {state.weights})")
    if aggregator is not None and state.aggregator != aggregator:
        notes.append(f"resuming with aggregator {aggregator!r} (the checkpoint was trained with {state.aggregator!r})")
    return notes


def load_checkpoint(engine, folder: str | Path, objectives: list[str], hook=None) -> TrainerState:
    """Restore engine, RNG and hook state from a complete checkpoint folder (collective).

    Call :func:`check_compatible` first for the user-facing refusal; it is repeated here
    so that no caller can load an incompatible checkpoint by accident.
    """
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {COMPLETE} marker); it cannot be resumed")
    state = read_trainer_state(folder)
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_compatible(state, folder, objectives, world)
    load_path, _ = engine.load_checkpoint(
        str(folder), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {folder / 'ds'}; the folder may be damaged")
    rng_file = folder / f"rng_rank{_rank()}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False))
    hook_file = folder / "hook_state.pt"
    if hook is not None and hook_file.is_file() and hasattr(hook, "load_state_dict"):
        hook.load_state_dict(torch.load(hook_file, weights_only=False))
    return state
