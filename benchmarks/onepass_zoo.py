"""The one-pass zoo: every transformers causal-LM type from a tiny config, classified (issue 14).

    python benchmarks/onepass_zoo.py [--checkpointing] [--quick] [--types llama gpt2 ...] [--json PATH]

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (tiny config built generically:
hidden 32, 2 layers, 4 heads / 2 kv heads, head_dim 8, vocab 96, dropout 0, eager attention;
see ``tests/onepass_zoo.py``) prints one row: the outcome of one-pass capture (K = 2, shared
DPO pairs, 6 rows of 10 tokens), its largest relative error against K separate backwards, and
the error or refusal. Outcomes:

- ``exact``: one pass equals K backwards (rel. err <= 1e-4) and ``self_check`` passes;
- ``refused``: ``UnsupportedModuleError`` at construction;
- ``stopped``: the gradients differ and the self-check fails, or the capture pass raises;
- ``SILENTLY WRONG``: the gradients differ but the self-check passes (must never happen);
- ``FALSE ALARM``: exact, but the self-check fails (or a pinned-exact type is refused);
- ``does not build``: the tiny config, model, or its plain forward/backward fails.

For every refused type the refused parameters are then frozen (what the error suggests) and
the rest classified again (column "frozen"). The counts close the output. ``--quick`` skips
that second classification (what ``tests/test_onepass_zoo.py`` does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import onepass_zoo as zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    parser.add_argument("--quick", action="store_true", help="do not freeze and retry refused models")
    parser.add_argument("--types", nargs="*", help="model types (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    import torch
    import transformers

    torch.set_num_threads(1)
    started = time.perf_counter()
    cpu_started = time.process_time()
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, "
          f"checkpointing={'on' if args.checkpointing else 'off'}")  # fmt: skip
    print(f"{'arch':28s} {'outcome':15s} {'err':>8s} {'sec':>6s}  error / reason")

    def show(r: zoo.ZooResult) -> None:
        err = f"{r.error:.1e}" if r.error is not None else "-"
        frozen = f"  [frozen: {r.frozen_outcome}; {r.frozen_detail}]" if r.frozen_outcome else ""
        print(f"{r.arch:28s} {r.outcome:15s} {err:>8s} {r.seconds:6.2f}  {r.detail}{frozen}", flush=True)

    results = zoo.run_zoo(args.types or None, checkpointing=args.checkpointing, thorough=not args.quick, progress=show)
    counts = zoo.counts(results)
    print("\n# counts: " + ", ".join(f"{o}: {n}" for o, n in counts.items()) + f" (of {len(results)})")
    frozen = [r for r in results if r.frozen_outcome]
    if frozen:
        tally: dict[str, int] = {}
        for r in frozen:
            tally[r.frozen_outcome] = tally.get(r.frozen_outcome, 0) + 1
        print("# refused, then retried with the refused parameters frozen: "
              + ", ".join(f"{o}: {n}" for o, n in sorted(tally.items())))  # fmt: skip
    print(f"# {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU")
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "results": [asdict(r) for r in results]}, indent=1))
    bad = counts[zoo.SILENT] + counts[zoo.FALSE_ALARM] + sum(
        r.frozen_outcome in (zoo.SILENT, zoo.FALSE_ALARM) for r in results)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
