"""Memory: RACO's per-objective buffers and peak memory per rank, vs (K-1) x P/N x 4 bytes and vs K full gradients.

    python benchmarks/memory.py                       # K in {2,3,4}, N in {1,2,4} CPU ranks, ZeRO-3 (~10 min here)
    python benchmarks/memory.py --stage 2 --ks 2 4 --ranks 1 2
    python benchmarks/memory.py --quick               # smoke test

For each N (one launch of N gloo CPU ranks) and K, on every rank:

1. a fresh DeepSpeed engine runs the weighted-loss baseline (``linear``), then
   RACO through ``RacoHook`` with one pass per objective (per-objective pairs),
   then RACO with one-pass capture (raco_ds.onepass), each for ``--reps`` steps
   after a warm-up step (Adam's states exist before anything is measured);
2. a plain-PyTorch implementation in the style of the paper's code (every
   process holds the whole model and K full gradients: K backwards, each full
   gradient flattened into a (K, P) matrix and all-reduced as DDP would, Gram,
   coefficients, combined gradient, AdamW) runs next to its own weighted-loss step.

Reported per rank (rank 0; the table's byte columns are the mean over ranks):

- ``hook MiB``: bytes the hook allocates for shards (``RacoHook.buffer_bytes``, exact), against
  ``(K-1)P/N*4`` -- the design's figure (P = trainable parameters, fp32);
- ``+peak`` columns: measured extra peak resident memory of a step over the baseline step of the
  same implementation, i.e. max RSS (VmHWM, reset per phase through /proc/self/clear_refs) during
  that mode's steps minus max RSS during the baseline's steps. RSS, not tracemalloc: tracemalloc
  does not see torch's CPU allocator. The ranks run with glibc's mmap threshold pinned at 64 KiB so
  that freed tensors leave RSS (see _common.MALLOC_ENV); a few MiB of noise remain;
- ``K*P*4``: the paper-style implementation's materialised per-objective gradients (exact).

Per-objective passes run 1/K of the baseline's rows each, so their activation peak is lower
than the baseline's: the measured extra can fall slightly below the buffers.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MALLOC_ENV,
    MEDIUM,
    PairData,
    Steps,
    base_parser,
    destroy_engine,
    dpo_losses,
    init_engine,
    launch,
    machine,
    make_pairs,
    peak_rss,
    print_table,
    reset_peak_rss,
    row_logps,
    rss,
    spec_dict,
    spec_from,
    write_json,
)

MIB = 2**20


def _peak(step: Any, reps: int) -> int:
    """Max RSS (bytes) over ``reps`` calls of ``step``."""
    gc.collect()
    reset_peak_rss()
    for _ in range(reps):
        step()
    return peak_rss()


class FullGradientRaco:
    """RACO as the paper's code does it: K full gradients per process, materialised, no sharding.

    Each process holds the whole model, its gradient and AdamW states (DDP);
    per step it runs K backwards, flattens each full gradient into row k of a
    (K, P) fp32 matrix, all-reduces it (DDP would all-reduce each backward's
    gradient), forms the Gram in float64, solves, and writes sum_k a_k g_k.
    """

    def __init__(self, model: torch.nn.Module, data: PairData, weights: list[float]) -> None:
        self.model, self.data, self.weights = model, data, weights
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)

    def _all_reduce_mean(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tensor)
            tensor.div_(dist.get_world_size())

    def _finish(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def linear(self) -> None:
        """The same implementation's weighted-loss step (one backward)."""
        losses = dpo_losses(row_logps(self.model, self.data), self.data)
        sum(w * losses[k] for k, w in enumerate(self.weights)).backward()
        for p in self.params:
            self._all_reduce_mean(p.grad)
        self._finish()

    def raco(self) -> int:
        """One RACO step; returns the bytes of the materialised (K, P) gradient matrix."""
        from raco_ds.gram import local_gram
        from raco_ds.solver import aggregate

        k_count = len(self.weights)
        rows = []
        for k in range(k_count):
            mine = self.data.of_objective(k)
            (dpo_losses(row_logps(self.model, mine), mine)[k]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in self.params]))
            self.optimizer.zero_grad(set_to_none=True)
        grads = torch.stack(rows)
        del rows
        self._all_reduce_mean(grads)
        gram = local_gram(grads)  # float64, chunked (as the hook does)
        a = aggregate("raco", gram, torch.tensor(self.weights, dtype=torch.float64), 0.4).coefficients
        combined = (a.to(grads.dtype).unsqueeze(1) * grads).sum(0)
        offset = 0
        for p in self.params:
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        nbytes = grads.numel() * grads.element_size()
        del grads, combined
        self._finish()
        return nbytes


