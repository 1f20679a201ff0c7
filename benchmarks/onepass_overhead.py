"""One-pass capture vs K passes vs the weighted-loss (DPO-LW) step, on 2 CPU ranks under DeepSpeed.

Per (ZeRO stage, data shape, K) it times, interleaved over repetitions in one
run, the forward+backward part of a step with the gradient left in the hook's
(K, shard) buffer (optimizer step excluded: it is the same in every mode):

- weighted: one forward, ``engine.backward(sum_k w_k L_k)`` (the baseline; no per-objective gradients);
- kpass:    per objective one forward + ``engine.backward(L_k)`` + shard capture
            (shared pairs: every pass sees all rows; per-objective rows: its own rows);
- onepass:  one forward, one backward through DeepSpeedOnePass streaming into the bound shard
            buffer: each parameter's K gradients are reduced (bucketed) during the backward as
            soon as complete, then ``scatter_into`` (order check, engine epilogue);
- onepass_post: the previous design, for comparison: the capture keeps every parameter's
            (K, numel) gradients and reduce-scatters them all after the backward.

The time spent staging and reducing is reported separately for both one-pass modes
(it moves K x the parameters, like kpass; on CPU/gloo the reductions are synchronous,
so streaming overlaps nothing there: it changes memory, not time). Also reported:
the peak full-size (K, numel) gradient bytes each one-pass mode held per rank.
Prints medians as ratios to ``weighted``, and writes JSON.

    PYTHONPATH=.:tests python benchmarks/onepass_overhead.py --reps 7 --out benchmarks/results/onepass_overhead_cpu.json

Sizes are flags; the defaults are a small Llama that runs in a few minutes on 2 CPU ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(args):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, max_position_embeddings=args.seq)
    cfg._attn_implementation = "sdpa"
    m = tf.LlamaForCausalLM(cfg).train()
    m.config.use_cache = False
    if args.checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def _body(rank: int, world: int, args) -> list[dict]:
    import deepspeed
    from test_onepass import batch, row_logps

    from raco_ds.deepspeed.layout import EngineLayout
    from raco_ds.deepspeed.shards import make_strategy
    from raco_ds.losses import losses_from_margins, margin_jacobian
    from raco_ds.onepass import (
        DeepSpeedOnePass,
        objective_row_coefficients,
        shared_pair_coefficients,
    )

    torch.set_num_threads(1)
    rows_out = []
    for stage in args.stages:
        model = _model(args)
        cfg = {"train_micro_batch_size_per_gpu": 2 * args.pairs, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
               "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=cfg)
        strategy = make_strategy(engine, EngineLayout.from_engine(engine))
        layout = strategy.layout
        data = batch(args.pairs, seq=args.seq, vocab=args.vocab, seed=10 + rank)
        b = args.pairs
        ref = -30.0 + torch.zeros(2 * b)
        for shape in args.shapes:
            for k in args.ks:
                gen = torch.Generator().manual_seed(5 + rank)
                if shape == "shared":
                    labels = torch.randint(-1, 2, (k, b), generator=gen)
                    labels[:, 0] = 1
                else:
                    owner = torch.arange(b) % k
                    labels = torch.zeros(k, b, dtype=torch.long)
                    labels[owner, torch.arange(b)] = 1
                w = torch.full((k,), 1.0 / k)
                shard = torch.zeros(k, layout.numel)

                def margins_of(logps, lab_rows=None):
                    return (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])

                def weighted():
                    engine.set_gradient_accumulation_boundary(True)
                    losses = losses_from_margins(margins_of(row_logps(engine, data)), labels, beta=0.2)
                    engine.backward((w * losses).sum())
                    strategy.clear()

                def kpass():
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

                streaming = DeepSpeedOnePass(engine, k, layout, shard_buffer=shard, bucket_numel=args.bucket_numel)
                post = DeepSpeedOnePass(engine, k, layout, bucket_numel=args.bucket_numel)
                post.capture.stream_to(None)  # keep everything until the backward is over (the old design)
                reduce_seconds: dict[str, list[float]] = {"onepass": [], "onepass_post": []}

                def one_backward(adapter) -> None:
                    with adapter.record():
                        logps = row_logps(adapter.forward, data)  # engine.module: see DeepSpeedOnePass
                        margins = margins_of(logps)
                        if shape == "shared":
                            c = shared_pair_coefficients(margin_jacobian(margins, labels, beta=0.2))
                            adapter.backward(margins.sum(), c)
                        else:
                            losses = losses_from_margins(margins, labels, beta=0.2)
                            owner = (labels != 0).long().argmax(0)
                            adapter.backward(losses.sum(), objective_row_coefficients(torch.cat([owner, owner]), k))

                def onepass():
                    before = streaming.scatter.seconds
                    streaming.zero()
                    one_backward(streaming)
                    streaming.scatter_into(shard)
                    reduce_seconds["onepass"].append(streaming.scatter.seconds - before)

                def onepass_post():
                    before = post.scatter.seconds
                    post.zero()
                    one_backward(post)
                    post.scatter.scatter(shard)
                    post.finish_engine_backward()
                    reduce_seconds["onepass_post"].append(post.scatter.seconds - before)

                modes = {"weighted": weighted, "kpass": kpass, "onepass": onepass, "onepass_post": onepass_post}
                times = {m: [] for m in modes}
                for fn in modes.values():  # warm-up
                    fn()
                for rep in range(args.reps):
                    order = list(modes) if rep % 2 == 0 else list(reversed(list(modes)))
                    for m in order:
                        torch.distributed.barrier()
                        t0 = time.perf_counter()
                        modes[m]()
                        torch.distributed.barrier()
                        times[m].append(time.perf_counter() - t0)
                streaming.remove()
                post.remove()
                med = {m: statistics.median(v) for m, v in times.items()}
                for m, v in reduce_seconds.items():
                    med[f"{m}_reduce"] = statistics.median(v[1:])  # without the warm-up
                full_bytes = k * 4 * sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
                rows_out.append({"stage": stage, "shape": shape, "k": k, "ms": {m: 1e3 * v for m, v in med.items()},
                                 "kpass_x": med["kpass"] / med["weighted"], "onepass_x": med["onepass"] / med["weighted"],
                                 "onepass_post_x": med["onepass_post"] / med["weighted"],
                                 "peak_mib": {"onepass": (streaming.capture.peak_buffer_bytes
                                                          + streaming.scatter.peak_transient_bytes) / 2**20,
                                              "onepass_post": (post.capture.peak_buffer_bytes
                                                               + post.scatter.peak_transient_bytes) / 2**20,
                                              "k_full_gradients": full_bytes / 2**20},
                                 "reps": args.reps})
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--shapes", nargs="+", default=["shared", "objective_rows"])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--pairs", type=int, default=4, help="pairs per rank (rows = 2 x pairs)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--bucket-numel", type=int, default=1 << 16,
                   help="full-parameter elements per objective per collective (default 64K: several buckets "
                        "on the default model; the library default is 4M)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/onepass_overhead_cpu.json")
    args = p.parse_args()
    from multirank import run_ranks

    rows = run_ranks(_body, args.world, args)[0]
    print(f"{'stage':>5} {'shape':>15} {'K':>2} {'weighted ms':>11} {'kpass x':>7} {'onepass x':>9} "
          f"{'(reduce ms)':>11} {'post x':>6} {'(reduce ms)':>11} {'peak MiB stream/post/K full':>28}")
    for r in rows:
        ms, mib = r["ms"], r["peak_mib"]
        print(f"{r['stage']:>5} {r['shape']:>15} {r['k']:>2} {ms['weighted']:>11.1f} {r['kpass_x']:>7.2f} "
              f"{r['onepass_x']:>9.2f} {ms['onepass_reduce']:>11.1f} {r['onepass_post_x']:>6.2f} "
              f"{ms['onepass_post_reduce']:>11.1f} "
              f"{mib['onepass']:>10.2f} / {mib['onepass_post']:>6.2f} / {mib['k_full_gradients']:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
