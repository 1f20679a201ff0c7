"""Held-out evaluation of a saved model against its initial model (used by sweeps and launchers/eval.py).

The scoring and the per-objective metrics are the trainer's own (:mod:`raco_ds.trainer.eval`:
``score_pairs`` and ``evaluate``, the training loss's definitions); this module loads a saved
HF folder outside DeepSpeed, rebuilds the run's held-out split, and adds:

``kl_proxy/<objective>``
    Mean policy/reference log-ratio ``log pi(y|x) - log ref(y|x)`` (summed over the response
    tokens) on the response objective k prefers, over its held-out non-tie pairs: a sample
    estimate of how far the policy moved from the reference on preferred data (a KL proxy;
    it is not the KL under the policy's own samples).
``accuracy_disagree/<objective>``, ``margin_disagree/<objective>``, ``..._agree/...``
    Per objective on the held-out pairs where the objectives disagree / agree
    (:mod:`raco_ds.evaluation.preference`): the disagreeing pairs are the only ones on which
    the weights must matter.
``gen/<judge>``
    With generation on: the mean judge score of responses generated for the held-out prompts
    (:mod:`raco_ds.evaluation.generation`, :mod:`raco_ds.evaluation.judges`), plus
    ``gen/finished`` (the fraction that ended before the token cap). Samples and their scores
    are written as JSON lines.

Every per-pair and per-sample metric keeps its item values, so each gets a cluster-bootstrap
95% interval (clusters: the held-out prompt groups, :mod:`raco_ds.evaluation.bootstrap`) and a
sweep can resample all its models on the same items. Every metric is reported flat as
``"<metric>/<objective>"`` (``"gen/<judge>"`` for judges).

The held-out split is the trainer's (:func:`raco_ds.trainer.data.split_pairs`: whole prompt
groups, seeded by ``data.split_seed``). The reference is the run's initial model
(``model.name_or_path`` of its config); its scores are computed once per (model, data, split)
and shared by every point of a sweep. A run folder's own held-out scores (written by the
trainer after its last step) are reused instead of scoring the same pairs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raco_ds.evaluation.bootstrap import Estimate, ItemValues, estimates
from raco_ds.evaluation.generation import GenerationConfig, Sample

__all__ = [
    "EvalReport",
    "GenerationEval",
    "HeldOutEvaluator",
    "add_generation_arguments",
    "format_report",
    "generation_from_args",
    "resolve_run",
]

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """Per-objective held-out metrics of one model, with per-item values and 95% intervals."""

    objectives: list[str]
    """Objective names, in label order."""
    metrics: dict[str, list[float]]
    """Metric name -> one value per objective (see the module docstring and raco_ds.trainer.eval)."""
    model: str = ""
    """The evaluated model folder."""
    reference: str = ""
    """The reference (initial) model."""
    num_eval_pairs: int = 0
    """Held-out pairs scored."""
    num_conflict_pairs: int = 0
    """Held-out pairs on which two objectives prefer opposite responses (shared pairs)."""
    item_values: dict[str, ItemValues] = field(default_factory=dict)
    """Per-item values of the pair and generation metrics (what the bootstrap resamples)."""
    intervals: dict[str, Estimate] = field(default_factory=dict)
    """Flat metric name -> mean with its cluster-bootstrap 95% interval."""
    generation: dict[str, Any] = field(default_factory=dict)
    """How responses were generated and where the samples are (empty: no generation)."""

    def flat(self) -> dict[str, float]:
        """``{"<metric>/<objective>": value}`` plus the item metrics' means, what sweeps store."""
        out = {f"{m}/{name}": float(v) for m, values in self.metrics.items() for name, v in zip(self.objectives, values)}
        out.update({key: est.value for key, est in self.intervals.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the file launchers/eval.py writes)."""
        return {
            "model": self.model,
            "reference": self.reference,
            "objectives": self.objectives,
            "num_eval_pairs": self.num_eval_pairs,
            "num_conflict_pairs": self.num_conflict_pairs,
            "metrics": self.metrics,
            "intervals": {key: est.to_dict() for key, est in self.intervals.items()},
            "generation": self.generation,
        }


@dataclass(kw_only=True)
class GenerationEval:
    """Generation-based evaluation: which held-out prompts, how to generate, which judges."""

    config: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding settings."""
    num_prompts: int = 64
    """Distinct held-out prompts to answer (in split order; fewer if the split has fewer)."""
    judges: list[str] = field(default_factory=lambda: ["length_tokens", "length_words"])
    """Judge specs (raco_ds.evaluation.judges), e.g. length_tokens, implicit_reward, reward_model:PATH."""


def format_report(report: EvalReport) -> str:
    """A fixed-width table (one row per metric, one column per objective), then every item
    metric with its 95% interval."""
    width = max(12, *(len(n) + 2 for n in report.objectives))
    lines = [f"{'metric':<22}" + "".join(f"{n:>{width}}" for n in report.objectives)]
    for metric, values in report.metrics.items():
        lines.append(f"{metric:<22}" + "".join(f"{v:>{width}.4f}" for v in values))
    if report.intervals:
        lines.append("mean [95% cluster-bootstrap interval] (n = pairs or samples):")
        lines += [f"  {key:<40}{est} (n={est.n})" for key, est in report.intervals.items() if est.n]
    return "\n".join(lines)


def add_generation_arguments(parser: Any) -> None:
    """The generation options shared by launchers/eval.py and launchers/sweep.py (argparse)."""
    default, config = GenerationEval(), GenerationConfig()
    group = parser.add_argument_group("generation (off unless --generate)")
    group.add_argument("--generate", action="store_true", help="Generate for held-out prompts and judge the responses.")
    group.add_argument("--num-prompts", type=int, default=default.num_prompts, help="Distinct held-out prompts.")
    group.add_argument("--max-new-tokens", type=int, default=config.max_new_tokens, help="Token cap per response.")
    group.add_argument("--gen-batch-size", type=int, default=config.batch_size, help="Prompts per generate call.")
    group.add_argument("--sample", action="store_true", help="Seeded sampling instead of greedy decoding.")
    group.add_argument("--temperature", type=float, default=config.temperature, help="Sampling temperature.")
    group.add_argument("--top-p", type=float, default=config.top_p, help="Nucleus sampling mass.")
    group.add_argument("--gen-seed", type=int, default=config.seed, help="Sampling seed.")
    group.add_argument("--judges", default=",".join(default.judges),
                       help="Comma-separated judge specs (raco_ds.evaluation.judges): length_tokens, length_words, "
                            "implicit_reward, reward_model:PATH, beaver_reward:PATH, beaver_cost:PATH.")


def generation_from_args(args: Any) -> GenerationEval | None:
    """The :class:`GenerationEval` the options of :func:`add_generation_arguments` describe (None: off)."""
    if not args.generate:
        return None
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size, sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p, seed=args.gen_seed)
    judges = [j.strip() for j in args.judges.split(",") if j.strip()]
    return GenerationEval(config=config, num_prompts=args.num_prompts, judges=judges)