def _measure_k(rank: int, world: int, spec: Any, stage: int, k: int, args: Any) -> dict[str, Any]:
    weights = [1.0 / k] * k
    data = make_pairs("objective", k, args.pairs, spec, seed=1000 * rank + k)
    out: dict[str, Any] = {"k": k, "world": world, "rank": rank, "stage": stage}

    # -- DeepSpeed: baseline, RACO with K passes, RACO with one-pass capture -------------------------
    engine = init_engine(spec, stage, micro_rows=data.input_ids.shape[0])
    steps = Steps(engine, data, weights)
    steps.linear()  # warm-up: Adam's states, DeepSpeed's buffers
    out["peak_linear"] = _peak(steps.linear, args.reps)
    before = rss()
    hook = steps.make_hook()
    out["hook_resident"] = rss() - before
    out["hook_buffer_bytes"] = hook.buffer_bytes
    out["shard_numel"] = hook.shard_layout.numel
    steps.raco()
    out["peak_raco"] = _peak(steps.raco, args.reps)
    steps.hook = None  # free the K-pass hook's rows before measuring one-pass
    del hook
    reason = steps.onepass_reason() if not args.no_onepass else "--no-onepass"
    out["onepass_skipped"] = reason
    if reason is None:
        steps.raco_onepass()
        out["peak_onepass"] = _peak(steps.raco_onepass, args.reps)
        out["onepass_buffer_bytes"] = steps.onepass_hook.buffer_bytes
    out["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    del steps
    destroy_engine(engine)

    # -- the paper's style: K full gradients per process -------------------------------------------
    full = FullGradientRaco(spec.build(), data, weights)
    full.linear()
    out["peak_full_linear"] = _peak(full.linear, args.reps)
    out["full_gradients_bytes"] = full.raco()
    out["peak_full_raco"] = _peak(full.raco, args.reps)
    del full
    gc.collect()
    return out


def _body(rank: int, world: int, counter: Any, args: Any, spec: Any) -> list[dict[str, Any]]:
    return [_measure_k(rank, world, spec, args.stage, k, args) for k in args.ks]


def summarise(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One line per (N, K): exact buffer bytes and measured extra peaks (MiB, mean over ranks)."""
    lines = []
    for index, first in enumerate(per_rank[0]):
        ranks = [r[index] for r in per_rank]
        world, k, p = first["world"], first["k"], first["params"]

        def mean(fn: Any) -> float:
            return sum(fn(r) for r in ranks) / len(ranks) / MIB

        line = {
            "N": world, "K": k, "P": p, "shard": first["shard_numel"],
            "hook_mib": mean(lambda r: r["hook_buffer_bytes"]),
            "design_mib": (k - 1) * p / world * 4 / MIB,
            "raco_extra_peak_mib": mean(lambda r: r["peak_raco"] - r["peak_linear"]),
            "onepass_buffer_mib": mean(lambda r: r.get("onepass_buffer_bytes", float("nan"))),
            "onepass_extra_peak_mib": mean(lambda r: r.get("peak_onepass", float("nan")) - r["peak_linear"]),
            "full_kp_mib": k * p * 4 / MIB,
            "full_extra_peak_mib": mean(lambda r: r["peak_full_raco"] - r["peak_full_linear"]),
            "linear_peak_mib": mean(lambda r: r["peak_linear"]),
            "full_linear_peak_mib": mean(lambda r: r["peak_full_linear"]),
            "onepass_skipped": first["onepass_skipped"],
        }  # fmt: skip
        line["hook_over_design"] = line["hook_mib"] / line["design_mib"]
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse flags, one launch per N, print the table and write the JSON."""
    parser = base_parser(__doc__, "memory")
    parser.set_defaults(reps=1)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4], help="numbers of objectives K")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="numbers of CPU ranks N")
    parser.add_argument("--stage", type=int, default=3, help="ZeRO stage")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per objective per rank")
    parser.add_argument("--no-onepass", action="store_true", help="skip the one-pass capture mode")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.ranks, args.reps = [2], [1], 1
    spec = spec_from(args, MEDIUM)
    started = machine()
    lines, raw = [], []
    for world in args.ranks:
        per_rank = launch(_body, world, args, spec, env=MALLOC_ENV)
        raw.append(per_rank)
        lines += summarise(per_rank)
    print_table(
        f"Per-rank memory, ZeRO-{args.stage}, P = {lines[0]['P'] / 1e6:.2f}M fp32 ({lines[0]['P'] * 4 / MIB:.1f} MiB), "
        f"{args.pairs} pair(s)/objective/rank x {spec.seq} tokens ({started['date_utc']} UTC, load {started['load_avg_1m']})",
        ["N", "K", "shard", "hook MiB", "(K-1)P/N*4", "hook/design", "RACO +peak", "1-pass buf", "1-pass +peak",
         "K*P*4", "full-grad +peak"],
        [[r["N"], r["K"], r["shard"], r["hook_mib"], r["design_mib"], r["hook_over_design"], r["raco_extra_peak_mib"],
          r["onepass_buffer_mib"], r["onepass_extra_peak_mib"], r["full_kp_mib"], r["full_extra_peak_mib"]]
         for r in lines],
        note="MiB per rank. +peak = max RSS during that mode's steps - max RSS during the same implementation's "
             "weighted-loss steps (RACO/1-pass: the DeepSpeed engine; full-grad: plain PyTorch, paper style).",
    )  # fmt: skip
    config = {**vars(args), "model": spec_dict(spec), "memory_measure": "VmHWM (peak RSS) per phase, glibc mmap threshold 64 KiB"}
    write_json(args.json, "memory", config, {"summary": lines, "raw": raw}, started=started)


if __name__ == "__main__":
    main()
