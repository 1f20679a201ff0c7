"""Restartable Pareto sweeps: one training run per (aggregator, weight vector), then held-out evaluation.

Every point starts from the same initial model and data (the same ``train_args`` and seed;
only ``--aggregator`` and ``--weights`` change) and runs ``launchers/train.py`` in its own
subprocess, so that one point's crash, leak or global state cannot reach another.

Layout of ``output_dir``::

    sweep.json                      the sweep's settings (a restart must match them)
    points/<aggregator>/w<w1>_<w2>/
        train/                      the trainer's --output-dir (config.yaml, export/, ...)
        train.log                   stdout + stderr of every attempt
        DONE.json                   completion marker, written atomically after a successful run
        eval.json                   held-out metrics of that trained model
    results.csv, results.json       one row per point; results.json adds per-aggregator statistics
                                    with 95% intervals (raco_ds.pareto.statistics)
    pareto.png                      objective 1's metric against objective 2's

Restart rules: a point with ``DONE.json`` is not trained again; a point without it (never
started, crashed, killed, timed out) is trained again from scratch (its partial ``train/`` is
deleted first, unless ``resume_crashed`` passes ``--resume`` to the trainer). A point's
evaluation is reused while its ``eval.json`` belongs to the current ``DONE.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raco_ds.data.loading import content_hash
from raco_ds.pareto.grid import DEFAULT_STEP, Weights, format_weights, simplex_grid, validate_weights
from raco_ds.pareto.metrics import non_dominated
from raco_ds.pareto.plot import plot_sweep
from raco_ds.pareto.statistics import MetricSpec, RunData, curve_roughness, sweep_statistics
from raco_ds.trainer.config import ObjectivesConfig
from raco_ds.trainer.reference import REFERENCE_FILE

__all__ = [
    "DONE_MARKER",
    "EVAL_FILE",
    "Evaluator",
    "PointOutcome",
    "SweepConfig",
    "SweepError",
    "SweepPoint",
    "SweepResult",
    "run_sweep",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DONE_MARKER = "DONE.json"
"""Name of the per-point completion marker (written atomically after a successful training run)."""
EVAL_FILE = "eval.json"
"""Name of the per-point evaluation result."""

# Options the sweep sets per point: passing them in train_args would silently fight the sweep.
_RESERVED = {
    "--weights": "weights", "--objectives.weights": "weights",
    "--aggregator": "aggregators", "--raco.aggregator": "aggregators",
    "--objectives": "objectives", "--objectives.names": "objectives",
    "--output-dir": "output_dir", "--checkpointing.output_dir": "output_dir",
    "--resume": "resume_crashed", "--checkpointing.resume": "resume_crashed",
    "--seed": "seeds", "--optimisation.seed": "seeds",
}


class SweepError(RuntimeError):
    """A sweep cannot start or finish; the message names the setting or point and the fix."""


@dataclass(kw_only=True)
class SweepConfig:
    """One Pareto sweep: the grid, how each point is trained, and where results go."""

    output_dir: str = "outputs/pareto"
    """Sweep folder (see the module docstring). Re-running with the same folder resumes the sweep."""
    aggregators: list[str] = field(default_factory=lambda: ["raco", "linear", "cagrad"])
    """Aggregators to compare, one front each (raco_ds.solver names)."""
    objectives: list[str] = field(default_factory=lambda: list(ObjectivesConfig().names))
    """Objective names, in weight order (passed as --objectives); default: the trainer's default
    objectives. Name the ones the training data has (e.g. helpful,harmless with --preset tiny)."""
    weights: list[list[float]] | None = None
    """Explicit weight vectors; None: the simplex grid with spacing grid_step."""
    grid_step: float = DEFAULT_STEP
    """Spacing of the default grid: 0.25 gives w_1 in {0, 0.25, 0.5, 0.75, 1} for K = 2, 15 points for K = 3."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (--seed: model init of new parameters, data order, sampling) per weight vector.
    The held-out split has its own seed (data.split_seed), so every seed is scored on the same pairs."""
    train_args: list[str] = field(default_factory=list)
    """Arguments given to every training run (e.g. --preset tiny --max-steps 12); the same for
    every point so that all start from the same model and data. Must not set the per-point options."""
    train_command: list[str] | None = None
    """The training program; None: this Python running launchers/train.py (single process).
    E.g. ["deepspeed", "--num_gpus", "2", "launchers/train.py"] for a multi-rank point."""
    max_attempts: int = 2
    """Tries per point and call before it is reported failed (a later call tries again)."""
    timeout_s: float | None = None
    """Wall-clock limit per training attempt in seconds (the attempt is killed and counts as a crash)."""
    resume_crashed: bool = False
    """Retry a crashed point with --resume (continue from its last checkpoint) instead of from scratch."""
    metrics: list[str] | None = None
    """One metric per objective, in weight order, that the fronts, hypervolume, steering statistic
    and plot use: a flat evaluation key, "-" in front when lower is better (e.g.
    accuracy_disagree/helpfulness, -gen/length_tokens). None: accuracy/<objective> for each."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the training subprocesses (e.g. OMP_NUM_THREADS)."""
    train: bool = True
    """Train the points that are not finished. False: only evaluate the points already trained
    (e.g. a second process scoring finished points while the first one trains the rest)."""
    evaluate: bool = True
    """Evaluate each point right after training. False: train only (e.g. while the evaluation is
    configured elsewhere); a later call with evaluate on scores the trained points."""

    def __post_init__(self) -> None:
        if not self.aggregators or len(set(self.aggregators)) != len(self.aggregators):
            raise ValueError(f"aggregators={self.aggregators} must be non-empty and without duplicates, e.g. raco,linear")
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives={self.objectives} must be non-empty and without duplicates, e.g. helpful,harmless")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be non-empty and without duplicates, e.g. 0,1")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds or None (no limit), got {self.timeout_s}")
        if self.metrics is not None and len(self.metrics) != len(self.objectives):
            raise ValueError(f"metrics={self.metrics} names {len(self.metrics)} metrics for {len(self.objectives)} "
                             f"objectives {self.objectives}; give one per objective, e.g. accuracy/{self.objectives[0]}")
        for arg in self.train_args:
            key = arg.split("=", 1)[0]
            if key in _RESERVED:
                raise ValueError(
                    f"train_args sets {key}, which the sweep sets per point; "
                    f"use the sweep's {_RESERVED[key]} setting instead"
                )
        self.grid()  # validate the grid now, not after the first training run

    def metric_specs(self) -> list[MetricSpec]:
        """The per-objective metrics (``metrics`` or accuracy/<objective>), parsed."""
        return [MetricSpec.parse(m) for m in (self.metrics or [f"accuracy/{o}" for o in self.objectives])]

    def grid(self) -> list[Weights]:
        """The weight vectors of the sweep (explicit ``weights`` or the simplex grid)."""
        k = len(self.objectives)
        if self.weights is None:
            return simplex_grid(k, self.grid_step)
        grid = [validate_weights(w, k, where=f"weights[{i}]") for i, w in enumerate(self.weights)]
        if len(set(grid)) != len(grid):
            raise ValueError(f"weights={self.weights} repeats a vector; list each weight vector once")
        return grid

    def points(self) -> list[SweepPoint]:
        """Every (aggregator, weights, seed) point, seed-major (a partial sweep covers every
        aggregator and weight at the first seed before any second seed), then aggregator-major."""
        return [SweepPoint(aggregator=a, weights=w, seed=s) for s in self.seeds for a in self.aggregators
                for w in self.grid()]

    def command(self) -> list[str]:
        """The training program (``train_command`` or this Python with launchers/train.py)."""
        return list(self.train_command) if self.train_command else [sys.executable, str(REPO_ROOT / "launchers" / "train.py")]


