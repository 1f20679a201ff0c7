"""Per-pair preference metrics that can see steering: where the objectives disagree and where they agree.

On a pair where two objectives prefer opposite responses, raising one objective's weight must
raise its accuracy there and lower the other's; on pairs where they agree, both can rise
together. Averaging over all pairs mixes the two and hides the trade-off, so each objective k
is also scored on

``disagree``
    its non-tie pairs on which some other objective prefers the other response;
``agree``
    its non-tie pairs on which no objective prefers the other response and at least one
    other objective prefers the same one.

(Pairs where every other objective ties belong to neither; per-objective data, where no pair
carries two labels, has neither.) Per pair, with the implicit reward r = beta * (log pi - log
ref) of the loss (raco_ds.losses.pair_margins), ``margin`` = r(preferred) - r(other) and
``accuracy`` = 1 if that margin is > 0, else 0: the same definitions as the trainer's metrics,
kept per pair so that :mod:`raco_ds.evaluation.bootstrap` can put intervals on them.
"""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np
import torch

from raco_ds.evaluation.bootstrap import ItemValues
from raco_ds.losses import pair_margins

__all__ = ["SUBSETS", "preference_items"]

SUBSETS = ("", "_disagree", "_agree")
"""Metric-name suffixes: all non-tie pairs, the disagreeing ones, the agreeing ones."""


def preference_items(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    labels: torch.Tensor,
    clusters: Sequence[str],
    names: Sequence[str],
    *,
    loss: str,
    beta: float,
) -> dict[str, ItemValues]:
    """Per-pair ``accuracy`` and ``margin`` of every objective on all, disagreeing and agreeing pairs.

    Args:
        policy_logps, reference_logps: (N, 2) summed log-probs of responses A and B.
        lengths: (N, 2) response token counts (for length-normalised losses).
        labels: (K, N) in {+1, -1, 0}: which response objective k prefers.
        clusters: the N pairs' cluster ids.
        names: the K objective names.
    Returns:
        ``{"<metric><subset>/<objective>": ItemValues}``, e.g. ``accuracy_disagree/helpful``.
    """
    ref = {} if reference_logps is None else {
        "reference_logps_a": reference_logps[:, 0], "reference_logps_b": reference_logps[:, 1]}
    margins = beta * pair_margins(policy_logps[:, 0], policy_logps[:, 1], loss=loss, lengths_a=lengths[:, 0],
                                  lengths_b=lengths[:, 1], **ref).double().numpy()
    labels = labels.numpy()
    out: dict[str, ItemValues] = {}
    for k, name in enumerate(names):
        own = labels[k] != 0
        others = np.delete(labels, k, axis=0)
        opposed = ((others * labels[k]) < 0).any(axis=0)
        shared = ((others * labels[k]) > 0).any(axis=0)
        subsets = {"": own, "_disagree": own & opposed, "_agree": own & shared & ~opposed}
        for suffix, mask in subsets.items():
            pair_margin = labels[k][mask] * margins[mask]
            members = [str(clusters[i]) for i in np.flatnonzero(mask)]
            out[f"margin{suffix}/{name}"] = ItemValues(pair_margin.tolist(), members)
            out[f"accuracy{suffix}/{name}"] = ItemValues((pair_margin > 0).astype(float).tolist(), members)
    return out
