"""Reference-model log-probs: precomputed once and cached, or a frozen reference scoring on the fly.

DPO-style losses compare the policy with the frozen initial model. The
default path computes ``log ref(y|x)`` for every pair once, before training:

* spread across ranks: rank r scores pairs ``r, r + W, r + 2W, ...``; every
  rank runs the same number of forwards (short shares are padded with a
  repeated pair whose result is discarded), which a ZeRO-3 model, whose
  forward gathers parameters collectively, requires; the shares are then
  all-gathered so every rank holds the full (N, 2) table;
* cached on disk under ``<cache root>/reference/<key>.pt``, where the key
  hashes the model identity (:func:`raco_ds.models.model_identity`) and the
  tokenised dataset's fingerprint (data files and their content hash, the
  spec, the tokenisation settings, the tokenizer and every token id);
  written atomically by each node's local rank 0; whether to load or compute
  is agreed by all ranks (a MIN all-reduce), so a partially visible cache
  cannot split them.

:class:`FrozenReference` instead scores each batch with a frozen model (or a
DeepSpeed ZeRO-3 inference engine from :func:`build_reference_engine`) when
the table is not wanted. Reference-free losses (SimPO) need neither.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.collectives import collective_device
from raco_ds.data.batch import PreferenceBatch, PreferenceCollator
from raco_ds.data.tokenization import PreferenceDataset
from raco_ds.diskcache import atomic_file, cache_root

__all__ = [
    "FrozenReference",
    "build_reference_engine",
    "compute_reference_logps",
    "precompute_reference_logps",
    "reference_cache_key",
    "reference_logps_of_batch",
]

logger = logging.getLogger(__name__)

# Bump when the table's meaning changes (e.g. how log-probs are summed).
_FORMAT_VERSION = 1


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def reference_logps_of_batch(model: Any, batch: PreferenceBatch) -> torch.Tensor:
    """(2B,) float32 summed response log-probs of every row of ``batch`` under ``model`` (no grad)."""
    batch = batch.to(_model_device(model))
    return batch.response_logps(model(**batch.model_inputs(), use_cache=False).logits)[0].float()


def _share(num_pairs: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's pair indices, padded to the common length; returns (indices, number of real ones)."""
    own = list(range(rank, num_pairs, world_size))
    per_rank = -(-num_pairs // world_size)
    filler = own[-1] if own else 0
    return own + [filler] * (per_rank - len(own)), len(own)


def compute_reference_logps(
    model: Any,
    dataset: PreferenceDataset,
    *,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    group: Any = None,
) -> torch.Tensor:
    """Score every pair with ``model`` and return the (N, 2) float32 CPU table (column 0 = A, 1 = B).

    With ``world_size > 1`` and an initialised process group each rank scores
    its share and the shares are all-gathered. Without a process group only
    this rank's share is filled (NaN elsewhere): that is how tests simulate ranks.
    """
    collate = PreferenceCollator(dataset.pad_token_id, dataset.num_objectives)
    indices, real = _share(len(dataset), rank, world_size)
    values = torch.zeros(len(indices), 2)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()  # dropout off: the reference is a deterministic function
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            rows = reference_logps_of_batch(model, collate([dataset[i] for i in chunk])).cpu()
            values[start : start + len(chunk)] = torch.stack([rows[: len(chunk)], rows[len(chunk) :]], dim=1)
    finally:
        if was_training:
            model.train()
    table = torch.full((len(dataset), 2), float("nan"))
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        # One rank, or a simulated rank in a test: only this share is filled (NaN elsewhere).
        table[torch.tensor(indices[:real], dtype=torch.long)] = values[:real]
        return table
    device = collective_device(group)
    gathered = [torch.zeros_like(values, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, values.to(device), group=group)
    for r, part in enumerate(gathered):
        owned, count = _share(len(dataset), r, world_size)
        table[torch.tensor(owned[:count], dtype=torch.long)] = part[:count].cpu()
    return table


def reference_cache_key(model_identity: str, dataset: PreferenceDataset) -> str:
    """The cache key: sha256 of the model identity, the tokenised dataset fingerprint and the format version."""
    text = f"{_FORMAT_VERSION}\n{model_identity}\n{dataset.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()


def _load(path: Path, num_pairs: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt entry is recomputed, never trusted
        logger.warning("ignoring unreadable reference cache %s (%s)", path, error)
        return None
    if not isinstance(table, torch.Tensor) or table.shape != (num_pairs, 2) or not torch.isfinite(table).all():
        logger.warning("ignoring reference cache %s: wrong shape or non-finite values", path)
        return None
    return table


def precompute_reference_logps(
    model: Any,
    dataset: PreferenceDataset,
    model_identity: str,
    *,
    batch_size: int = 8,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    group: Any = None,
) -> torch.Tensor:
    """The (N, 2) reference table for ``dataset``, from the disk cache or computed across ranks and cached.

    ``model`` must be the frozen initial model (call this before the first
    optimizer step). Ranks and world size come from ``torch.distributed``
    when it is initialised; every rank must call this.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world_size = dist.get_world_size(group) if distributed else 1
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "reference"
    path = directory / f"{reference_cache_key(model_identity, dataset)}.pt"
    table = _load(path, len(dataset)) if use_cache else None
    if distributed:
        # Load only if every rank can: otherwise some ranks would skip the collective forwards.
        have = torch.tensor([1 if table is not None else 0], device=collective_device(group))
        dist.all_reduce(have, op=dist.ReduceOp.MIN, group=group)
        if not have.item():
            table = None
    if table is not None:
        logger.info("reference log-probs loaded from %s", path)
        return table
    table = compute_reference_logps(
        model, dataset, batch_size=batch_size, rank=rank, world_size=world_size, group=group
    )
    if not torch.isfinite(table).all():
        raise RuntimeError("reference log-probs contain non-finite values; check the model and dtype (try fp32)")
    if use_cache and int(os.environ.get("LOCAL_RANK", rank)) == 0:
        with atomic_file(path) as tmp:
            torch.save(table, tmp)
        logger.info("reference log-probs of %d pairs cached at %s", len(dataset), path)
    if distributed:
        dist.barrier(group=group)  # nobody races ahead to read a half-published cache
    return table


class FrozenReference:
    """A frozen reference model that scores batches on the fly (no precomputed table)."""

    def __init__(self, model: Any) -> None:
        """Wrap ``model`` (an ``nn.Module`` or a DeepSpeed inference engine); it is put in eval mode and frozen."""
        self.model = model
        if hasattr(model, "eval"):
            model.eval()
        if hasattr(model, "parameters"):
            for parameter in model.parameters():
                parameter.requires_grad_(False)

    def __call__(self, batch: PreferenceBatch) -> torch.Tensor:
        """(2B,) reference log-probs of ``batch``'s rows."""
        return reference_logps_of_batch(self.model, batch)

    def fill(self, batch: PreferenceBatch) -> PreferenceBatch:
        """Set ``batch.reference_logps`` (when missing) and return the batch."""
        if batch.reference_logps is None:
            batch.reference_logps = self(batch).to(batch.input_ids.device)
        return batch


def build_reference_engine(model: Any, ds_config: dict[str, Any] | None = None) -> FrozenReference:
    """A ZeRO-3 DeepSpeed inference engine around a frozen copy of the initial model.

    ``ds_config`` is the training config; only its batch sizes and precision
    are kept, with ZeRO stage 3 and no optimizer, so the reference's
    parameters are sharded like the policy's and never updated.
    """
    import deepspeed

    base = dict(ds_config or {})
    config: dict[str, Any] = {
        key: base[key]
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
        if key in base
    }
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    config["zero_optimization"] = {"stage": 3}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return FrozenReference(engine)
