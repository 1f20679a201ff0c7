"""RACO hook overhead vs the weighted-loss (linear, DPO-LW) step, and the three ways to get K gradients.

Two modes, each on one engine per configuration with its repetitions interleaved
(so drift and noisy neighbours hit every variant alike).

Default mode: the RACO hook's breakdown against the linear step::

    python benchmarks/hook_overhead.py                      # 2 CPU ranks, ZeRO-2, K=2, ~1-2 min
    python benchmarks/hook_overhead.py --stage 3 --objectives 3 --reps 8

Each repetition runs, on the same DeepSpeed engine and the same micro-batches,
one step of each variant, alternating which goes first:

- linear: one forward per objective's micro-batch, ONE backward of sum_k w_k L_k, ``engine.step()``;
- raco:   per objective ``with hook.objective(k)``: forward + ``hook.backward(L_k)``; ``hook.step()``.

It prints the median ms/step of each, their ratio, the hook's own breakdown
(capture, Gram, all-reduce, solve, write-back; median ms and % of the RACO
step), the Gram against the time to read the K shards once, and the hook's
extra memory per rank against (K-1) x shard x 4 bytes.

Capture mode (``--captures``): one-pass capture vs K passes vs the weighted loss::

    python benchmarks/hook_overhead.py --captures           # ZeRO 2/3 x both shapes x K 2/4, 2 CPU ranks, a few min
    python benchmarks/hook_overhead.py --captures --stages 3 --ks 2 --reps 15 --bucket-numel 65536
    python benchmarks/hook_overhead.py --captures --device cuda --world 1     # one GPU (nccl)

Per (ZeRO stage, data shape, K), on one engine, it times the forward+backward
part of a step with the gradients left in a (K, shard) buffer (the optimizer
step is the same in every variant, so it is left out), interleaved over the
repetitions in alternating order (forward, then reversed):

- weighted: one forward, ``engine.backward(sum_k w_k L_k)`` (the baseline; no per-objective gradients);
- kpass:    per objective one forward + ``engine.backward(L_k)`` + shard capture
            (shared pairs: every pass sees all rows; per-objective rows: only its own rows);
- onepass:  one forward and one backward through ``DeepSpeedOnePass`` streaming each parameter's
            K gradients into the bound shard buffer during the backward, then ``scatter_into``
            (order check, DeepSpeed's backward epilogue).

Data shapes: ``shared`` (every objective labels every pair, with ties) and
``objective_rows`` (each pair belongs to one objective). Per row it reports the
median wall time of ``weighted`` and the other two as ratios of medians to it
(wall: barrier to barrier, the slowest rank's step), the same ratios of rank 0's
CPU time per call (``time.process_time``: steadier than wall time on a shared
machine, since it leaves out waiting for a core), the quartiles of the
per-repetition onepass/weighted ratios (the noise), the time one pass spent in
its reductions on the main thread (``DeepSpeedOnePass.scatter.seconds``: staging,
issuing, and waiting for the asynchronous collectives it cannot overlap), and one
pass's peak full-size gradient memory per rank (capture buffers + scatter staging
+ collectives in flight) against K full gradients.
The last line checks the target: one pass <= 1.10x weighted at ZeRO-3, K = 2.
Results go to ``--out`` as JSON.

``--device cuda`` runs the ranks on GPUs (nccl, rank r on GPU r; clocks read after
``torch.cuda.synchronize()``); the default is CPU ranks on gloo.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "tests"))  # multirank.run_ranks; test_onepass's batch and row_logps
sys.path.insert(0, str(_REPO))

TARGET = 1.10
"""One-pass capture's goal: at most this times the weighted-loss step's forward+backward (ZeRO-3, K = 2)."""

# Sizes per mode when the flag is not given. The capture mode's model (6.5M parameters, 1K tokens per
# rank) is big enough that the matmuls, not Python's per-module cost, dominate the step, and runs the
# whole grid in about 3 minutes on 2 CPU ranks; --hidden 64 --seq 64 shows the fixed-cost regime.
_DEFAULT_SIZES = {
    "hook": {"hidden": 128, "layers": 2, "vocab": 512, "seq": 64, "reps": 6},
    "captures": {"hidden": 256, "layers": 4, "vocab": 512, "seq": 128, "reps": 7},
}


def _model(args: argparse.Namespace) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------------
# Default mode: RACO hook vs linear


def _batches(args: argparse.Namespace, rank: int) -> list[torch.Tensor]:
    # One fixed micro-batch per objective and rank: the same data for both modes.
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g) for _ in range(args.objectives)]


def _loss(engine, tokens: torch.Tensor, k: int) -> torch.Tensor:
    # Objective k predicts a shifted copy of the tokens: different, partly conflicting targets.
    logits = engine(input_ids=tokens).logits
    labels = (tokens + k) % logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def _hook_body(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    import deepspeed

    from raco_ds.deepspeed import RacoHook

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the group run_ranks made
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    model = _model(args)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    weights = [1.0 / args.objectives] * args.objectives
    hook = RacoHook(engine, weights, aggregator="raco", c=0.4)
    batches = _batches(args, rank)

    def linear_step() -> None:
        total = sum(w * _loss(engine, tokens, k) for k, (w, tokens) in enumerate(zip(weights, batches)))
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(total)
        engine.step()

    def raco_step():
        for k, tokens in enumerate(batches):
            with hook.objective(k):
                hook.backward(_loss(engine, tokens, k))
        return hook.step()

    times: dict[str, list[float]] = {"linear": [], "raco": []}
    parts: dict[str, list[float]] = {p: [] for p in ("capture", "gram", "allreduce", "solve", "write")}
    for rep in range(args.warmup + args.reps):
        order = ("linear", "raco") if rep % 2 == 0 else ("raco", "linear")
        for mode in order:
            torch.distributed.barrier()
            started = time.perf_counter()
            stats = raco_step() if mode == "raco" else linear_step()
            elapsed = time.perf_counter() - started
            if rep >= args.warmup:
                times[mode].append(elapsed)
                if mode == "raco":
                    for part, values in parts.items():
                        values.append(getattr(stats, f"seconds_{part}"))

    # The Gram's floor: reading the K shards once.
    shards = torch.randn(args.objectives, hook.shard_layout.numel)
    reads = []
    for _ in range(20):
        started = time.perf_counter()
        shards.sum()
        reads.append(time.perf_counter() - started)
    if rank != 0:
        return
    ms = {mode: 1e3 * statistics.median(values) for mode, values in times.items()}
    part_ms = {p: 1e3 * statistics.median(v) for p, v in parts.items()}
    shard, k = hook.shard_layout.numel, args.objectives
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    print(f"\n== RACO hook overhead: ZeRO-{args.stage}, {world} CPU ranks, K={k}, {n_params / 1e6:.2f}M params, "
          f"micro-batch {args.micro_batch}x{args.seq}, {args.reps} interleaved reps (median) ==")  # fmt: skip
    print(f"linear (weighted loss, one backward) : {ms['linear']:8.1f} ms/step")
    print(f"raco   (K passes + hook)             : {ms['raco']:8.1f} ms/step")
    print(f"ratio raco / linear                  : {ms['raco'] / ms['linear']:8.3f}")
    hook_ms = sum(part_ms.values())
    print(
        f"hook total                           : {hook_ms:8.2f} ms  ({100 * hook_ms / ms['raco']:.1f}% of the RACO step)"
    )
    for p, value in part_ms.items():
        print(f"  {p:10s}                         : {value:8.3f} ms")
    read_ms = 1e3 * statistics.median(reads)
    print(
        f"Gram vs reading the K shards once    : {part_ms['gram']:.3f} ms vs {read_ms:.3f} ms ({part_ms['gram'] / read_ms:.1f}x)"
    )
    extra, target = hook.buffer_bytes, (k - 1) * shard * 4
    print(
        f"extra memory per rank                : {extra / 2**20:.3f} MiB (hook buffers, shard = {shard} elements); "
        f"(K-1) x shard x 4 B = {target / 2**20:.3f} MiB ({extra / target:.2f}x)"
    )


# ---------------------------------------------------------------------------------------------------
# Capture mode: weighted vs K passes vs one pass


CAPTURES = ("weighted", "kpass", "onepass")
"""The capture mode's variants, in their forward order (odd repetitions run them reversed)."""


