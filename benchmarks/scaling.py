"""Scaling: the hook's time per step, split into its parts, and the bytes of every collective, on N = 1, 2, 4 ranks.

    python benchmarks/scaling.py                        # N in {1,2,4} CPU ranks, ZeRO-3, K in {2,4} (~8 min here)
    python benchmarks/scaling.py --stage 2 --ks 3 --ranks 1 2 4 8
    python benchmarks/scaling.py --quick                # smoke test

One launch per N; per K a fresh engine (the ~15M-parameter Llama of _common.MEDIUM,
per-objective pairs) runs three modes, interleaved over repetitions:

- ``linear``: the weighted-loss baseline;
- ``raco``: RACO through ``RacoHook`` with one pass per objective; the hook's parts are wall time;
- ``raco_cpu``: the same step, but the hook's capture, Gram and write-back are timed with the
  calling thread's CPU clock (``time.thread_time``): on an oversubscribed machine (4 ranks on 2
  cores, other jobs) wall time includes waiting for a core, CPU time is the work itself. The
  benchmark swaps the clock in raco_ds.deepspeed.hook's ``time`` for those steps only;
- ``raco_onepass``: one-pass capture (when raco_ds.onepass supports the engine), for its collectives.

Every torch.distributed collective is counted (calls and bytes, by phase: the passes, the hook,
the optimizer step) by wrapping torch.distributed in each rank before DeepSpeed starts (DeepSpeed's
``comms_logger`` would miss the hook's Gram all-reduce, which does not go through deepspeed.comm).
The hook's only collectives are the K x K float64 Gram all-reduce (8 K^2 bytes) and the cross-rank
coefficient check (2K float64 numbers); the shard the hook works on is P/N elements, so its local
work (capture, Gram, write-back) should fall as 1/N.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MEDIUM,
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

LOCAL = ("capture", "gram", "write")
"""The hook's parts that work on the local shard (the rest: all-reduce and solve, K x K)."""


@contextlib.contextmanager
def hook_cpu_clock() -> Iterator[None]:
    """Time the hook's parts (timed in raco_ds.step, the step core) with the thread's CPU clock inside the block."""
    import raco_ds.step as step_module

    original = step_module.time
    step_module.time = types.SimpleNamespace(perf_counter=time.thread_time)
    try:
        yield
    finally:
        step_module.time = original


def _body(rank: int, world: int, counter: Any, args: Any, spec: Any) -> list[dict[str, Any]]:
    out = []
    for k in args.ks:
        data = make_pairs("objective", k, args.pairs, spec, seed=1000 * rank + k)
        engine = init_engine(spec, args.stage, micro_rows=data.input_ids.shape[0])
        steps = Steps(engine, data, [1.0 / k] * k, counter=counter)
        counts: dict[str, list[dict[str, Any]]] = {}

        def counted(mode: str, fn: Any) -> Any:
            def run() -> dict[str, float]:
                counter.take()
                result = fn()
                counts[mode] = counter.take()  # the last step's collectives (every step issues the same)
                return result

            return run

        def raco_cpu() -> dict[str, float]:
            with hook_cpu_clock():
                return steps.raco()

        modes = {"linear": steps.linear, "raco": steps.raco, "raco_cpu": raco_cpu}
        if not args.no_onepass and steps.onepass_reason() is None:
            modes["raco_onepass"] = steps.raco_onepass  # its collectives: one gather per pass, K-stacked scatter
        samples = interleave({m: counted(m, fn) for m, fn in modes.items()}, args.reps, args.warmup)
        out.append({
            "k": k, "world": world, "rank": rank, "shard": steps.hook.shard_layout.numel,
            "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
            "medians_s": {m: medians(s) for m, s in samples.items()}, "collectives": counts,
        })  # fmt: skip
        destroy_engine(engine)
    return out


