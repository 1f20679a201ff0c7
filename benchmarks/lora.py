"""LoRA vs full fine-tuning, K-pass and one-pass capture, side by side: step time and memory per rank.

    python benchmarks/lora.py                                   # tiny model, 2 CPU ranks, ZeRO-3 (~3 min here)
    python benchmarks/lora.py --model smollm2-135m --steps 4 --ranks 2
    python benchmarks/lora.py --ds-config ds_configs/zero2.json --lora-r 8

Each of the four modes is one real training launch (``deepspeed --num_gpus N
launchers/train.py``, the same preset, data, seed and steps; all blocks trained,
or LoRA on every block linear layer), read back from its ``metrics.jsonl`` and
log. Reported per mode:

- ``trainable``: trainable parameters (what the engine, the K shards and the Gram see);
- ``shard/rank``: elements of each rank's gradient shard (RacoHook holds K of them, fp32: exact);
- ``peak RSS GiB``: rank 0's peak resident memory at the last step (CPU) -- the whole process;
- ``step s``: median ``time/step`` over the steps after the first (the first one holds the one-pass
  self-check and warm-up).

The modes run one after another (not interleaved), so on a shared machine compare ratios
of a run with themselves, not absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = [("full", "k_pass"), ("full", "onepass"), ("lora", "k_pass"), ("lora", "onepass")]


def _launch(args: argparse.Namespace, tuning: str, capture: str, out: Path) -> dict[str, float | str]:
    """One training launch of ``tuning`` ("full" or "lora") with ``capture``; its measured row."""
    options = ["--preset", "tiny", "--model", args.model, "--model.trainable_last_blocks", "-1",
               "--max-steps", str(args.steps), "--capture", capture, "--ds_config", args.ds_config,
               "--output-dir", str(out), "--logging.eval_every", "0", "--logging.tensorboard", "false",
               "--logging.progress_bar", "false", "--checkpointing.export", "false"]  # fmt: skip
    if tuning == "lora":
        options += ["--model.lora.r", str(args.lora_r)]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
               str(REPO / "launchers" / "train.py"), *options]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{tuning}/{capture} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trainable = re.search(r"([\d.]+)M trainable", result.stdout)
    shard = re.search(r"shard (\d+) elements/rank", result.stdout)
    ran = re.search(r"capture (onepass|k_pass)", result.stdout)
    return {
        "mode": f"{tuning} {capture}",
        "capture_ran": ran.group(1) if ran else "?",
        "trainable_M": float(trainable.group(1)) if trainable else float("nan"),
        "shard_per_rank": int(shard.group(1)) if shard else -1,
        "peak_rss_GiB_rank0": records[-1]["memory/peak_rss_gib"],
        "step_s": statistics.median(r["time/step"] for r in records[1:]) if len(records) > 1 else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the four modes and print the table (and the JSON rows with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="A raco_ds short name or an HF folder (default: tiny).")
    p.add_argument("--ranks", type=int, default=2, help="Ranks (CPU ranks without a GPU).")
    p.add_argument("--steps", type=int, default=4, help="Optimizer steps per mode (the first is not timed).")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank.")
    p.add_argument("--ds-config", default="ds_configs/zero3.json", help="DeepSpeed config.")
    p.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tuning, capture in MODES:
            rows.append(_launch(args, tuning, capture, Path(tmp) / f"{tuning}_{capture}"))
            print(f"done: {rows[-1]['mode']}", file=sys.stderr, flush=True)
    print(f"{args.model}, {args.ranks} ranks, {Path(args.ds_config).name}, LoRA r={args.lora_r}, "
          f"{args.steps} steps per mode")  # fmt: skip
    print(f"{'mode':<16}{'capture ran':>12}{'trainable M':>13}{'shard/rank':>12}{'peak RSS GiB':>14}{'step s':>9}")
    for r in rows:
        print(f"{r['mode']:<16}{r['capture_ran']:>12}{r['trainable_M']:>13.3f}{r['shard_per_rank']:>12}"
              f"{r['peak_rss_GiB_rank0']:>14.3f}{r['step_s']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