def _quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method: within the data; one value gives itself twice)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def _summarise(shape: str, k: int, wall: dict[str, list[float]], cpu: dict[str, list[float]],
               reduce_s: list[float], peak_bytes: int, full_bytes: int) -> dict[str, Any]:
    """One result row: medians in ms, ratios to ``weighted`` (wall and CPU), the paired-ratio IQR, memory."""
    med = {m: statistics.median(v) for m, v in wall.items()}
    cpu_med = {m: statistics.median(v) for m, v in cpu.items()}
    paired = [o / w for o, w in zip(wall["onepass"], wall["weighted"], strict=True)]
    return {
        "shape": shape, "k": k, "reps": len(paired),
        "ms": {m: 1e3 * v for m, v in med.items()},
        "cpu_ms": {m: 1e3 * v for m, v in cpu_med.items()},
        "kpass_x": med["kpass"] / med["weighted"], "onepass_x": med["onepass"] / med["weighted"],
        "kpass_cpu_x": cpu_med["kpass"] / cpu_med["weighted"], "onepass_cpu_x": cpu_med["onepass"] / cpu_med["weighted"],
        "onepass_x_iqr": list(_quartiles(paired)),
        "onepass_reduce_ms": 1e3 * statistics.median(reduce_s),
        "peak_mib": {"onepass": peak_bytes / 2**20, "k_full_gradients": full_bytes / 2**20},
        "samples_s": {"wall": wall, "cpu": cpu, "onepass_reduce": reduce_s},
    }  # fmt: skip


