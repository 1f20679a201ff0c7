"""Projection: a Llama-3-70B-shaped model trained with RACO vs the weighted-loss baseline on 8..1024 GPUs.

    python benchmarks/project.py                       # table on stdout
    python benchmarks/project.py --json results/project_70b.json --gpu h200 --objectives 3

An analytic model, not a measurement: every number comes from the assumptions
below, which are also written into the output (table footer and JSON). Memory
comes from raco_ds.planning (the same model the preflight plan uses, whose
model-state figures equal DeepSpeed's estimator; tests/test_plan.py checks both).

Assumptions
-----------
Hardware (``Hardware``): 8 GPUs per node; NVLink 450 GB/s per direction per GPU;
one 400 Gb/s (50 GB/s) InfiniBand NIC per GPU, rail-optimised; links reach 80 %
of nominal; H100/H200 dense bf16 989 TFLOP/s at 45 % MFU; HBM 3.35 TB/s (H100)
or 4.8 TB/s (H200) at 80 %; per ring step latency 3 us inside a node, 8 us
between nodes.

Collectives, the way DeepSpeed ZeRO-3 issues them per forward+backward pass
(overlap_comm on, one bucket per decoder layer plus the embedding and head):
all-gather the bf16 parameters in the forward (2P bytes in total), all-gather
them again in the backward (released after the forward;
activation-checkpoint recomputation reuses the backward gather), and
reduce-scatter the gradients (bf16 ``communication_data_type``: 2P bytes).
ZeRO-3 does this at every micro-step, so each pass pays all three.

Cost of one all-gather / reduce-scatter of M bytes over N = nodes x 8 GPUs,
hierarchical (NCCL's rail-aligned rings behave alike): an inter-node phase
among same-rank GPUs, each moving (nodes-1)/nodes x M/8 bytes over its NIC,
and an intra-node phase moving 7/8 x M over NVLink; plus latency
(nodes-1) x 8 us + 7 x 3 us per collective. The K x K Gram all-reduce
(float64, K*K*8 bytes) is latency-bound: a tree, 2 x (3 us x log2 8 +
8 us x log2 nodes).

Compute per pass: (6 + 2 recompute) x P_matmul x tokens FLOPs plus causal
attention 4 x 2 x s x q_width x layers x tokens (x3/4 without
checkpointing), at MFU x peak. A pass takes max(compute, communication) plus
one layer's gather that cannot be hidden; the serial bound (sum) is in the JSON.
The optimizer step reads and writes about 36 bytes per local parameter (HBM).

Batch: each objective has ``pairs_per_objective`` pairs per GPU per step (2 rows
each), at most ``micro_rows`` rows fit one forward (memory). Data shapes:

- per-objective pairs (HH-RLHF style): the baseline passes over all K x rows
  in micro-batches; RACO with one pass per objective needs the same number of
  passes when a micro-batch is no larger than one objective's rows.
- shared pairs (PKU-SafeRLHF style): the baseline passes once over the pairs;
  RACO with per-objective passes runs K passes over the same rows (K x compute
  and communication); RACO with one-pass capture runs the baseline's passes but
  reduce-scatters a (K, n) stack (K x the reduce-scatter bytes) and adds the
  per-objective split, 2 x K x rows x P_matmul FLOPs (DESIGN.md section 6).

RACO's hook per step (HBM-bound, ``gram_efficiency`` of the read floor):
capture (per-objective passes: zero + copy, 12 bytes per local parameter per
objective; one-pass: 0, the slices arrive from the reduce-scatter), Gram
(read K fp32 shards once), the K x K all-reduce, solve (1 ms, HOOKS.md measured
0.8 ms), write-back (read K shards, write 1).

Not modelled: per-pass Python/hook overhead of ZeRO-3 (HOOKS.md measured
~400 ms per pass for a 0.95B model on one H200 -- it multiplies with the pass
count, so it hits shared-pairs RACO with per-objective passes; add it with
--pass-overhead-ms), stragglers, data loading, checkpoint I/O, the reference
model's forward (same for both methods), CPU Adam time when offloading.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raco_ds.planning import GIB, PRESETS, JobShape, ModelShape, plan_memory  # noqa: E402

__all__ = ["Hardware", "Workload", "HARDWARE", "collective_seconds", "project", "project_point", "main"]


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """The cluster the projection assumes."""

    name: str
    """GPU label for the report."""
    gpus_per_node: int = 8
    """GPUs per node (and NICs per node: one per GPU)."""
    gpu_memory_gib: float = 79.6
    """Usable GiB per GPU (as torch reports it)."""
    peak_tflops: float = 989.0
    """Dense bf16 peak TFLOP/s per GPU."""
    mfu: float = 0.45
    """Fraction of peak the model's matmuls reach."""
    hbm_gbs: float = 3350.0
    """HBM bandwidth per GPU, GB/s."""
    nvlink_gbs: float = 450.0
    """NVLink bandwidth per GPU per direction, GB/s."""
    ib_gbs: float = 50.0
    """Inter-node bandwidth per GPU per direction, GB/s (400 Gb/s InfiniBand)."""
    link_efficiency: float = 0.8
    """Fraction of nominal link/HBM bandwidth reached."""
    latency_intra_s: float = 3e-6
    """Latency per ring step inside a node, seconds."""
    latency_inter_s: float = 8e-6
    """Latency per ring step between nodes, seconds."""


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(name="H100 SXM 80GB", gpu_memory_gib=79.6, hbm_gbs=3350.0),
    "h200": Hardware(name="H200 SXM 141GB", gpu_memory_gib=140.4, hbm_gbs=4800.0),
}
"""Hardware presets by --gpu name."""


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What one optimizer step processes, per GPU."""

    model: ModelShape
    """The model (default: Llama-3 70B shape)."""
    num_objectives: int = 2
    """K."""
    seq_len: int = 4096
    """Tokens per row."""
    pairs_per_objective: int = 2
    """Preference pairs per objective per GPU per optimizer step (2 rows each)."""
    micro_rows: int = 2
    """Rows that fit one forward pass (the memory-limited micro-batch)."""
    activation_checkpointing: bool = True
    """Recompute layers in backward (adds one forward of FLOPs)."""
    gram_efficiency: float = 0.5
    """Fraction of the HBM read floor the Gram kernel reaches."""
    solve_s: float = 1e-3
    """Seconds for the K x K solve (HOOKS.md: 0.8 ms measured)."""
    pass_overhead_s: float = 0.0
    """Fixed seconds per forward+backward pass not modelled otherwise (see the module docstring)."""


def collective_seconds(num_bytes: float, nodes: int, hw: Hardware, collectives: int = 1) -> float:
    """Hierarchical all-gather / reduce-scatter of ``num_bytes`` in total, split into ``collectives`` calls."""
    g = hw.gpus_per_node
    inter = (nodes - 1) / nodes * num_bytes / g / (hw.ib_gbs * 1e9 * hw.link_efficiency)
    intra = (g - 1) / g * num_bytes / (hw.nvlink_gbs * 1e9 * hw.link_efficiency)
    latency = (nodes - 1) * hw.latency_inter_s + (g - 1) * hw.latency_intra_s
    return inter + intra + collectives * latency


def gram_allreduce_seconds(k: int, nodes: int, hw: Hardware) -> float:
    """The K x K float64 all-reduce: a latency-bound tree (its K*K*8 bytes take nanoseconds)."""
    steps = hw.latency_intra_s * math.log2(hw.gpus_per_node) + hw.latency_inter_s * math.log2(max(nodes, 1))
    return 2 * steps + k * k * 8 / (hw.ib_gbs * 1e9)


def _matmul_params(model: ModelShape) -> int:
    """Parameters that take part in matmuls (the input embedding is a lookup)."""
    return model.num_params - model.vocab_size * model.hidden_size


def _pass_seconds(rows: int, work: Workload, hw: Hardware, nodes: int, rs_multiplier: float,
                  extra_flops: float) -> dict[str, float]:
    """Compute, communication and overlapped time of one forward+backward pass of ``rows`` rows."""
    model = work.model
    tokens = rows * work.seq_len
    factor = 8 if work.activation_checkpointing else 6
    attention = (4 if work.activation_checkpointing else 3) * 2 * work.seq_len * model.q_width * model.num_layers
    flops = (factor * _matmul_params(model) + attention) * tokens + extra_flops
    compute = flops / (hw.peak_tflops * 1e12 * hw.mfu)
    buckets = model.num_layers + 2
    p_bytes = 2 * model.num_params  # bf16
    gather = 2 * collective_seconds(p_bytes, nodes, hw, buckets)
    reduce = collective_seconds(rs_multiplier * p_bytes, nodes, hw, buckets)
    comm = gather + reduce
    overlapped = max(compute, comm) + comm / buckets + work.pass_overhead_s
    return {"compute_s": compute, "comm_s": comm, "overlapped_s": overlapped,
            "serial_s": compute + comm + work.pass_overhead_s, "flops": flops}


def project_point(gpus: int, work: Workload, hw: Hardware) -> dict[str, Any]:
    """Memory and step times at one world size (see the module docstring for the model)."""
    if gpus % hw.gpus_per_node:
        raise ValueError(f"--gpus {gpus}: must be a multiple of gpus_per_node ({hw.gpus_per_node})")
    nodes = gpus // hw.gpus_per_node
    k, model = work.num_objectives, work.model
    local = model.num_params / gpus
    hbm = hw.hbm_gbs * 1e9 * hw.link_efficiency

    # Memory: the preflight plan; fall back to offload where the GPU cannot hold the job.
    plan, offload = None, "none"
    for offload in ("none", "optimizer", "param"):
        job = JobShape(nodes=nodes, gpus_per_node=hw.gpus_per_node, num_objectives=k, micro_batch=work.micro_rows,
                       seq_len=work.seq_len, activation_checkpointing=work.activation_checkpointing,
                       gpu_memory_gib=hw.gpu_memory_gib, offload_optimizer=offload != "none",
                       offload_param=offload == "param")
        plan = plan_memory(model, job)
        if plan.fits_gpu:
            break
    assert plan is not None

    optimizer_s = 36 * local / hbm
    rows_per_objective = 2 * work.pairs_per_objective
    hook_common = (4 * k * local / (hbm * work.gram_efficiency) + gram_allreduce_seconds(k, nodes, hw)
                   + work.solve_s + 4 * (k + 1) * local / hbm)
    capture_per_objective = 12 * k * local / hbm

    def passes(rows: int) -> int:
        return math.ceil(rows / work.micro_rows)

    def run(rows_each: list[int], rs_multiplier: float = 1.0, extra_flops_per_row: float = 0.0) -> dict[str, float]:
        total = {"compute_s": 0.0, "comm_s": 0.0, "overlapped_s": 0.0, "serial_s": 0.0, "passes": 0}
        for rows in rows_each:
            for i in range(passes(rows)):
                r = min(work.micro_rows, rows - i * work.micro_rows)
                one = _pass_seconds(r, work, hw, nodes, rs_multiplier, extra_flops_per_row * r)
                for key in ("compute_s", "comm_s", "overlapped_s", "serial_s"):
                    total[key] += one[key]
                total["passes"] += 1
        return total

    split_flops_per_row = 2 * k * _matmul_params(model)  # C (K x R) times per-row weight gradients
    shapes: dict[str, dict[str, dict[str, float]]] = {}
    # per-objective pairs: K groups of rows.
    linear = run([k * rows_per_objective])
    raco = run([rows_per_objective] * k)
    onepass = run([k * rows_per_objective], rs_multiplier=k, extra_flops_per_row=split_flops_per_row)
    shapes["per_objective_pairs"] = {"linear": linear, "raco_k_passes": raco, "raco_one_pass": onepass}
    # shared pairs: one set of rows, labelled by every objective.
    linear = run([rows_per_objective])
    raco = run([rows_per_objective] * k)
    onepass = run([rows_per_objective], rs_multiplier=k, extra_flops_per_row=split_flops_per_row)
    shapes["shared_pairs"] = {"linear": linear, "raco_k_passes": raco, "raco_one_pass": onepass}

    for methods in shapes.values():
        for name, t in methods.items():
            hook = 0.0 if name == "linear" else hook_common + (capture_per_objective if name == "raco_k_passes" else 0)
            t["hook_s"] = hook
            t["step_s"] = t["overlapped_s"] + optimizer_s + hook
            t["step_serial_s"] = t["serial_s"] + optimizer_s + hook
        for name in ("raco_k_passes", "raco_one_pass"):
            methods[name]["ratio_vs_linear"] = methods[name]["step_s"] / methods["linear"]["step_s"]

    return {
        "gpus": gpus,
        "nodes": nodes,
        "offload": offload,
        "fits": plan.fits_gpu,
        "gpu_mem_gib": plan.gpu_total / GIB,
        "k_shards_gib": (k * 4 * model.num_params // gpus) / GIB,
        "k_shards_on": "host" if plan.job.offload_optimizer else "gpu",
        "host_gib_per_node": plan.host_total / GIB,
        "linear_pass_compute_s": _pass_seconds(work.micro_rows, work, hw, nodes, 1.0, 0.0)["compute_s"],
        "linear_pass_comm_s": _pass_seconds(work.micro_rows, work, hw, nodes, 1.0, 0.0)["comm_s"],
        "deepspeed_model_states_gib": plan.deepspeed_model_states / GIB,
        "plan": plan.to_dict(),
        "gram_allreduce_bytes": k * k * 8,
        "zero3_bytes_per_pass_per_gpu": 3 * (gpus - 1) / gpus * 2 * model.num_params,
        "optimizer_s": optimizer_s,
        "shapes": shapes,
    }


def assumptions(work: Workload, hw: Hardware) -> list[str]:
    """The assumptions of this run, in words (printed and written to the JSON)."""
    m = work.model
    return [
        f"model {m.name}: {m.num_params / 1e9:.2f}B params, {m.num_layers} layers, h={m.hidden_size}, "
        f"GQA {m.num_heads}/{m.num_kv_heads}, vocab {m.vocab_size}",
        f"hardware {hw.name}: {hw.gpus_per_node} GPUs/node, NVLink {hw.nvlink_gbs:.0f} GB/s/dir/GPU, "
        f"IB {hw.ib_gbs * 8:.0f} Gb/s per GPU (rail-optimised), links at {hw.link_efficiency:.0%}, "
        f"{hw.peak_tflops:.0f} TFLOP/s bf16 at {hw.mfu:.0%} MFU, HBM {hw.hbm_gbs:.0f} GB/s, "
        f"latency {hw.latency_intra_s * 1e6:.0f} us intra / {hw.latency_inter_s * 1e6:.0f} us inter per ring step",
        "ZeRO-3 per pass: all-gather bf16 params in forward and again in backward, reduce-scatter bf16 grads; "
        f"{m.num_layers + 2} buckets per collective; hierarchical (inter-node rail phase + NVLink phase)",
        "pass time = max(compute, comm) + one bucket's comm (overlap_comm); serial bound in JSON",
        f"batch per GPU per step: {work.pairs_per_objective} pairs per objective x 2 rows, micro-batch "
        f"{work.micro_rows} rows, seq {work.seq_len}, K={work.num_objectives}, activation checkpointing "
        f"{'on' if work.activation_checkpointing else 'off'}",
        "RACO hook: capture 12 B/param/objective (K passes only), Gram reads K fp32 shards at "
        f"{work.gram_efficiency:.0%} of HBM floor, K*K float64 tree all-reduce, solve {work.solve_s * 1e3:.1f} ms, "
        "write-back reads K shards + writes 1",
        "one pass: reduce-scatter of a (K, n) stack (K x bytes) + 2*K*rows*P_matmul FLOPs for the split",
        f"per-pass fixed overhead {work.pass_overhead_s * 1e3:.0f} ms (HOOKS.md: ~400 ms/pass measured at 0.95B "
        "on 1 H200; not extrapolated)",
        "memory from raco_ds.planning (K shards fp32, resident bf16 reference, flash attention, 14 B/token/vocab "
        "logits, 10 % fragmentation + 3 GiB reserve); offload chosen only when the GPU cannot hold the job; "
        "CPU Adam time under offload not modelled",
    ]


def project(gpu_counts: list[int], work: Workload, hw: Hardware) -> dict[str, Any]:
    """The projection at every world size, with its assumptions."""
    return {
        "assumptions": assumptions(work, hw),
        "workload": {k: v for k, v in asdict(work).items() if k != "model"} | {"model": work.model.name},
        "hardware": asdict(hw),
        "points": [project_point(g, work, hw) for g in gpu_counts],
    }


def render(result: dict[str, Any]) -> str:
    """The table (step seconds with overlap; ratio = RACO / linear)."""
    head = (f"{'GPUs':>5} {'nodes':>5} {'offload':>9} {'GiB/GPU':>8} {'K shards':>10} {'host/node':>9} "
            f"{'pass comp/comm s':>16} | "
            f"{'per-objective pairs: lin':>24} {'RACO-K':>7} {'ratio':>6} {'1pass':>7} {'ratio':>6} | "
            f"{'shared pairs: lin':>17} {'RACO-K':>7} {'ratio':>6} {'1pass':>7} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for p in result["points"]:
        shards = f"{p['k_shards_gib']:.2f} {p['k_shards_on']}"
        per_pass = f"{p['linear_pass_compute_s']:.2f}/{p['linear_pass_comm_s']:.2f}"
        cells = [f"{p['gpus']:>5} {p['nodes']:>5} {p['offload']:>9} {p['gpu_mem_gib']:>8.1f} {shards:>10} "
                 f"{p['host_gib_per_node']:>9.0f} {per_pass:>16}"]
        for shape, width in (("per_objective_pairs", 24), ("shared_pairs", 17)):
            s = p["shapes"][shape]
            cells.append(f"{s['linear']['step_s']:>{width}.2f} {s['raco_k_passes']['step_s']:>7.2f} "
                         f"{s['raco_k_passes']['ratio_vs_linear']:>6.2f} {s['raco_one_pass']['step_s']:>7.2f} "
                         f"{s['raco_one_pass']['ratio_vs_linear']:>6.2f}")
        lines.append(" | ".join(cells))
    lines.append("")
    lines.append("step = seconds per optimizer step, RACO hook included; ratio = RACO / linear; 'offload' = what the "
                 "memory plan needed to fit; K shards = GiB per GPU and where they live; host/node = GiB")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="8,16,32,64,128,256,512,1024", help="comma-separated GPU counts")
    p.add_argument("--model", default="llama3-70b", choices=sorted(PRESETS))
    p.add_argument("--gpu", default="h100", choices=sorted(HARDWARE))
    p.add_argument("--objectives", type=int, default=2, help="K (default 2)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--pairs-per-objective", type=int, default=2, help="pairs per objective per GPU per step")
    p.add_argument("--micro-rows", type=int, default=2, help="rows per forward (memory-limited micro-batch)")
    p.add_argument("--pass-overhead-ms", type=float, default=0.0, help="fixed cost per pass (not modelled by default)")
    p.add_argument("--json", type=Path, help="write the full result here")
    args = p.parse_args(argv)
    work = Workload(model=PRESETS[args.model], num_objectives=args.objectives, seq_len=args.seq_len,
                    pairs_per_objective=args.pairs_per_objective, micro_rows=args.micro_rows,
                    pass_overhead_s=args.pass_overhead_ms / 1e3)
    result = project([int(g) for g in args.gpus.split(",")], work, HARDWARE[args.gpu])
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