@dataclass(frozen=True)
class SweepPoint:
    """One point of the sweep: an aggregator and a weight vector."""

    aggregator: str
    """Aggregator name (raco_ds.solver)."""
    weights: Weights
    """User weights on the simplex, in objective order."""
    seed: int = 0
    """Training seed (--seed)."""

    @property
    def name(self) -> str:
        """Folder name below ``points/``: ``<aggregator>/w<w1>_<w2>.../s<seed>``."""
        return f"{self.aggregator}/w{format_weights(self.weights).replace(',', '_')}/s{self.seed}"

    def folder(self, output_dir: str | Path) -> Path:
        """This point's folder in the sweep."""
        return Path(output_dir) / "points" / self.name


@dataclass
class PointOutcome:
    """What happened to one point in this call."""

    point: SweepPoint
    """The point."""
    status: str
    """"skipped" (already trained), "trained", "pending" (not trained, train=False), or "failed"
    (no successful attempt, or its evaluation raised)."""
    attempts: int = 0
    """Training attempts made in this call."""
    train_seconds: float = math.nan
    """Wall time of the successful training run (from its marker when skipped)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Held-out metrics (empty if failed or not evaluated)."""
    items: dict[str, dict] = field(default_factory=dict)
    """Per-item values behind the metrics ({"values": [...], "clusters": [...]}; empty when the
    evaluator gives means only): the sweep's bootstrap resamples them."""