def resolve_run(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, the run's config.yaml or None) for a run folder or its ``export/`` folder.

    A run folder (with ``config.yaml`` and ``export/``) evaluates its exported model; an export
    folder inside a run folder finds the run's config beside it; any other HF folder has none.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such folder; pass a run folder or an exported HF model folder")
    if (path / "config.yaml").is_file() and (path / "export").is_dir():
        return path / "export", path / "config.yaml"
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is a run folder without export/; train with --checkpointing.export true, or pass a model folder"
        )
    if (path.parent / "config.yaml").is_file():
        return path, path.parent / "config.yaml"
    return path, None


@dataclass
class _Split:
    dataset: Any
    split: Any  # raco_ds.trainer.data.DataSplit
    conflict: list[int]
    collator: Any
    reference: Any  # PairScores of the initial model


class HeldOutEvaluator:
    """Evaluate saved models on their run's held-out pairs (and prompts); the reference is scored once.

    Call it as a sweep evaluator (``evaluator(point, train_dir)``) or use :meth:`evaluate`.
    """

    def __init__(
        self, batch_size: int | None = None, device: str | None = None, generation: GenerationEval | None = None
    ) -> None:
        """``batch_size``: pairs per forward (None: the run's logging.eval_batch_size);
        ``device``: where models run (None: cuda when available, else cpu);
        ``generation``: also generate for held-out prompts and judge the responses (None: pairs only)."""
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generation = generation
        self._splits: dict[str, _Split] = {}
        self._references: dict[str, Any] = {}  # reference name -> model (for the implicit_reward judge)

    @property
    def settings(self) -> dict[str, Any]:
        """What the reports measure (a sweep re-evaluates a point whose eval.json has other settings)."""
        generation = self.generation
        return {
            "evaluator": "held_out",
            "generation": None if generation is None else {
                "config": generation.config.to_dict(), "num_prompts": generation.num_prompts,
                "judges": list(generation.judges),
            },
        }  # fmt: skip

    def __call__(self, point: Any, train_dir: Path) -> EvalReport:
        """Sweep evaluator: the report of ``train_dir``'s exported model (samples beside the folder)."""
        return self.evaluate(train_dir, samples_path=Path(train_dir).parent / "generations.jsonl")

    def evaluate(
        self,
        model_path: str | Path,
        cfg: Any | None = None,
        reference: str | None = None,
        samples_path: str | Path | None = None,
    ) -> EvalReport:
        """Evaluate a run folder or model folder.

        Args:
            model_path: a run folder (its ``export/`` is evaluated) or an HF model folder.
            cfg: the :class:`~raco_ds.trainer.config.TrainConfig` giving the data, split, loss and
                reference; None: the run's saved ``config.yaml`` (required then).
            reference: override the reference model (default: ``cfg.model.name_or_path``).
            samples_path: where generated samples and their scores go (JSON lines; default
                ``<model folder>/generations.jsonl``). Unused without generation.
        """
        from raco_ds.models import load_model
        from raco_ds.trainer.config import load_config, run_config_root
        from raco_ds.trainer.eval import (
            HELDOUT_SCORES_FILE,
            PlainEngine,
            evaluate,
            heldout_items,
            load_heldout_scores,
            score_pairs,
        )

        model_dir, config_path = resolve_run(model_path)
        if cfg is None:
            if config_path is None:
                raise ValueError(
                    f"{model_dir} has no run config.yaml beside it; pass the config that says which data, split and "
                    "reference to use (launchers/eval.py: --config RUN/config.yaml or --preset/--data options)"
                )
            cfg = load_config(config_path, root=run_config_root(config_path))
        reference = reference or cfg.model.name_or_path
        run_dir = config_path.parent if config_path is not None else None
        held = self._split(cfg, reference, run_dir)
        indices = held.split.eval_indices
        batch_size = self.batch_size or cfg.logging.eval_batch_size

        policy = load_model(str(model_dir), dtype=cfg.model.dtype).to(self.device)
        scores = None
        if run_dir is not None:
            scores = load_heldout_scores(run_dir / HELDOUT_SCORES_FILE, held.dataset, indices, model_dir,
                                         cfg.model.dtype)  # fmt: skip
        if scores is None:
            scores = score_pairs(PlainEngine(policy), held.dataset, indices, batch_size, held.collator)
        loss_args = {"loss": cfg.loss.name, "beta": cfg.loss.beta}
        metrics = evaluate(scores, held.reference, held.dataset, indices, **loss_args, options=dict(cfg.loss.options))
        # KL proxy: the chosen response's log-ratio, i.e. DPO's chosen reward at beta = 1.
        metrics["kl_proxy"] = evaluate(scores, held.reference, held.dataset, indices, loss="dpo", beta=1.0)[
            "chosen_reward"
        ]
        items = heldout_items(scores, held.reference, held.dataset, indices, held.split.groups, **loss_args)
        generation: dict[str, Any] = {}
        if self.generation is not None:
            samples_path = Path(samples_path) if samples_path else model_dir / "generations.jsonl"
            gen_items, generation = self._generate(policy, model_dir, cfg, reference, held, samples_path)
            items.update(gen_items)
        del policy
        return EvalReport(
            objectives=list(held.dataset.objective_names),
            metrics={k: [float(x) for x in v] for k, v in metrics.items()},
            model=str(model_dir),
            reference=reference,
            num_eval_pairs=len(indices),
            num_conflict_pairs=len(held.conflict),
            item_values=items,
            intervals=estimates(items),
            generation=generation,
        )

    def _generate(
        self, policy: Any, model_dir: Path, cfg: Any, reference: str, held: _Split, samples_path: Path
    ) -> tuple[dict[str, ItemValues], dict[str, Any]]:
        """Generate for the held-out prompts, judge, write the samples; (items, description)."""
        from raco_ds.evaluation.generation import generate
        from raco_ds.evaluation.judges import JudgeContext, build_judge
        from raco_ds.models import load_model, load_tokenizer

        spec = self.generation
        tokenizer = load_tokenizer(str(model_dir))
        prompts, clusters, users = _held_out_prompts(held, spec.num_prompts)
        samples = generate(policy, tokenizer, prompts, spec.config, clusters, users)
        context = JudgeContext(policy=policy, tokenizer=tokenizer, beta=cfg.loss.beta, device=self.device,
                               batch_size=self.batch_size or cfg.logging.eval_batch_size)
        if "implicit_reward" in spec.judges:
            if reference not in self._references:
                self._references[reference] = load_model(reference, dtype=cfg.model.dtype).to(self.device).eval()
            context.reference = self._references[reference]
        scores = {name: build_judge(name, context).score(samples) for name in spec.judges}
        cluster_ids = [s.cluster for s in samples]
        items = {f"gen/{name}": ItemValues(values, cluster_ids) for name, values in scores.items()}
        items["gen/finished"] = ItemValues([float(s.finished) for s in samples], cluster_ids)
        _write_samples(samples_path, samples, scores)
        description = {"config": spec.config.to_dict(), "judges": list(spec.judges), "num_prompts": len(samples),
                       "decoding": spec.config.describe(), "samples": str(samples_path)}
        return items, description

    def _split(self, cfg: Any, reference: str, run_dir: Path | None) -> _Split:
        """The held-out pairs of ``cfg`` tokenised for ``reference``, with the reference's scores (cached):
        those the run in ``run_dir`` saved when they are valid for these pairs, else scored here."""
        from raco_ds.models import load_model, load_tokenizer
        from raco_ds.trainer.data import build_data
        from raco_ds.trainer.eval import PlainEngine, score_pairs
        from raco_ds.trainer.reference import saved_reference

        key = hashlib.sha256(json.dumps({
            "reference": reference, "dtype": cfg.model.dtype, "data": vars(cfg.data),
            "objectives": cfg.objectives.names,
        }, sort_keys=True, default=str).encode()).hexdigest()
        if key in self._splits:
            return self._splits[key]
        tokenizer = load_tokenizer(reference)
        dataset, collator, split, _streams = build_data(cfg, tokenizer, 0, 1)
        conflict = _conflict_pairs(dataset, split.eval_indices)
        scores = None
        if run_dir is not None and reference == cfg.model.name_or_path:
            scores = saved_reference(run_dir, dataset, split, cfg)
        source = "read from the run folder"
        if scores is None:
            model = load_model(reference, dtype=cfg.model.dtype).to(self.device)
            batch_size = self.batch_size or cfg.logging.eval_batch_size
            scores = score_pairs(PlainEngine(model), dataset, split.eval_indices, batch_size, collator)
            del model
            source = "scored"
        logger.info("held-out split: %d pairs from %d prompt groups (%d with conflicting labels); reference %s %s",
                    len(split.eval_indices), split.num_eval_groups, len(conflict), reference, source)
        self._splits[key] = _Split(dataset, split, conflict, collator, scores)
        return self._splits[key]


