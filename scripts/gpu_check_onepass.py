"""One-GPU check of one-pass capture: exactness (fp32, bf16) and cost vs K backwards and the weighted loss.

Ready for a machine with one CUDA GPU; not run in CI. Plain PyTorch (no
DeepSpeed), a Llama of ~0.3B parameters built from a config (no hub), bf16
with activation checkpointing for the timing, fp32 with TF32 off for the
exactness check. Prints a table and writes JSON to $OUT (or ./gpu_check_onepass.json).
Timing and peak memory also cover streaming (``onepass_stream``): each parameter's
K gradients handed over as soon as complete to a sink that keeps 1/8 of them
(a stand-in for an 8-rank shard), vs ``onepass`` holding all K full gradients.

    python scripts/gpu_check_onepass.py                 # ~3-5 minutes on an H200
    python scripts/gpu_check_onepass.py --quick          # smaller model, ~1 minute

Exit status 1 when an exactness check fails (fp32 rel err > 1e-5, bf16 > 3e-2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raco_ds.losses import losses_from_margins, margin_jacobian
from raco_ds.models import enable_activation_checkpointing
from raco_ds.onepass import (
    OnePassCapture,
    objective_row_coefficients,
    shared_pair_coefficients,
)


def _sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(args) -> None:
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(args) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")


def _empty(args) -> None:
    if args.device == "cuda":
        torch.cuda.empty_cache()


def build(args, dtype):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    m = tf.LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).train()
    m.config.use_cache = False
    enable_activation_checkpointing(m)
    return m


def make_batch(args, k):
    g = torch.Generator().manual_seed(1)
    b = args.pairs
    ids = torch.randint(3, args.vocab, (2 * b, args.seq), generator=g)
    mask = torch.ones_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, args.seq // 4 :] = True
    shared = torch.randint(-1, 2, (k, b), generator=g)
    shared[:, 0] = 1
    owner = torch.arange(b) % k
    per_obj = torch.zeros(k, b, dtype=torch.long)
    per_obj[owner, torch.arange(b)] = 1
    ref = -float(args.seq) + torch.randn(2 * b, generator=g)
    dev = args.device
    return {n: v.to(dev) for n, v in {"ids": ids, "mask": mask, "resp": resp, "ref": ref}.items()}, shared.to(dev), per_obj.to(dev)


def logps(model, d):
    logits = model(input_ids=d["ids"], attention_mask=d["mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, d["ids"][:, 1:, None]).squeeze(-1)
    return (lp * d["resp"][:, 1:]).sum(-1)


def margins(lp, d):
    b = lp.shape[0] // 2
    return (lp[:b] - d["ref"][:b]) - (lp[b:] - d["ref"][b:])


def step_weighted(model, d, labels, w):
    losses = losses_from_margins(margins(logps(model, d), d), labels, beta=0.2)
    (w * losses).sum().backward()
    model.zero_grad(set_to_none=True)


def step_kpass(model, d, labels, shape):
    k, b = labels.shape
    params = [p for p in model.parameters()]
    if shape == "shared":  # one forward, K backwards (retain_graph): the cheapest K-pass on one GPU
        losses = losses_from_margins(margins(logps(model, d), d), labels, beta=0.2)
        out = []
        for obj in range(k):
            out.append(torch.autograd.grad(losses[obj], params, retain_graph=obj < k - 1, allow_unused=True))
        return out
    out = []
    for obj in range(k):  # per-objective rows: one forward+backward on each objective's rows
        pairs = torch.nonzero(labels[obj] != 0).flatten()
        if pairs.numel() == 0:
            out.append([None] * len(params))
            continue
        rows = torch.cat([pairs, pairs + b])
        sub = {n: v[rows] for n, v in d.items()}
        loss = losses_from_margins(margins(logps(model, sub), sub), labels[:, pairs], beta=0.2)[obj]
        out.append(torch.autograd.grad(loss, params, allow_unused=True))
    return out


class ShardSink:
    """Streaming sink standing in for one of ``world`` ranks: keeps K rows of numel/world, drops the rest."""

    def __init__(self, cap: OnePassCapture, world: int = 8) -> None:
        self.cap, self.world = cap, world
        total = sum(cap.numel(p) // world for _, p in cap.parameters)
        device = next(p.device for _, p in cap.parameters)
        self.rows = torch.zeros(cap.num_objectives, total, device=device)
        self.col = 0

    def on_final(self, param, index: int, grad) -> None:
        """Add this parameter's first numel/world columns into the rows."""
        n = self.cap.numel(param) // self.world
        if grad is not None:
            self.rows[:, self.col : self.col + n] += grad[:, :n]
        self.col += n

    def end_backward(self) -> None:
        """Next backward starts at column 0 again."""
        self.col = 0


