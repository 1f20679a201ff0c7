"""Overhead: RACO vs the weighted-loss baseline (DPO-LW) on the same engine and data, in one run.

    python benchmarks/overhead.py                                   # ZeRO 2+3, both shapes, K 2+4, 2 CPU ranks (~2 min)
    python benchmarks/overhead.py --stages 3 --ks 3 --reps 9 --json benchmarks/results/overhead_z3.json
    python benchmarks/overhead.py --quick                           # smoke test (tiny model, 1 rep)

For each (ZeRO stage, data shape, K) one fresh engine and one fixed batch per
rank (B = K x --pairs DPO pairs, 2B rows) run, interleaved over repetitions in
rotating order (medians of each mode):

- ``linear``       the baseline: one forward over all 2B rows, one backward of sum_k w_k L_k, ``engine.step()``;
- ``raco``         through ``RacoHook``: per-objective pairs one forward+backward per objective over its own
                   rows (the same FLOPs as the baseline); shared pairs ``hook.backward_shared``: one forward and
                   K backwards on ZeRO 0-2, K forwards and K backwards on ZeRO-3 (HOOKS.md);
- ``raco_onepass`` one-pass capture (raco_ds.onepass) filling the hook's buffer: one forward, one backward.

The table gives each mode's step time (barrier to barrier: the slowest rank),
its ratio to ``linear`` and the floor the design allows for that mode:

- 1.0 when RACO does the baseline's FLOPs (per-objective pairs, one-pass capture);
- (F + K*B) / (F + B) for shared pairs with one forward and K backwards, F and B the
  baseline's measured forward and backward times; K for K forwards and K backwards (ZeRO-3);
- the same with the optimizer step S added to numerator and denominator ("floor+S"),
  which is the floor of the whole-step ratio actually measured.

The hook's own time (capture, Gram, all-reduce, solve, write-back) is given in ms and %.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SHAPES,
    ModelSpec,
    Steps,
    base_parser,
    destroy_engine,
    init_engine,
    interleave,
    launch,
    machine,
    make_pairs,
    medians,
    print_table,
    spec_dict,
    spec_from,
    write_json,
)

DEFAULT = ModelSpec(vocab=512, hidden=128, layers=2, seq=64)


def _floor(mode: str, shape: str, stage: int, k: int, m: dict[str, float]) -> tuple[float, float, str]:
    """(floor, floor with the optimizer step, what the mode runs) relative to the baseline's medians ``m``."""
    if mode == "raco" and shape == "shared":
        forwards, backwards = (k if stage == 3 else 1), k
        passes = f"{forwards}F+{backwards}B"
    else:  # the baseline's rows and FLOPs: split into K passes over 1/K of the rows each, or one pass
        forwards = backwards = 1
        passes = f"{k}x(F+B)/{k}" if mode == "raco" else "1F+1B"
    f, b, s = m["forward"], m["backward"], m["optimizer"]
    return (forwards * f + backwards * b) / (f + b), (forwards * f + backwards * b + s) / (f + b + s), passes


