"""RACO hook overhead vs the weighted-loss (linear, DPO-LW) step: same engine, same data, one run.

    python benchmarks/hook_overhead.py                      # 2 CPU ranks, ZeRO-2, K=2, ~1-2 min
    python benchmarks/hook_overhead.py --stage 3 --objectives 3 --reps 8

Each repetition runs, on the same DeepSpeed engine and the same micro-batches,
one step of each mode, alternating which goes first (interleaved, so drift and
noisy neighbours hit both alike):

- linear: one forward per objective's micro-batch, ONE backward of sum_k w_k L_k, ``engine.step()``;
- raco:   per objective ``with hook.objective(k)``: forward + ``hook.backward(L_k)``; ``hook.step()``.

It prints the median ms/step of each, their ratio, the hook's own breakdown
(capture, Gram, all-reduce, solve, write-back; median ms and % of the RACO
step), the Gram against the time to read the K shards once, and the hook's
extra memory per rank against (K-1) x shard x 4 bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(args: argparse.Namespace) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config)


def _batches(args: argparse.Namespace, rank: int) -> list[torch.Tensor]:
    # One fixed micro-batch per objective and rank: the same data for both modes.
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g) for _ in range(args.objectives)]


def _loss(engine, tokens: torch.Tensor, k: int) -> torch.Tensor:
    # Objective k predicts a shifted copy of the tokens: different, partly conflicting targets.
    logits = engine(input_ids=tokens).logits
    labels = (tokens + k) % logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def _body(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(args.threads)
    import deepspeed

    from raco_ds.deepspeed import RacoHook

    deepspeed.init_distributed(dist_backend="gloo")
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


def main() -> None:
    """Parse flags and run the benchmark on ``--ranks`` CPU processes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage (0-3)")
    parser.add_argument("--objectives", type=int, default=2, help="K")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6, help="timed repetitions of each mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_body, args=(args.ranks, port, args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
