"""Pareto sweep: one training run per (aggregator, weight vector), held-out evaluation, CSV/JSON/PNG.

    # 3 aggregators x 5 weights of the tiny preset (single-process CPU runs)
    python launchers/sweep.py --output-dir outputs/pareto-tiny -- --preset tiny --max-steps 12
    # HelpSteer helpfulness vs conciseness, 2 seeds, generation judged by length; the fronts and the
    # steering statistic use helpfulness accuracy on disagreeing pairs and the negated response length
    python launchers/sweep.py --output-dir outputs/hs --objectives helpfulness,concise --seeds 0,1 \\
        --generate --metrics accuracy_disagree/helpfulness,-gen/length_tokens -- --data helpsteer
    # train now, evaluate later (or in a second process while the first trains): --no-eval / --eval-only
    # K = 3 simplex grid with step 0.5, two aggregators, each point on 2 DeepSpeed ranks
    python launchers/sweep.py --objectives a,b,c --grid-step 0.5 --aggregators raco,linear \\
        --train-command "deepspeed --num_gpus 2 launchers/train.py" -- --data my_k3.jsonl

Everything after ``--`` goes unchanged to every training run (launchers/train.py options). Run
the same command again to resume: finished points are skipped, crashed ones retrained.
Exit status 1 when a point failed (its log is named in the output).

Per aggregator it reports, with 95% bootstrap intervals (items resampled by prompt group, shared
by all models; seeds resampled per weight vector): the per-weight means, the front's
hypervolume, the steering statistic (Spearman of w_k against objective k's metric) and the
training-curve roughness; results.json has every point's metrics and pareto.png the fronts with
error bars and one steering panel per objective (raco_ds.pareto.statistics).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raco_ds.pareto.evaluate import HeldOutEvaluator, add_generation_arguments, generation_from_args  # noqa: E402
from raco_ds.pareto.grid import parse_weights  # noqa: E402
from raco_ds.pareto.sweep import SweepConfig, SweepResult, run_sweep  # noqa: E402
from raco_ds.trainer.config import field_docs  # noqa: E402  (field docstrings -> --help)


def build_parser() -> argparse.ArgumentParser:
    """The command line; each option's help is its SweepConfig field docstring."""
    docs = field_docs(SweepConfig)
    default = SweepConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=default.output_dir, help=docs["output_dir"])
    p.add_argument("--aggregators", default=",".join(default.aggregators), help=docs["aggregators"] + " Comma-separated.")
    p.add_argument("--objectives", default=",".join(default.objectives), help=docs["objectives"] + " Comma-separated.")
    p.add_argument("--weights", default=None, help=docs["weights"] + " Format: '0,1;0.5,0.5;1,0'.")
    p.add_argument("--grid-step", type=float, default=default.grid_step, help=docs["grid_step"])
    p.add_argument("--seeds", default=",".join(map(str, default.seeds)), help=docs["seeds"] + " Comma-separated.")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="Train only; a later call without --no-eval evaluates the trained points.")
    p.add_argument("--eval-only", dest="train", action="store_false",
                   help="Only evaluate the points already trained (e.g. a second process scoring finished points "
                        "while the first one trains the rest).")
    p.add_argument("--train-command", default=None, help=docs["train_command"] + " One shell-quoted string.")
    p.add_argument("--max-attempts", type=int, default=default.max_attempts, help=docs["max_attempts"])
    p.add_argument("--timeout-s", type=float, default=None, help=docs["timeout_s"])
    p.add_argument("--resume-crashed", action="store_true", help=docs["resume_crashed"])
    p.add_argument("--metrics", default=None, help=docs["metrics"] + " Comma-separated.")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for each training run and torch threads of the evaluation in this process "
                        "(default: inherit). On a shared CPU, 1 avoids threads spin-waiting for a descheduled "
                        "partner: generation ran about 9x faster with 1 than with 2 threads on a loaded 2-core VM.")
    p.add_argument("--eval-batch-size", type=int, default=None, help="Pairs per evaluation forward (default: the run's).")
    add_generation_arguments(p)
    return p


def config_from_args(argv: list[str]) -> tuple[SweepConfig, argparse.Namespace]:
    """Split ``argv`` at ``--`` and build the :class:`SweepConfig` (ValueError on bad settings)."""
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(ours)
    objectives = [x.strip() for x in args.objectives.split(",") if x.strip()]
    cfg = SweepConfig(
        output_dir=args.output_dir,
        aggregators=[x.strip() for x in args.aggregators.split(",") if x.strip()],
        objectives=objectives,
        weights=[list(w) for w in parse_weights(args.weights, len(objectives))] if args.weights else None,
        grid_step=args.grid_step,
        seeds=[int(x) for x in args.seeds.split(",") if x.strip()],
        evaluate=args.evaluate,
        train=args.train,
        train_args=train_args,
        train_command=shlex.split(args.train_command) if args.train_command else None,
        max_attempts=args.max_attempts,
        timeout_s=args.timeout_s,
        resume_crashed=args.resume_crashed,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        env={"OMP_NUM_THREADS": str(args.threads)} if args.threads else {},
    )
    return cfg, args


def summary_table(cfg: SweepConfig, result: SweepResult) -> str:
    """Markdown: one row per point (its front metrics), then one row per aggregator with 95% intervals."""
    specs = cfg.metric_specs()
    lines = ["| aggregator | weights | seed | " + " | ".join(map(str, specs)) + " | train s |",
             "|---" * (len(specs) + 4) + "|"]
    for o in result.outcomes:
        cells = [f"{spec.sign * o.metrics[spec.key]:.3f}" if spec.key in o.metrics else "-" for spec in specs]
        seconds = o.status if o.status in ("failed", "pending") else f"{o.train_seconds:.1f}"
        weights = ",".join(f"{w:g}" for w in o.point.weights)
        lines.append(f"| {o.point.aggregator} | {weights} | {o.point.seed} | " + " | ".join(cells) + f" | {seconds} |")
    objs = cfg.objectives
    lines += ["", "| aggregator | hypervolume | " + " | ".join(f"steering {o} (Spearman)" for o in objs)
              + " | roughness | front |", "|---" * (4 + len(objs)) + "|"]

    def ci(e: dict) -> str:
        return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"

    for name, s in result.summary.items():
        steering = " | ".join(ci(e) for e in s["steering"])
        front = "; ".join(",".join(f"{w:g}" for w in ws) for ws in s["front"])
        lines.append(f"| {name} | {ci(s['hypervolume'])} | {steering} | {ci(s['roughness'])} | {front} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; print the table and where the files are."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg, args = config_from_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    evaluator = HeldOutEvaluator(batch_size=args.eval_batch_size, generation=generation_from_args(args))
    result = run_sweep(cfg, evaluator)
    print(summary_table(cfg, result))
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    for o in result.failed:
        print(f"FAILED {o.point.name}: see {o.point.folder(cfg.output_dir) / 'train.log'}", file=sys.stderr)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
