"""Scoring pairs without gradients: the reference log-probs and held-out per-objective evaluation.

Both need the same thing, the summed response log-probs of A and B for a set
of pairs under the current engine, so both use :func:`score_pairs`. It splits
the pairs over the ranks, pads the shorter ranks with a repeated batch (under
ZeRO-3 every forward is a collective: all ranks must run the same number), and
sums the per-rank tables so that every rank ends with the full table.

Evaluation metrics per objective (over its non-tie held-out pairs):

- ``loss``, ``accuracy``, ``margin``, ``chosen_reward``, ``rejected_reward``:
  the training loss's own definitions (raco_ds.losses). With the initial model
  as reference, the implicit rewards are all 0 before training, so ``accuracy``
  starts at 0 (strict preference) and measures what training changed.
- ``likelihood_accuracy``: how often the policy gives the preferred response the
  higher mean per-token log-prob. Reference-free, so it is meaningful before
  training too (the model's prior preference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.data.batch import PreferenceCollator
from raco_ds.data.tokenization import PreferenceDataset
from raco_ds.evaluation.bootstrap import Estimate, ItemValues
from raco_ds.evaluation.preference import SUBSETS, preference_items
from raco_ds.losses import preference_losses

__all__ = [
    "EVAL_METRICS",
    "HELDOUT_SCORES_FILE",
    "PairScores",
    "PlainEngine",
    "evaluate",
    "format_intervals",
    "heldout_items",
    "load_heldout_scores",
    "policy_logps",
    "save_heldout_scores",
    "score_pairs",
]

HELDOUT_SCORES_FILE = "heldout_logps.safetensors"
"""The trained model's held-out scores, written to the run folder (an evaluator reuses them)."""

EVAL_METRICS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "likelihood_accuracy")
"""The per-objective metrics :func:`evaluate` returns."""


@dataclass
class PairScores:
    """Summed response log-probs and lengths of A and B for pairs of a dataset (rows: pair_index)."""

    logps: torch.Tensor
    """(N, 2) float64: column 0 = response A, column 1 = response B (NaN where not scored)."""
    lengths: torch.Tensor
    """(N, 2) long: response token counts."""


class PlainEngine:
    """The few DeepSpeed-engine attributes :func:`score_pairs` uses, over a plain model (no ZeRO)."""

    def __init__(self, model: torch.nn.Module) -> None:
        """Wrap ``model``; its first parameter's device is where batches go."""
        self.module = model
        self.device = next(model.parameters()).device

    def __call__(self, **inputs: Any) -> Any:
        """The model's forward."""
        return self.module(**inputs)

    def eval(self) -> None:
        """Put the model in eval mode."""
        self.module.eval()

    def train(self, mode: bool = True) -> None:
        """Put the model in train mode (``mode=False``: eval mode)."""
        self.module.train(mode)

    def empty_partition_cache(self) -> None:
        """Nothing is partitioned outside ZeRO-3."""


