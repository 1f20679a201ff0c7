"""One PNG per sweep: the fronts with error bars, and how each objective follows its weight.

Left panel: objective 1's metric against objective 2's, one front per aggregator; each point
is a weight vector's mean over seeds with its 95% interval as error bars in both directions,
non-dominated points filled and dominated ones hollow, labelled with their weights. Then one
panel per objective k: its metric against w_k, one line per aggregator with error bars (the
steering picture: a rising line is a weight that steers). Matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raco_ds.pareto.grid import format_weights
from raco_ds.pareto.metrics import non_dominated

__all__ = ["plot_sweep"]

# Fixed colours per well-known aggregator so that plots of different sweeps compare at a glance.
_COLOURS = {"raco": "tab:red", "linear": "tab:blue", "cagrad": "tab:green", "mgda": "tab:purple"}
_MARKERS = {"raco": "o", "linear": "s", "cagrad": "^", "mgda": "D"}


def _errors(estimates: Sequence[Any]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars [[below...], [above...]] (0 where an interval is missing)."""
    below = [max(e.value - e.low, 0.0) if e.low == e.low else 0.0 for e in estimates]
    above = [max(e.high - e.value, 0.0) if e.high == e.high else 0.0 for e in estimates]
    return [below, above]


def plot_sweep(
    statistics: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    objectives: Sequence[str],
    metric_labels: Sequence[str],
    title: str = "",
) -> Path:
    """Draw the sweep (see the module docstring) and write a PNG to ``path``; returns the path.

    Args:
        statistics: aggregator -> its :func:`raco_ds.pareto.statistics.sweep_statistics` entry
            ("weights", "means" as [[Estimate per objective] per weight]).
        path: the PNG file to write (parents created).
        objectives: objective names, in weight order.
        metric_labels: the metric shown for each objective (e.g. "-gen/length_tokens").
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    k = len(objectives)
    fig, axes = plt.subplots(1, 1 + k, figsize=(5.2 * (1 + k), 4.8), dpi=110)
    front_ax, steer_axes = axes[0], axes[1:]
    for rank, (name, stats) in enumerate(statistics.items()):
        colour, marker = _COLOURS.get(name), _MARKERS.get(name, "o")
        weights, means = stats["weights"], stats["means"]
        if k >= 2:
            xs, ys = [m[0] for m in means], [m[1] for m in means]
            line = front_ax.errorbar([e.value for e in xs], [e.value for e in ys], xerr=_errors(xs), yerr=_errors(ys),
                                     fmt="-", lw=0.8, alpha=0.6, color=colour, capsize=2, label=name)
            colour = line[0].get_color()
            front = set(non_dominated([(x.value, y.value) for x, y in zip(xs, ys)]))
            for i, (x, y) in enumerate(zip(xs, ys)):
                front_ax.scatter(x.value, y.value, marker=marker, s=40, zorder=3, edgecolors=colour,
                                 facecolors=colour if i in front else "none")
                front_ax.annotate(f"({format_weights(weights[i])})", (x.value, y.value), textcoords="offset points",
                                  xytext=(4, 3 - 8 * rank), fontsize=6, color=colour)
        for j, ax in enumerate(steer_axes):
            order = sorted(range(len(weights)), key=lambda i: weights[i][j])
            ests = [means[i][j] for i in order]
            ax.errorbar([weights[i][j] for i in order], [e.value for e in ests], yerr=_errors(ests), fmt="-",
                        marker=marker, ms=4, lw=1, capsize=2, color=colour, label=name)
    if k >= 2:
        front_ax.set_xlabel(f"{objectives[0]}: {metric_labels[0]}")
        front_ax.set_ylabel(f"{objectives[1]}: {metric_labels[1]}")
        front_ax.set_title("fronts (mean over seeds, 95% CI); hollow: dominated", fontsize=9)
        front_ax.legend(fontsize=8)
        front_ax.grid(True, alpha=0.3)
        front_ax.margins(0.12)
    else:
        front_ax.set_axis_off()
    for j, ax in enumerate(steer_axes):
        ax.set_xlabel(f"w_{objectives[j]}")
        ax.set_ylabel(metric_labels[j])
        ax.set_title(f"steering: {objectives[j]}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path
