"""Where the trainer's numbers go: the trackers named by ``--logging.report_to`` (transformers' convention).

``tensorboard`` (the default) writes event files under ``<output_dir>/tensorboard``;
``wandb`` logs to Weights & Biases (``WANDB_MODE=offline``, ``WANDB_PROJECT``,
``WANDB_DIR`` and wandb's other variables apply; the run's files go under the
output folder unless ``WANDB_DIR`` says otherwise); ``none`` logs to neither.
Every tracker receives the same ``{tag: value}`` dicts, so the scalar names
(:data:`raco_ds.trainer.metrics.TAGS`) are identical in both. A resumed run
continues the same wandb run (its id is kept in ``<output_dir>/wandb_run_id``).

:class:`MetricsWriter` is the one processor every scalar passes through
(torchtitan's rule): only rank 0 gets trackers, so no call site checks the rank.
wandb is imported only when ``report_to`` names it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from raco_ds.trainer.config import ConfigError, TrainConfig, config_to_dict

__all__ = ["TRACKERS", "MetricsWriter", "Tracker", "open_trackers", "require_tracker_packages"]


class Tracker(Protocol):
    """One destination of scalars and text notes."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record ``{tag: value}`` at ``step``."""

    def text(self, tag: str, text: str, step: int) -> None:
        """Record a text note (the resolved config, the capture mode, ...)."""

    def flush(self) -> None:
        """Push pending records out."""

    def close(self) -> None:
        """Flush and end the run."""


class _TensorBoard:
    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _Wandb:
    def __init__(self, out: Path, cfg: TrainConfig) -> None:
        import wandb

        id_file = out / "wandb_run_id"
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "raco_ds"),
            name=cfg.logging.run_name or out.name,
            id=id_file.read_text().strip() if id_file.is_file() else None,  # None: a new run, wandb's id
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(out),  # read per run: wandb reads its env once per process
            config=config_to_dict(cfg),
        )
        id_file.write_text(self._run.id)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self._run.log({tag: float(value) for tag, value in values.items()}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        # The config already went to wandb.init; notes like the capture mode belong in the run's summary.
        self._run.summary[f"text/{tag}"] = text

    def flush(self) -> None:
        """wandb streams records itself."""

    def close(self) -> None:
        import wandb

        self._run.finish()
        # finish() can return before wandb's service has written the run's last records (wandb 0.31,
        # offline: a second run in one process lost its history); teardown waits for the service, so
        # the run's files are complete when train() returns. It also ends other wandb runs of the process.
        wandb.teardown()


TRACKERS: dict[str, Callable[[Path, TrainConfig, int | None], Tracker]] = {
    "tensorboard": lambda out, cfg, purge_step: _TensorBoard(out / "tensorboard", purge_step),
    "wandb": lambda out, cfg, purge_step: _Wandb(out, cfg),
}
"""``--logging.report_to`` name -> opener(output_dir, config, purge_step)."""

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def require_tracker_packages(names: Sequence[str]) -> None:
    """Raise ConfigError with the pip command when a named tracker's package is not installed."""
    for name in names:
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(
                f"logging.report_to names {name}, but the {_PACKAGES[name]} package is not installed; "
                f"pip install {_PACKAGES[name]}, or drop it from --logging.report_to"
            )


class MetricsWriter:
    """Sends every scalar and note to each tracker; with no trackers (ranks > 0, ``none``) it drops them."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    @property
    def active(self) -> bool:
        """True when some tracker receives what is written."""
        return bool(self.trackers)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step`` (NaN values, e.g. an objective with no pairs, are written too)."""
        for tracker in self.trackers:
            tracker.scalars(values, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Write a text note (the resolved config, the capture mode, ...)."""
        for tracker in self.trackers:
            tracker.text(tag, text, step)

    def flush(self) -> None:
        """Push pending records out."""
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        """Flush and close every tracker (a second call does nothing)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(cfg: TrainConfig, out: str | Path, *, rank: int, purge_step: int | None = None) -> MetricsWriter:
    """The run's writer: the trackers of ``cfg.logging`` on rank 0, none elsewhere.

    ``purge_step``: on resume, TensorBoard drops events at or after this step that a crashed run
    left behind (wandb continues the same run, ignoring steps it already has).
    """
    if rank != 0:
        return MetricsWriter()
    names = cfg.logging.trackers()
    require_tracker_packages(names)
    return MetricsWriter([TRACKERS[name](Path(out), cfg, purge_step) for name in names])