@dataclass
class SweepResult:
    """The sweep's outcome: per-point rows, per-aggregator front summaries and the written files."""

    outcomes: list[PointOutcome]
    """Every point of the grid, in sweep order."""
    summary: dict[str, dict[str, Any]]
    """Aggregator -> per-weight means, hypervolume, steering and roughness with 95% intervals, and
    the front's members (raco_ds.pareto.statistics; Estimates as dicts)."""
    files: dict[str, Path]
    """"csv", "json", "png" -> written paths."""

    @property
    def failed(self) -> list[PointOutcome]:
        """The points that did not train successfully."""
        return [o for o in self.outcomes if o.status == "failed"]


Evaluator = Callable[[SweepPoint, Path], Any]
"""(point, its trainer output folder) -> flat held-out metrics, e.g. {"accuracy/helpful": 0.7, ...},
or an object with ``flat()`` (those metrics) and ``item_values`` (per-item values with their
bootstrap clusters, e.g. :class:`raco_ds.pareto.evaluate.EvalReport`).

An evaluator may have a JSON-able ``settings`` attribute (what it measures and how): a point's
cached ``eval.json`` is reused only when it was made for the same trained model with equal settings.

Keys are "<metric>/<objective>"; the fronts use the keys of ``SweepConfig.metrics``."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # a marker that is missing or torn counts as "not done"


# ---------------------------------------------------------------------------
# The manifest: a restart must train the same thing.

_MANIFEST_KEYS = ("objectives", "train_args", "train_command")  # what the trained models depend on (and train_files)


def _train_files(cfg: SweepConfig) -> dict[str, Any]:
    """Every training argument that names a local file or folder (a config, DeepSpeed config, data),
    with what identifies its content: a file's sha256, a folder's file names and sizes."""
    files: dict[str, Any] = {}
    for arg in cfg.train_args:
        path = Path(arg) if Path(arg).is_absolute() else REPO_ROOT / arg
        if arg.startswith("-") or not path.exists():
            continue
        if path.is_file():
            files[arg] = content_hash(path)
        else:
            files[arg] = sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file())
    return json.loads(json.dumps(files))


def _check_manifest(cfg: SweepConfig) -> None:
    path = Path(cfg.output_dir) / "sweep.json"
    current = {**dataclasses.asdict(cfg), "train_files": _train_files(cfg)}
    previous = _read_json(path)
    if previous is not None:
        before, now = previous.get("train_files"), current["train_files"]
        changed = [] if before is None else sorted(a for a in {**before, **now} if before.get(a) != now.get(a))
        if changed:
            raise SweepError(
                f"{cfg.output_dir} holds a sweep run whose training read {', '.join(changed)}, and the content "
                "changed since; its finished points would not be comparable. Restore the files, or pass a new "
                "--output-dir."
            )
        for key in _MANIFEST_KEYS:
            if key in previous and previous[key] != current[key]:
                raise SweepError(
                    f"{cfg.output_dir} holds a sweep run with {key}={previous[key]!r}, but this call has "
                    f"{key}={current[key]!r}; its finished points would not be comparable. "
                    "Pass a new --output-dir, or delete the old sweep folder."
                )
        # Aggregators and weights may grow between calls: remember the union.
        for key in ("aggregators",):
            current[key] = list(dict.fromkeys([*previous.get(key, []), *current[key]]))
    write_json_atomic(path, current)


# ---------------------------------------------------------------------------
# Training one point.


def _environment(cfg: SweepConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if cfg.train_command is None:
        # A plain `python launchers/train.py` makes itself a world of one (trainer.process.setup_distributed)
        # unless it inherits a launcher's rank variables, e.g. from a sweep started inside a job step.
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
    env.update(cfg.env)
    return env


def _train_argv(cfg: SweepConfig, point: SweepPoint, train_dir: Path, resume: bool) -> list[str]:
    argv = cfg.command() + list(cfg.train_args) + [
        "--objectives", ",".join(cfg.objectives),
        "--weights", ",".join(repr(w) for w in point.weights),
        "--aggregator", point.aggregator,
        "--seed", str(point.seed),
        "--output-dir", str(train_dir),
    ]
    return argv + ["--resume"] if resume else argv


def _run_attempt(argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float | None) -> int:
    """Run one training attempt, appending its output to ``log_path``; returns the exit code
    (-9 after a timeout). The child gets its own process group so a timeout kills launcher
    children too."""
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n===== killed after the {timeout_s} s timeout (SweepConfig.timeout_s)\n")
            return -9
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # Ctrl-C: leave no orphaned training run behind
            proc.wait()
            raise


def _train_point(cfg: SweepConfig, point: SweepPoint) -> PointOutcome:
    folder = point.folder(cfg.output_dir)
    marker = folder / DONE_MARKER
    done = _read_json(marker)
    if done is not None:
        logger.info("%s: already trained (%s), skipped", point.name, marker)
        return PointOutcome(point, "skipped", 0, float(done.get("train_seconds", math.nan)))

    if not cfg.train:
        return PointOutcome(point, "pending")
    folder.mkdir(parents=True, exist_ok=True)
    train_dir = folder / "train"
    for attempt in range(1, cfg.max_attempts + 1):
        resume = cfg.resume_crashed and train_dir.exists()
        if train_dir.exists() and not resume:
            # A crashed attempt's partial checkpoints/export must not be mistaken for results.
            logger.info("%s: removing the partial output of a crashed attempt", point.name)
            shutil.rmtree(train_dir)
        if not resume:
            _share_reference_scores(cfg, train_dir)
        argv = _train_argv(cfg, point, train_dir, resume)
        logger.info("%s: training (attempt %d/%d)", point.name, attempt, cfg.max_attempts)
        start = time.perf_counter()
        code = _run_attempt(argv, _environment(cfg), folder / "train.log", cfg.timeout_s)
        seconds = time.perf_counter() - start
        if code == 0:
            write_json_atomic(marker, {
                "aggregator": point.aggregator,
                "weights": list(point.weights),
                "seed": point.seed,
                "objectives": cfg.objectives,
                "argv": argv,
                "train_seconds": seconds,
                "attempts": attempt,
                "finished_at": time.time(),
            })
            return PointOutcome(point, "trained", attempt, seconds)
        logger.warning("%s: attempt %d exited with code %d after %.1f s; see %s",
                       point.name, attempt, code, seconds, folder / "train.log")
    return PointOutcome(point, "failed", cfg.max_attempts)


def _progress(outcomes: Sequence[PointOutcome], total: int, elapsed: float) -> str:
    """Elapsed time and a remaining-time estimate from the points that ran in this call."""
    ran = sum(o.status in ("trained", "failed") for o in outcomes)
    left = total - len(outcomes)
    eta = f", about {elapsed / ran * left / 60:.0f} min left" if ran and left else ""
    return f"{elapsed / 60:.1f} min{eta}"


def _share_reference_scores(cfg: SweepConfig, train_dir: Path) -> None:
    """Give a new point the initial model's log-probs that a finished point computed.

    Every point starts from the same model and data, so they are the same numbers; scoring them
    again is most of a short CPU point's time. The trainer checks the file's key (data
    fingerprint, model, pair indices) and recomputes it on any mismatch, so a stale file costs
    time, never correctness.
    """
    for done in sorted(Path(cfg.output_dir).glob(f"points/*/*/*/{DONE_MARKER}")):
        source = done.parent / "train" / REFERENCE_FILE
        if source.is_file():
            train_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, train_dir / REFERENCE_FILE)
            return


def _evaluate_point(point: SweepPoint, folder: Path, evaluator: Evaluator) -> tuple[dict[str, float], dict]:
    """(flat metrics, per-item values as dicts) of a point, from its eval.json when it is current."""
    done = _read_json(folder / DONE_MARKER) or {}
    cached = _read_json(folder / EVAL_FILE)
    settings = json.loads(json.dumps(getattr(evaluator, "settings", None)))
    if cached is not None and cached.get("finished_at") == done.get("finished_at"):
        if cached.get("settings") == settings:
            return dict(cached["metrics"]), dict(cached.get("items", {}))
        logger.info("%s: %s was made with other evaluation settings; evaluating again", point.name, EVAL_FILE)
    result = evaluator(point, folder / "train")
    if isinstance(result, Mapping):
        metrics, items = {k: float(v) for k, v in result.items()}, {}
    else:  # an EvalReport: means plus the per-item values a sweep's bootstrap resamples
        metrics = {k: float(v) for k, v in result.flat().items()}
        items = {k: v.to_dict() for k, v in result.item_values.items()}
    write_json_atomic(
        folder / EVAL_FILE,
        {"finished_at": done.get("finished_at"), "settings": settings, "metrics": metrics, "items": items},
    )
    return metrics, items


# ---------------------------------------------------------------------------
# Fronts and outputs.


def _rows(cfg: SweepConfig, outcomes: Sequence[PointOutcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        row: dict[str, Any] = {"aggregator": o.point.aggregator, "weights": format_weights(o.point.weights),
                               "seed": o.point.seed}
        row.update({f"w/{name}": w for name, w in zip(cfg.objectives, o.point.weights)})
        row.update({"status": o.status, "train_seconds": round(o.train_seconds, 2)})
        row.update(o.metrics)
        rows.append(row)
    return rows


def _roughness(cfg: SweepConfig, point: SweepPoint) -> float:
    """Mean over objectives of the roughness of the point's per-step training loss (NaN if unlogged)."""
    path = point.folder(cfg.output_dir) / "train" / "metrics.jsonl"
    if not path.is_file():
        return math.nan
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [curve_roughness([s.get(f"train/loss/{name}", math.nan) for s in steps]) for name in cfg.objectives]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _json_statistics(stats: dict[str, Any], specs: Sequence[MetricSpec]) -> dict[str, Any]:
    """The statistics with every Estimate as a dict, and the front's members."""
    out = {}
    for name, s in stats.items():
        values = [[e.value for e in row] for row in s["means"]]
        out[name] = {
            "weights": s["weights"],
            "num_seeds": s["num_seeds"],
            "metrics": [str(spec) for spec in specs],
            "means": [[e.to_dict() for e in row] for row in s["means"]],
            "hypervolume": s["hypervolume"].to_dict(),
            "steering": [e.to_dict() for e in s["steering"]],
            "steering_mean": s["steering_mean"].to_dict(),
            "roughness": s["roughness"].to_dict(),
            "front": [s["weights"][i] for i in non_dominated(values)],
        }
    return out