def _measure(engine: Any, strategy: Any, data: dict[str, torch.Tensor], shape: str, k: int, rank: int,
             args: argparse.Namespace, sync: Callable[[], None]) -> dict[str, Any]:
    """One (shape, K) row on ``engine``: warm-up, then the three variants interleaved over ``args.reps``."""
    from test_onepass import _labels, row_logps

    from raco_ds.losses import losses_from_margins, margin_jacobian
    from raco_ds.deepspeed.onepass import DeepSpeedOnePass
    from raco_ds.onepass import objective_row_coefficients, shared_pair_coefficients

    device = data["input_ids"].device
    b = data["input_ids"].shape[0] // 2
    ref = torch.full((2 * b,), -30.0, device=device)  # constant reference log-probs: the same in every variant
    # (K, B) in {+1, -1, 0}, the tests' labels. Shared: every objective labels every pair (ties
    # included). Objective rows: pair r belongs to objective r mod K only.
    labels = _labels(shape, k, b, seed=5 + rank).to(device)
    w = torch.full((k,), 1.0 / k, device=device)
    shard = torch.zeros(k, strategy.shard_layout.numel, device=device)

    def margins_of(logps: torch.Tensor) -> torch.Tensor:
        return (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])

    def weighted() -> None:
        engine.set_gradient_accumulation_boundary(True)
        losses = losses_from_margins(margins_of(row_logps(engine, data)), labels, beta=0.2)
        engine.backward((w * losses).sum())
        strategy.clear()

    def kpass() -> None:
        for obj in range(k):
            strategy.begin_objective()
            engine.set_gradient_accumulation_boundary(True)
            if shape == "shared":
                d, lab = data, labels
            else:  # only this objective's pairs: rows [pairs, pairs + B]
                pairs = torch.nonzero(labels[obj] != 0).flatten()
                rows = torch.cat([pairs, pairs + b])
                d = {n: v[rows] for n, v in data.items()}
                lab = labels[:, pairs]
            logps = row_logps(engine, d)
            n = lab.shape[1]
            m = (logps[:n] - ref[:n]) - (logps[n:] - ref[b : b + n])
            engine.backward(losses_from_margins(m, lab, beta=0.2)[obj])
            strategy.capture(shard[obj])
        strategy.clear()

    adapter = DeepSpeedOnePass(engine, k, strategy, shard_buffer=shard, bucket_numel=args.bucket_numel,
                               max_in_flight=args.max_in_flight)  # fmt: skip
    reduce_s: list[float] = []

    def onepass() -> None:
        before = adapter.scatter.seconds
        adapter.zero()
        with adapter.record():
            margins = margins_of(row_logps(adapter.forward, data))  # engine.module: see DeepSpeedOnePass
            if shape == "shared":
                adapter.backward(margins.sum(), shared_pair_coefficients(margin_jacobian(margins, labels, beta=0.2)))
            else:
                losses = losses_from_margins(margins, labels, beta=0.2)
                owner = (labels != 0).long().argmax(0)
                adapter.backward(losses.sum(), objective_row_coefficients(torch.cat([owner, owner]), k))
        adapter.scatter_into(shard)
        reduce_s.append(adapter.scatter.seconds - before)

    variants: dict[str, Callable[[], None]] = {"weighted": weighted, "kpass": kpass, "onepass": onepass}
    for fn in variants.values():  # warm-up (allocator, ZeRO-3 gathers, autograd graphs)
        fn()
    del reduce_s[:]
    wall: dict[str, list[float]] = {m: [] for m in CAPTURES}
    cpu: dict[str, list[float]] = {m: [] for m in CAPTURES}
    for rep in range(args.reps):
        for m in CAPTURES if rep % 2 == 0 else CAPTURES[::-1]:
            sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            variants[m]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            cpu[m].append(time.process_time() - cpu_started)  # this rank's own work, before waiting for others
            sync()
            wall[m].append(time.perf_counter() - started)
    adapter.remove()
    peak = adapter.capture.peak_buffer_bytes + adapter.scatter.peak_transient_bytes
    full_bytes = k * 4 * sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    return _summarise(shape, k, wall, cpu, reduce_s, peak, full_bytes)