def summarise(per_n: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(time lines per (N, K), collective lines per (N, K, mode, phase, op)) from rank 0 of each launch."""
    times, comms = [], []
    base_cpu: dict[int, float] = {}
    for rows in per_n:
        for row in rows:
            n, k = row["world"], row["k"]
            m = row["medians_s"]
            local_cpu = sum(m["raco_cpu"][f"hook_{p}"] for p in LOCAL)
            base_cpu.setdefault(k, local_cpu * n)  # first N (normally 1): the reference for "x N"
            line = {
                "N": n, "K": k, "shard": row["shard"], "params": row["params"],
                "linear_ms": 1e3 * m["linear"]["total"], "raco_ms": 1e3 * m["raco"]["total"],
                "ratio": m["raco"]["total"] / m["linear"]["total"], "cpu_ratio": m["raco"]["cpu"] / m["linear"]["cpu"],
                "onepass_ratio": m["raco_onepass"]["total"] / m["linear"]["total"] if "raco_onepass" in m else None,
                **{f"{p}_ms": 1e3 * m["raco"][f"hook_{p}"] for p in ("capture", "gram", "allreduce", "solve", "write")},
                "hook_ms": 1e3 * m["raco"]["hook"], "local_cpu_ms": 1e3 * local_cpu,
                "local_cpu_ns_per_element": 1e9 * local_cpu / row["shard"],
                "local_cpu_times_n_vs_first": local_cpu * n / base_cpu[k],
            }  # fmt: skip
            times.append(line)
            for mode, calls in row["collectives"].items():
                for c in calls:
                    comms.append({"N": n, "K": k, "mode": mode, **c})
    return times, comms


def main(argv: list[str] | None = None) -> None:
    """Parse flags, one launch per N, print the two tables and write the JSON."""
    parser = base_parser(__doc__, "scaling")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="numbers of objectives K")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="numbers of CPU ranks N")
    parser.add_argument("--stage", type=int, default=3, help="ZeRO stage")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per objective per rank")
    parser.add_argument("--no-onepass", action="store_true", help="skip the one-pass capture mode")
    parser.set_defaults(reps=4)
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.ranks, args.reps, args.warmup = [2], [2], 1, 0
    spec = spec_from(args, MEDIUM)
    started = machine()
    per_n = [launch(_body, n, args, spec)[0] for n in args.ranks]
    times, comms = summarise(per_n)
    print_table(
        f"Hook time per step, ZeRO-{args.stage}, P = {times[0]['params'] / 1e6:.2f}M, {args.pairs} pair(s)/objective/rank, "
        f"median of {args.reps} interleaved reps, ranks on {started['cores']} shared cores ({started['date_utc']} UTC, "
        f"load {started['load_avg_1m']})",
        ["N", "K", "shard", "linear ms", "raco ms", "ratio", "CPU ratio", "1-pass ratio", "capture", "gram", "allreduce", "solve", "write",
         "local CPU ms", "ns/elem", "CPU x N / N=first"],
        [[t["N"], t["K"], t["shard"], t["linear_ms"], t["raco_ms"], t["ratio"], t["cpu_ratio"],
          "-" if t["onepass_ratio"] is None else t["onepass_ratio"], t["capture_ms"], t["gram_ms"],
          t["allreduce_ms"], t["solve_ms"], t["write_ms"], t["local_cpu_ms"], t["local_cpu_ns_per_element"],
          t["local_cpu_times_n_vs_first"]] for t in times],
        note="ratio: RACO (K passes) / linear, wall, barrier to barrier; CPU ratio: the same in rank 0's CPU time; "
             "1-pass ratio: one-pass capture / linear, wall.\nhook parts: wall ms (median); local CPU = capture + Gram + write-back in thread CPU time (raco_cpu "
             "steps); CPU x N / N=first ~ 1 means the local work falls as 1/N.",
    )  # fmt: skip
    hook_and_linear = [c for c in comms if c["mode"] != "raco_cpu"]
    print_table(
        "Collectives per step per rank (rank 0; bytes = the message: all-reduce buffer, all-gather output, "
        "reduce-scatter input)",
        ["N", "K", "mode", "phase", "op", "dtype", "calls", "bytes"],
        [[c["N"], c["K"], c["mode"], c["phase"], c["op"], c["dtype"], c["calls"], c["bytes"]] for c in hook_and_linear],
    )  # fmt: skip
    config = {**vars(args), "model": spec_dict(spec)}
    write_json(args.json, "scaling", config, {"times": times, "collectives": comms, "raw": per_n}, started=started)


if __name__ == "__main__":
    main()
