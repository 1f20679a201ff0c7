"""One PNG per sweep: objective 1's metric against objective 2's, one front per aggregator.

Each aggregator's points are drawn in weight order (connected by a thin line, so the path the
front takes as w moves is visible), its non-dominated points are filled and the dominated ones
hollow, and every point is labelled with its weights. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from raco_ds.pareto.grid import Weights, format_weights
from raco_ds.pareto.metrics import non_dominated

__all__ = ["plot_fronts"]

# Fixed colours per well-known aggregator so that plots of different sweeps compare at a glance.
_COLOURS = {"raco": "tab:red", "linear": "tab:blue", "cagrad": "tab:green", "mgda": "tab:purple"}
_MARKERS = {"raco": "o", "linear": "s", "cagrad": "^", "mgda": "D"}


def plot_fronts(
    fronts: Mapping[str, Sequence[tuple[Weights, Sequence[float]]]],
    path: str | Path,
    *,
    axis_labels: tuple[str, str] = ("objective 1", "objective 2"),
    axes: tuple[int, int] = (0, 1),
    title: str = "",
    reference: Sequence[float] | None = None,
) -> Path:
    """Draw the fronts and write a PNG to ``path`` (parents created); returns the path.

    Args:
        fronts: aggregator name -> its points as (weights, per-objective metric values).
        path: the PNG file to write.
        axis_labels: x and y axis labels (e.g. "accuracy: helpful").
        axes: which two objectives to draw (indices into each point's metric values);
            K >= 3 sweeps show a 2-D projection.
        title: figure title.
        reference: hypervolume reference point to mark (full K-vector), or None.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    i, j = axes
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    handles = []
    for rank, (name, points) in enumerate(fronts.items()):
        colour, marker = _COLOURS.get(name), _MARKERS.get(name, "o")
        ordered = sorted(points, key=lambda p: tuple(p[0]))
        xs = [p[1][i] for p in ordered]
        ys = [p[1][j] for p in ordered]
        colour = ax.plot(xs, ys, "-", lw=0.8, alpha=0.5, color=colour)[0].get_color()
        front = set(non_dominated([(p[1][i], p[1][j]) for p in ordered]))
        labels: dict[tuple[float, float], list[str]] = {}
        for n, (w, values) in enumerate(ordered):
            ax.scatter(values[i], values[j], marker=marker, s=46, zorder=3,
                       facecolors=colour if n in front else "none", edgecolors=colour)
            labels.setdefault((values[i], values[j]), []).append(f"({format_weights(w)})")
        for xy, texts in labels.items():
            # Points coincide (within and across aggregators): one label line per aggregator, stacked.
            ax.annotate(" ".join(texts), xy, textcoords="offset points", xytext=(5, 3 - 8 * rank),
                        fontsize=6.5, color=colour)
        handles.append(Line2D([], [], color=colour, marker=marker, markerfacecolor=colour, lw=0.8, label=name))
    if reference is not None:
        ax.scatter(reference[i], reference[j], marker="x", color="grey", zorder=2)
        handles.append(Line2D([], [], color="grey", marker="x", lw=0, label="HV reference"))
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.12)  # room for the labels of the outermost points
    ax.legend(handles=handles, fontsize=8, title="hollow: dominated", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path