def _captures_body(rank: int, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import warnings

    import deepspeed
    from _common import destroy_engine
    from test_onepass import batch

    from raco_ds.deepspeed.layout import EngineLayout
    from raco_ds.deepspeed.shards import make_strategy

    # torch 2.13 deprecates the *_tensor collective names that DeepSpeed and raco_ds still call: one
    # warning per call would bury the table.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    def sync() -> None:
        # Every rank done with the call (and, on GPU, its kernels) before a clock is read.
        if device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()

    rows_out = []
    for stage in args.stages:
        model = _model(args).train().to(device)
        if args.checkpointing:
            from raco_ds.models import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        config = {"train_micro_batch_size_per_gpu": 2 * args.pairs, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}  # fmt: skip
        # lr 0: the optimizer is never stepped; DeepSpeed only needs one to build its ZeRO partitioning.
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
        strategy = make_strategy(engine, EngineLayout.from_engine(engine))
        data = {n: v.to(device) for n, v in batch(args.pairs, seq=args.seq, vocab=args.vocab, seed=10 + rank).items()}
        for shape in args.shapes:
            for k in args.ks:
                rows_out.append({"stage": stage, **_measure(engine, strategy, data, shape, k, rank, args, sync)})
        destroy_engine(engine)
    return rows_out


def _target_line(rows: list[dict[str, Any]]) -> str:
    """The target check: one pass <= TARGET x weighted at ZeRO-3, K = 2, per shape (wall and CPU ratio)."""
    found = [r for r in rows if r["stage"] == 3 and r["k"] == 2]
    if not found:
        return f"target: onepass <= {TARGET:.2f}x weighted at ZeRO-3, K=2: not measured in this run"
    verdicts = [
        f"{r['shape']} {r['onepass_x']:.2f}x (CPU {r['onepass_cpu_x']:.2f}x) {'met' if r['onepass_x'] <= TARGET else 'NOT met'}"
        for r in found
    ]
    return f"target: onepass <= {TARGET:.2f}x weighted at ZeRO-3, K=2: " + "; ".join(verdicts)


def run_captures(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the capture comparison on ``args.world`` ranks; print the table and target line, write ``args.out``."""
    from _common import machine, print_table, write_json
    from multirank import run_ranks

    started = machine()
    rows = run_ranks(_captures_body, args.world, args, backend="nccl" if args.device == "cuda" else "gloo")[0]
    table = [
        (r["stage"], r["shape"], r["k"], f"{r['ms']['weighted']:.1f}", f"{r['kpass_x']:.2f}", f"{r['kpass_cpu_x']:.2f}",
         f"{r['onepass_x']:.2f}", f"{r['onepass_cpu_x']:.2f}", "{:.2f}-{:.2f}".format(*r["onepass_x_iqr"]),
         f"{r['onepass_reduce_ms']:.1f}", f"{r['peak_mib']['onepass']:.2f} / {r['peak_mib']['k_full_gradients']:.2f}")
        for r in rows
    ]  # fmt: skip
    columns = ("ZeRO", "shape", "K", "weighted ms", "kpass x", "(CPU)", "onepass x", "(CPU)", "paired IQR",
               "reduce ms", "peak MiB onepass / K full")  # fmt: skip
    print_table(
        f"one pass vs K passes vs weighted: {args.world} {args.device} rank(s), forward+backward only, "
        f"{args.reps} interleaved reps (medians; x = ratio to weighted, CPU = rank 0's process time)",
        columns, table,
    )  # fmt: skip
    print(_target_line(rows))
    write_json(args.out, "hook_overhead_captures", vars(args), rows, started=started)
    return rows


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of both modes; unset sizes and --reps take the chosen mode's defaults (see ``_DEFAULT_SIZES``)."""
    from raco_ds.onepass import BUCKET_NUMEL as _BUCKET_NUMEL, MAX_IN_FLIGHT as _MAX_IN_FLIGHT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", action="store_true", help="compare weighted / K passes / one pass instead")
    parser.add_argument("--ranks", "--world", dest="world", type=int, default=2, help="ranks (processes)")
    parser.add_argument("--reps", type=int, help="timed repetitions of each variant (default 6; --captures 7)")
    parser.add_argument("--vocab", type=int, help="vocabulary (default 512)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 128; --captures 256)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 2; --captures 4)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 64; --captures 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    hook = parser.add_argument_group("default mode (RACO hook vs linear)")
    hook.add_argument("--stage", type=int, default=2, help="ZeRO stage (0-3)")
    hook.add_argument("--objectives", type=int, default=2, help="K")
    hook.add_argument("--warmup", type=int, default=2)
    hook.add_argument("--micro-batch", type=int, default=4)
    cap = parser.add_argument_group("--captures (weighted vs K passes vs one pass)")
    cap.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="ZeRO stages")
    cap.add_argument("--shapes", nargs="+", default=["shared", "objective_rows"], choices=["shared", "objective_rows"])
    cap.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="numbers of objectives K")
    cap.add_argument("--pairs", type=int, default=4, help="pairs per rank (rows = 2 x pairs)")
    cap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (non-reentrant)")
    cap.add_argument("--bucket-numel", type=int, default=_BUCKET_NUMEL,
                     help=f"full-parameter elements per objective per collective (library default {_BUCKET_NUMEL})")
    cap.add_argument("--max-in-flight", type=int, default=_MAX_IN_FLIGHT,
                     help=f"asynchronous reductions in flight during the backward (library default {_MAX_IN_FLIGHT})")
    cap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                     help="cpu: gloo ranks; cuda: nccl, rank r on GPU r (one GPU: --world 1)")
    cap.add_argument("--out", default="benchmarks/results/hook_overhead_captures.json", help="JSON results")
    args = parser.parse_args(argv)
    for name, value in _DEFAULT_SIZES["captures" if args.captures else "hook"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not args.captures:
        parser.error("--device cuda is for --captures (the default mode runs on CPU ranks)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the chosen mode on ``--world`` ranks."""
    from multirank import run_ranks

    args = parse_args(argv)
    if args.captures:
        run_captures(args)
    else:
        run_ranks(_hook_body, args.world, args)


if __name__ == "__main__":
    main()