def _body(rank: int, world: int, counter: Any, args: Any, spec: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for stage in args.stages:
        for shape in args.shapes:
            for k in args.ks:
                data = make_pairs(shape, k, args.pairs, spec, seed=1000 * rank + k)
                engine = init_engine(spec, stage, micro_rows=data.input_ids.shape[0])
                steps = Steps(engine, data, [1.0 / k] * k)
                modes = {"linear": steps.linear, "raco": steps.raco}
                reason = steps.onepass_reason() if not args.no_onepass else "--no-onepass"
                if reason is None:
                    modes["raco_onepass"] = steps.raco_onepass
                samples = interleave(modes, args.reps, args.warmup)
                rows.append({
                    "stage": stage, "shape": shape, "k": k, "rows_per_rank": int(data.input_ids.shape[0]),
                    "onepass_skipped": reason, "medians_s": {mode: medians(s) for mode, s in samples.items()},
                    "samples_s": samples,
                })  # fmt: skip
                destroy_engine(engine)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (stage, shape, K, mode): ms/step, ratio to linear, floors, hook share."""
    out = []
    for row in rows:
        base = row["medians_s"]["linear"]
        for mode, m in row["medians_s"].items():
            floor, floor_s, passes = _floor(mode, row["shape"], row["stage"], row["k"], base)
            # Per repetition the modes ran back to back: the spread of these paired ratios shows the noise.
            paired = [a["total"] / b["total"] for a, b in zip(row["samples_s"][mode], row["samples_s"]["linear"], strict=True)]
            q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
            out.append({
                "stage": row["stage"], "shape": row["shape"], "k": row["k"], "mode": mode,
                "passes": passes, "ms": 1e3 * m["total"], "ratio": m["total"] / base["total"],
                "paired_ratio_q1": q1, "paired_ratio_q3": q3, "cpu_ratio": m["cpu"] / base["cpu"],
                "floor": floor if mode != "linear" else 1.0, "floor_with_step": floor_s if mode != "linear" else 1.0,
                "hook_ms": 1e3 * m.get("hook", 0.0), "hook_pct": 100 * m.get("hook", 0.0) / m["total"],
                "F_ms": 1e3 * base["forward"], "B_ms": 1e3 * base["backward"], "S_ms": 1e3 * base["optimizer"],
            })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run on ``--ranks`` CPU ranks, print the table and write the JSON."""
    parser = base_parser(__doc__, "overhead")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="ZeRO stages")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES, help="data shapes")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="numbers of objectives K")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per objective per rank (B = K x pairs)")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (gloo)")
    parser.add_argument("--no-onepass", action="store_true", help="skip the one-pass capture mode")
    args = parser.parse_args(argv)
    if args.quick:
        args.stages, args.shapes, args.ks, args.reps, args.warmup, args.pairs = [3], ["shared"], [2], 1, 0, 1
    spec = spec_from(args, DEFAULT)
    started = machine()
    rows = launch(_body, args.ranks, args, spec)[0]  # rank 0's view; totals are barrier to barrier
    lines = summarise(rows)
    print_table(
        f"RACO vs linear: {args.ranks} CPU ranks, P = {spec.num_params() / 1e6:.2f}M, {args.pairs} pairs/objective/rank "
        f"x {spec.seq} tokens, median of {args.reps} interleaved reps ({started['date_utc']} UTC, load {started['load_avg_1m']})",
        ["ZeRO", "shape", "K", "mode", "passes", "ms/step", "ratio", "paired IQR", "CPU ratio", "floor", "floor+S", "hook ms", "hook %"],
        [[r["stage"], r["shape"], r["k"], r["mode"], r["passes"], r["ms"], r["ratio"],
          f"{r['paired_ratio_q1']:.2f}-{r['paired_ratio_q3']:.2f}", r["cpu_ratio"], r["floor"],
          r["floor_with_step"], r["hook_ms"], r["hook_pct"]] for r in lines],
        note="ratio = median step / median linear step; paired IQR = quartiles of the per-repetition ratios; CPU ratio = the same with rank 0's CPU time "
             "per step (the work, without waiting for a core on this shared machine); floor = (nF*F + nB*B)/(F + B) for passes nF F + nB B, with the "
             "baseline's forward F and backward B; floor+S adds its optimizer step S to both;\n"
             "K x (F+B)/K = one pass per objective over its own rows (the baseline's FLOPs, but K gradient reductions).\n"
             + "".join(f"one-pass not run for ZeRO-{r['stage']} {r['shape']} K={r['k']}: {r['onepass_skipped']}\n"
                       for r in rows if r["onepass_skipped"]),
    )  # fmt: skip
    config = {**vars(args), "model": spec_dict(spec)}
    write_json(args.json, "overhead", config, {"summary": lines, "raw": rows}, started=started)


if __name__ == "__main__":
    main()