def _write_outputs(cfg: SweepConfig, outcomes: list[PointOutcome]) -> tuple[dict[str, Any], dict[str, Path]]:
    out = Path(cfg.output_dir)
    rows = _rows(cfg, outcomes)
    specs = cfg.metric_specs()
    runs = [
        RunData(o.point.aggregator, o.point.weights, o.point.seed, o.metrics, o.items, _roughness(cfg, o.point))
        for o in outcomes
        if all(spec.key in o.metrics for spec in specs)
    ]
    stats, reference = sweep_statistics(runs, specs) if runs else ({}, [])
    summary = _json_statistics(stats, specs)

    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path = out / "results.csv"
    tmp = csv_path.with_name(".results.csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)

    json_path = out / "results.json"
    write_json_atomic(json_path, {
        "objectives": cfg.objectives,
        "metrics": [str(spec) for spec in specs],
        "hypervolume_reference": reference,
        "hypervolume_note": (
            "maximisation of the signed metrics; the reference point is the sweep's nadir (per objective, the "
            "lowest per-weight mean of any aggregator), the same for every aggregator"
        ),
        "interval_note": (
            "95% percentile intervals of a paired two-level bootstrap: held-out items resampled by prompt "
            "group (one draw shared by every model), seeds resampled within each weight vector"
        ),
        "config": dataclasses.asdict(cfg),
        "points": rows,
        "summary": summary,
    })
    files = {"csv": csv_path, "json": json_path}
    if stats:
        files["png"] = plot_sweep(
            stats, out / "pareto.png", objectives=cfg.objectives, metric_labels=[str(spec) for spec in specs],
            title=f"sweep ({', '.join(stats)}; seeds {sorted({r.seed for r in runs})}); point labels: weights "
                  f"({','.join(cfg.objectives)})",
        )
    return summary, files


def run_sweep(cfg: SweepConfig, evaluator: Evaluator | None = None) -> SweepResult:
    """Train (or skip) every point, evaluate each trained model, and write CSV, JSON and PNG.

    ``evaluator`` defaults to :class:`raco_ds.pareto.evaluate.HeldOutEvaluator` (held-out
    pairs of each run's own config). Failed points are reported in the result (and logged with
    their log file); the remaining points still run.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(cfg)
    if evaluator is None:
        from raco_ds.pareto.evaluate import HeldOutEvaluator

        evaluator = HeldOutEvaluator()

    outcomes = []
    points = cfg.points()
    started = time.perf_counter()
    for i, point in enumerate(points, 1):
        outcome = _train_point(cfg, point)
        if outcome.status in ("skipped", "trained") and cfg.evaluate:
            try:
                outcome.metrics, outcome.items = _evaluate_point(point, point.folder(out), evaluator)
            except Exception:  # one broken export must not cost the rest of the sweep
                logger.exception("%s: evaluation failed; the next call evaluates it again", point.name)
                outcome.status = "failed"
        outcomes.append(outcome)
        logger.info("[%d/%d] %s %s %s (%s)", i, len(points), point.name, outcome.status,
                    " ".join(f"{spec}={spec.sign * outcome.metrics[spec.key]:.3f}" for spec in cfg.metric_specs()
                             if spec.key in outcome.metrics),
                    _progress(outcomes, len(points), time.perf_counter() - started))
    summary, files = _write_outputs(cfg, outcomes)
    return SweepResult(outcomes=outcomes, summary=summary, files=files)