def _held_out_prompts(held: _Split, limit: int) -> tuple[list[list[int]], list[str], list[str | None]]:
    """Distinct held-out prompts (split order), their groups and user texts.

    A prompt is identified by its text, so one prompt that truncation rendered differently in two
    pairs is answered once (as in its first pair)."""
    seen: set[str | bytes] = set()
    prompts, clusters, users = [], [], []
    for i in held.split.eval_indices:
        ids = held.dataset[i].prompt_ids
        identity = held.split.eval_prompts[i] if held.split.eval_prompts else ids.tobytes()
        if identity in seen:
            continue
        seen.add(identity)
        prompts.append(ids.tolist())
        clusters.append(f"g{held.split.groups[i]}")
        users.append(held.split.eval_users.get(i) if held.split.eval_users else None)
        if len(prompts) == limit:
            break
    return prompts, clusters, users


def _write_samples(path: Path, samples: list[Sample], scores: dict[str, list[float]]) -> None:
    """One JSON line per sample: prompt, response, lengths, cluster and every judge's score."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    with open(tmp, "w") as fh:
        for i, sample in enumerate(samples):
            fh.write(json.dumps({
                "prompt": sample.prompt_text, "response": sample.response_text, "cluster": sample.cluster,
                "response_tokens": len(sample.response_ids), "finished": sample.finished,
                "scores": {name: values[i] for name, values in scores.items()},
            }) + "\n")
    tmp.replace(path)


def _conflict_pairs(dataset: Any, indices: list[int]) -> list[int]:
    """Held-out shared pairs on which two objectives give opposite non-tie labels."""
    if not dataset.shared:
        return []
    out = []
    for i in indices:
        labels = [x for x in dataset[i].labels if x != 0]
        if len(set(labels)) > 1:
            out.append(i)
    return out
