"""Held-out evaluation of a saved model: per-objective preference metrics with 95% intervals, and judged generations.

    # a training run's folder (its export/ is evaluated with the run's own data, split and reference)
    python launchers/eval.py --model outputs/tiny
    # any HF model folder, against the data/split/reference that trainer options describe
    python launchers/eval.py --model path/to/hf_folder --preset tiny --data.num_eval_pairs 80
    # a LoRA run's PEFT adapter folder (loaded onto the base model its adapter_config.json names, merged)
    python launchers/eval.py --model outputs/lora/export_adapter
    # a different reference than the config's initial model
    python launchers/eval.py --model outputs/tiny --reference tiny
    # also generate (greedy, <= 128 new tokens) for 64 held-out prompts and judge the responses
    python launchers/eval.py --model outputs/raco --generate --judges length_tokens,length_words,implicit_reward
    # the PKU-SafeRLHF judges on a GPU (download the two beaver folders first)
    python launchers/eval.py --model outputs/raco --generate --device cuda --judges \\
        beaver_reward:/models/beaver-7b-v1.0-reward,beaver_cost:/models/beaver-7b-v1.0-cost

Options other than the ones below are launchers/train.py options (``--preset``, ``--config``,
``--data.*``, ``--loss``, ``--beta``, ``--seed`` ...): they say which held-out pairs (the
trainer's seeded split), which loss definitions and which reference to use. Given for a run
folder, they override its saved config.yaml.

Metrics (one column per objective) are printed and written as JSON (``--output``; default
``<model folder>/heldout_eval.json``). See raco_ds.pareto.evaluate for their definitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raco_ds.pareto.evaluate import (  # noqa: E402
    HeldOutEvaluator,
    add_generation_arguments,
    format_report,
    generation_from_args,
    resolve_run,
)
from raco_ds.trainer.config import ConfigError, TrainConfig, parse_args, run_config_root  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the table, write the JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="A run folder (with config.yaml and export/), an HF model folder "
                                                     "or a PEFT adapter folder.")
    p.add_argument("--reference", default=None, help="Reference model (default: the config's model.name_or_path).")
    p.add_argument("--output", default=None, help="JSON file to write (default: <model folder>/heldout_eval.json).")
    p.add_argument("--batch-size", type=int, default=None, help="Pairs per forward (default: logging.eval_batch_size).")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    p.add_argument("--samples", default=None, help="JSON-lines file of the generated samples and their scores "
                                                    "(default: <model folder>/generations.jsonl).")
    add_generation_arguments(p)
    args, train_options = p.parse_known_args(sys.argv[1:] if argv is None else argv)

    try:
        model_dir, run_config = resolve_run(args.model)
        cfg = None
        if train_options or run_config is None:
            if run_config is not None and "--config" not in train_options:
                train_options = ["--config", str(run_config), *train_options]
            cfg = parse_args(train_options, root=TrainConfig if run_config is None else run_config_root(run_config))
        evaluator = HeldOutEvaluator(batch_size=args.batch_size, device=args.device,
                                     generation=generation_from_args(args))
        report = evaluator.evaluate(args.model, cfg, reference=args.reference, samples_path=args.samples)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(f"model: {report.model}\nreference: {report.reference}\n"
          f"held-out pairs: {report.num_eval_pairs} ({report.num_conflict_pairs} with conflicting labels)")
    print(format_report(report))
    if report.generation:
        print(f"generations ({report.generation['decoding']}, {report.generation['num_prompts']} prompts): "
              f"{report.generation['samples']}")
    out = Path(args.output) if args.output else model_dir / "heldout_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