def step_onepass(cap, model, d, labels, shape):
    k = labels.shape[0]
    cap.zero()
    with cap.record():
        m = margins(logps(model, d), d)
        if shape == "shared":
            cap.backward(m.sum(), shared_pair_coefficients(margin_jacobian(m, labels, beta=0.2)))
        else:
            losses = losses_from_margins(m, labels, beta=0.2)
            owner = (labels != 0).long().argmax(0)
            cap.backward(losses.sum(), objective_row_coefficients(torch.cat([owner, owner]), k))
    return cap


def exactness(args, dtype, k, shape, tol):
    model = build(args, dtype)
    d, shared, per_obj = make_batch(args, k)
    labels = shared if shape == "shared" else per_obj
    ref = step_kpass(model, d, labels, shape)
    cap = step_onepass(OnePassCapture(model, k), model, d, labels, shape)
    worst = 0.0
    for i, (name, p) in enumerate(model.named_parameters()):
        got = cap.flat_gradient(p).view(k, *p.shape)
        for obj in range(k):
            r = ref[obj][i]
            r = torch.zeros_like(p) if r is None else r
            worst = max(worst, ((got[obj].double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item())
    cap.remove()
    _empty(args)
    return {"dtype": str(dtype), "k": k, "shape": shape, "max_rel_err": worst, "ok": worst <= tol}


def timing(args, k, shape):
    model = build(args, torch.bfloat16)
    d, shared, per_obj = make_batch(args, k)
    labels = shared if shape == "shared" else per_obj
    w = torch.full((k,), 1.0 / k, device=args.device)
    cap = OnePassCapture(model, k)
    stream = OnePassCapture(model, k)
    stream.stream_to(ShardSink(stream))
    fns = {"weighted": lambda: step_weighted(model, d, labels, w),
           "kpass": lambda: step_kpass(model, d, labels, shape),
           "onepass": lambda: step_onepass(cap, model, d, labels, shape),
           "onepass_stream": lambda: step_onepass(stream, model, d, labels, shape)}
    times = {n: [] for n in fns}
    peak = {}
    for n, fn in fns.items():  # warm-up + peak memory
        _sync(args); _reset_peak(args)
        fn(); _sync(args)
        peak[n] = _peak(args)
    for rep in range(args.reps):
        for n in (fns if rep % 2 == 0 else reversed(list(fns))):
            _sync(args); t0 = time.perf_counter()
            fns[n](); _sync(args)
            times[n].append(time.perf_counter() - t0)
    cap.remove()
    stream.remove()
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    _empty(args)
    return {"k": k, "shape": shape, "ms": med, "peak_gib": peak,
            "kpass_x": med["kpass"] / med["weighted"], "onepass_x": med["onepass"] / med["weighted"],
            "onepass_stream_x": med["onepass_stream"] / med["weighted"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script itself")
    p.add_argument("--tiny", action="store_true", help="a toy size for a CPU smoke test")
    args = p.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.seq, args.pairs, args.reps, args.vocab = 128, 2, 32, 4, 1, 256
    if args.quick:
        args.hidden, args.layers, args.seq, args.pairs, args.reps = 512, 4, 256, 4, 5
    assert args.device != "cuda" or torch.cuda.is_available(), "needs a CUDA GPU (or --device cpu --tiny for a smoke test)"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    small = argparse.Namespace(**{**vars(args), "layers": 2, "seq": min(args.seq, 128), "pairs": min(args.pairs, 4)})
    checks = [exactness(small, torch.float32, k, s, 1e-5) for k in (2, 4) for s in ("shared", "objective_rows")]
    checks += [exactness(small, torch.bfloat16, 2, s, 3e-2) for s in ("shared", "objective_rows")]
    times = [timing(args, k, s) for k in (2, 4) for s in ("shared", "objective_rows")]
    for c in checks:
        print(f"exact {c['dtype']:>15} K={c['k']} {c['shape']:>15}: max rel err {c['max_rel_err']:.2e} {'ok' if c['ok'] else 'FAIL'}")
    print(f"{'K':>2} {'shape':>15} {'weighted ms':>11} {'kpass x':>8} {'onepass x':>9} {'stream x':>8}  "
          "peak GiB (weighted/kpass/onepass/stream)")
    for t in times:
        pk = t["peak_gib"]
        print(f"{t['k']:>2} {t['shape']:>15} {t['ms']['weighted']:>11.1f} {t['kpass_x']:>8.2f} {t['onepass_x']:>9.2f} "
              f"{t['onepass_stream_x']:>8.2f}  {pk['weighted']:.2f}/{pk['kpass']:.2f}/{pk['onepass']:.2f}/{pk['onepass_stream']:.2f}")
    out = Path(os.environ.get("OUT", ".")) / "gpu_check_onepass.json"
    out.write_text(json.dumps({"args": vars(args), "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "exactness": checks,
                               "timing": times}, indent=2))
    print(f"wrote {out}")
    sys.exit(0 if all(c["ok"] for c in checks) else 1)


if __name__ == "__main__":
    main()