def policy_logps(engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``batch`` (a PreferenceBatch on the engine's device) and return (sum_logps (2B,), num_tokens (2B,))."""
    return batch.response_logps(engine(**batch.model_inputs(), use_cache=False).logits)


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def score_pairs(
    engine, dataset: PreferenceDataset, indices: Sequence[int], batch_size: int, collator: PreferenceCollator
) -> PairScores:
    """Score ``indices`` of ``dataset`` with the engine's current weights (collective; identical result on all ranks)."""
    rank, world = _rank_world()
    mine = list(indices)[rank::world]
    per_rank = math.ceil(len(indices) / world)
    num_batches = math.ceil(per_rank / batch_size) if per_rank else 0
    device = engine.device
    logps = torch.zeros(len(dataset), 2, dtype=torch.float64)
    lengths = torch.zeros(len(dataset), 2, dtype=torch.long)
    was_training = engine.module.training
    engine.eval()
    try:
        for b in range(num_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            padding = not chunk  # this rank ran out: repeat a pair so the collective forward still happens
            batch = collator([dataset[i] for i in (chunk or list(indices)[:1])]).to(device)
            sums, counts = policy_logps(engine, batch)
            if padding:
                continue
            pairs, num = batch.pair_index.cpu(), batch.num_pairs
            logps[pairs] = torch.stack([sums[:num], sums[num:]], dim=1).double().cpu()
            lengths[pairs] = torch.stack([counts[:num], counts[num:]], dim=1).cpu()
    finally:
        engine.train(was_training)
        # ZeRO-3 prefetches parameters for a next forward that a no-grad pass never runs; release
        # them, or the next gather (checkpoint, export) finds parameters still "in flight".
        engine.empty_partition_cache()
    if world > 1:
        # Every pair was scored by exactly one rank; the others hold zeros there.
        dist.all_reduce(logps)
        dist.all_reduce(lengths)
    scored = torch.zeros(len(dataset), dtype=torch.bool)
    scored[list(indices)] = True
    logps[~scored] = float("nan")
    return PairScores(logps, lengths)


def evaluate(
    policy: PairScores,
    reference: PairScores | None,
    dataset: PreferenceDataset,
    indices: Sequence[int],
    *,
    loss: str,
    beta: float,
    options: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Per-objective held-out metrics ({metric: [value per objective]}) from scored pairs."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    labels = torch.tensor([dataset[i].labels for i in indices], dtype=torch.long).T.contiguous()
    pa, pb = policy.logps[index, 0], policy.logps[index, 1]
    la, lb = policy.lengths[index, 0], policy.lengths[index, 1]
    ref = {}
    if reference is not None:
        ref = {"reference_logps_a": reference.logps[index, 0], "reference_logps_b": reference.logps[index, 1]}
    out = preference_losses(pa, pb, labels, loss=loss, beta=beta, lengths_a=la, lengths_b=lb, **ref, **(options or {}))
    # Reference-free, length-normalised preference of the policy itself (SimPO's reward with beta 1).
    likelihood = preference_losses(pa, pb, labels, loss="simpo", beta=1.0, lengths_a=la, lengths_b=lb)
    return {
        "loss": out.losses.tolist(),
        "accuracy": out.accuracy.tolist(),
        "margin": out.margin.tolist(),
        "chosen_reward": out.chosen_reward.tolist(),
        "rejected_reward": out.rejected_reward.tolist(),
        "likelihood_accuracy": likelihood.accuracy.tolist(),
        "num_pairs": out.num_pairs.tolist(),
    }


def _heldout_key(
    dataset: PreferenceDataset, indices: Sequence[int], model_dir: str | Path, dtype: str
) -> dict[str, Any]:
    from raco_ds.models import model_identity

    return {"dataset": dataset.fingerprint, "indices": list(indices), "model": model_identity(str(model_dir), dtype)}


def save_heldout_scores(
    path: str | Path,
    dataset: PreferenceDataset,
    indices: Sequence[int],
    scores: PairScores,
    model_dir: str | Path,
    dtype: str,
) -> None:
    """Write the held-out ``scores`` of the model saved in ``model_dir`` (its export) run in ``dtype``,
    keyed by the tokenised data, the pairs, that folder's weight files and the dtype, atomically and
    without pickle."""
    from raco_ds.trainer.scores_file import save_scores

    save_scores(path, _heldout_key(dataset, indices, model_dir, dtype), scores)


def load_heldout_scores(
    path: str | Path, dataset: PreferenceDataset, indices: Sequence[int], model_dir: str | Path, dtype: str
) -> PairScores | None:
    """The scores :func:`save_heldout_scores` wrote for ``model_dir`` in ``dtype``; None when missing,
    damaged, or written for other data, pairs, weights (an export rewritten since) or another dtype."""
    from raco_ds.trainer.scores_file import OtherKeyError, load_scores

    try:
        return load_scores(path, _heldout_key(dataset, indices, model_dir, dtype))
    except OtherKeyError:
        return None


def heldout_items(
    policy: PairScores,
    reference: PairScores | None,
    dataset: PreferenceDataset,
    indices: Sequence[int],
    groups: Sequence[int] | None,
    *,
    loss: str,
    beta: float,
) -> dict[str, ItemValues]:
    """Per-pair accuracy and margin per objective on all / disagreeing / agreeing held-out pairs
    (raco_ds.evaluation.preference), clustered by prompt group for the bootstrap."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    labels = torch.tensor([dataset[i].labels for i in indices], dtype=torch.long).reshape(len(index), -1).T
    clusters = [f"g{groups[i] if groups is not None else i}" for i in indices]
    return preference_items(
        policy.logps[index], None if reference is None else reference.logps[index], policy.lengths[index],
        labels, clusters, dataset.objective_names, loss=loss, beta=beta,
    )


def format_intervals(intervals: dict[str, Estimate], names: Sequence[str], metrics: Sequence[str]) -> str:
    """A table of ``metric[subset]/objective`` estimates with their 95% intervals and pair counts."""
    labels = {"": "all pairs", "_disagree": "objectives disagree", "_agree": "objectives agree"}
    width = 32  # "-0.288 [-0.411, -0.039] (n=18)" and a separating space
    lines = [f"  {'objective':<14}{'metric':<10}" + "".join(f"{labels[s]:>{width}}" for s in SUBSETS)]
    for name in names:
        for metric in metrics:
            cells = []
            for suffix in SUBSETS:
                est = intervals.get(f"{metric}{suffix}/{name}")
                text = "-" if est is None or not est.n else f"{est} (n={est.n})"
                cells.append(" " + f"{text:>{width - 1}}")
            lines.append(f"  {name if metric == metrics[0] else '':<14}{metric:<10}" + "".join(cells))
    return "\n".join(lines)
