"""Padding-free vs padded micro-batches: tokens/s and peak memory on HelpSteer's lengths, side by side in one run.

    python benchmarks/padding_free.py                     # tiny Llama on CPU, 8 pairs x 4 batches x 3 reps
    python benchmarks/padding_free.py --model smollm2     # SmolLM2-135M-Instruct (a GPU: bf16, flash_attention_2
                                                          # when flash_attn is installed, else sdpa)
    python benchmarks/padding_free.py --quick             # smoke test (seconds)

Data: micro-batches of ``--pairs`` pairs drawn (seeded) from the bundled
HelpSteer sample (/work/shared/data, raco_ds's "helpsteer" preset), tokenised
by the model's own tokenizer with the trainer's tokenisation, so the rows have
HelpSteer's length distribution under that tokenizer (cut at ``--max-length``).
Every micro-batch is collated both ways from the same pairs
(``PreferenceCollator(padding_free=False/True)``).

One step = forward, per-row response log-probs, the K sigmoid-DPO losses, one
backward of their sum (what a K-pass step or the weighted-loss baseline runs
per micro-batch; the optimizer's cost does not depend on the layout and is left
out). The two layouts alternate in rotating order over ``--reps`` passes over
the batches, after one untimed warm-up pass.

Reported per layout: physical tensor shape and how much of it is padding,
median step time, tokens/s (real tokens, i.e. prompt + response tokens, over
the summed step time), and the peak memory of a step above what was resident
before it (CUDA: ``max_memory_allocated``; CPU: peak RSS, VmHWM, with glibc's
mmap threshold pinned so that freed tensors leave RSS: _common.MALLOC_ENV; the
script re-executes itself with it). The largest difference of a row's log-prob
between the layouts is printed too: the comparison is only fair if both compute
the same thing.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MALLOC_ENV,
    base_parser,
    machine,
    peak_rss,
    print_table,
    reset_peak_rss,
    rss,
    write_json,
)

from raco_ds.data.batch import PreferenceBatch, PreferenceCollator  # noqa: E402
from raco_ds.losses import preference_losses  # noqa: E402

LAYOUTS = ("padded", "packed")


def _load(name: str, attn: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer): the tiny Llama (raco_ds.tiny_models) or SmolLM2-135M-Instruct (raco_ds.smollm2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from raco_ds.smollm2 import ensure_smollm2

        folder = ensure_smollm2()
    else:
        from raco_ds.tiny_models import ensure_tiny_model

        folder = ensure_tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=dtype).to(device)
    return model.train(), AutoTokenizer.from_pretrained(folder)


def _batches(tokenizer: Any, args: Any) -> tuple[list[list[Any]], PreferenceCollator]:
    """``args.batches`` micro-batches of ``args.pairs`` HelpSteer pairs (seeded draw), and a collator for them."""
    from raco_ds.data.loading import load_preference_data
    from raco_ds.data.objectives import get_preset
    from raco_ds.data.tokenization import TokenizationConfig, tokenize_preference_data

    config = TokenizationConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    dataset = tokenize_preference_data(load_preference_data(get_preset("helpsteer")), tokenizer, config)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    need = args.pairs * args.batches
    if need > len(order):
        raise SystemExit(f"--pairs x --batches = {need} pairs, the HelpSteer sample has {len(order)}")
    chosen = [dataset[i] for i in order[:need]]
    batches = [chosen[b * args.pairs : (b + 1) * args.pairs] for b in range(args.batches)]
    return batches, PreferenceCollator(dataset.pad_token_id, dataset.num_objectives)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: Any, batch: PreferenceBatch, reference: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """One forward + backward; returns (seconds, peak bytes above the bytes resident before, row log-probs)."""
    device = batch.input_ids.device
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = rss()
        reset_peak_rss()
    started = time.perf_counter()
    logps, lengths = batch.response_logps(model(**batch.model_inputs(), use_cache=False).logits)
    b = batch.num_pairs
    out = preference_losses(logps[:b], logps[b:], batch.labels, reference_logps_a=reference[:b],
                            reference_logps_b=reference[b:], lengths_a=lengths[:b], lengths_b=lengths[b:])  # fmt: skip
    out.losses.sum().backward()
    _sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    model.zero_grad(set_to_none=True)
    return seconds, peak - before, logps.detach()


def measure(model: Any, batches: list[list[Any]], collator: PreferenceCollator, reps: int,
            device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Both layouts on every batch, in rotating order, ``reps`` times after one warm-up pass; per-layout results."""
    from dataclasses import replace

    collated = [
        {name: replace(collator, padding_free=name == "packed")(items).to(device) for name in LAYOUTS}
        for items in batches
    ]
    with torch.no_grad():  # a reference near the policy, so that no pair's DPO sigmoid saturates
        references = [batch["padded"].response_logps(model(**batch["padded"].model_inputs(), use_cache=False).logits)[0]
                      for batch in collated]  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    peaks: dict[str, list[int]] = {name: [] for name in LAYOUTS}
    max_logp_diff = 0.0
    for rep in range(reps + 1):
        for b, batch in enumerate(collated):
            order = LAYOUTS if (rep + b) % 2 == 0 else LAYOUTS[::-1]
            logps = {}
            for name in order:
                took, peak, logps[name] = _step(model, batch[name], references[b])
                if rep:  # rep 0 warms up (allocator, kernels)
                    seconds[name].append(took)
                    peaks[name].append(peak)
            max_logp_diff = max(max_logp_diff, float((logps["packed"] - logps["padded"]).abs().max()))
    results: dict[str, Any] = {"max_row_logp_diff": max_logp_diff}
    for name in LAYOUTS:
        shapes = [tuple(batch[name].input_ids.shape) for batch in collated]
        real = sum(int(batch[name].attention_mask.sum()) for batch in collated)
        slots = sum(rows * width for rows, width in shapes)
        results[name] = {
            "shapes": shapes, "real_tokens_per_pass": real, "slots_per_pass": slots,
            "pad_fraction": 1 - real / slots, "median_step_s": statistics.median(seconds[name]),
            "tokens_per_s": real * reps / sum(seconds[name]), "peak_mib": max(peaks[name]) / 2**20,
        }  # fmt: skip
    return results


def main() -> None:
    """Parse, load, measure, print the table, write JSON."""
    parser = base_parser(__doc__, "padding_free")
    parser.set_defaults(reps=3)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny", help="tiny Llama or SmolLM2-135M")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (2x rows)")
    parser.add_argument("--batches", type=int, default=4, help="distinct micro-batches, each timed once per rep")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (prompt + response)")
    parser.add_argument("--max-prompt-length", type=int, default=512, help="prompt tokens kept")
    parser.add_argument("--attn", help="attention implementation (default: flash_attention_2 on CUDA when "
                        "flash_attn imports, else sdpa)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs' draw")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})  # RSS must track frees
    if args.quick:
        args.model, args.pairs, args.batches, args.reps = "tiny", 2, 2, 1
        args.max_length, args.max_prompt_length = 256, 64
    if args.attn is None:
        try:
            import flash_attn  # noqa: F401

            args.attn = "flash_attention_2" if device.type == "cuda" else "sdpa"
        except ImportError:
            args.attn = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = machine()
    torch.manual_seed(args.seed)
    model, tokenizer = _load(args.model, args.attn, dtype, device)
    batches, collator = _batches(tokenizer, args)
    results = measure(model, batches, collator, args.reps, device)
    padded = results["padded"]
    rows = []
    for name in LAYOUTS:
        r = results[name]
        rows_n = sum(s[0] for s in r["shapes"]) / len(r["shapes"])
        width = sum(s[1] for s in r["shapes"]) / len(r["shapes"])
        rows.append([name, f"{rows_n:.1f} x {width:.0f}", r["real_tokens_per_pass"] // len(batches),
                     f"{100 * r['pad_fraction']:.0f}%", f"{r['median_step_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f}x", f"{r['peak_mib']:.0f}",
                     f"{r['peak_mib'] / padded['peak_mib']:.2f}x"])  # fmt: skip
    title = (f"padding-free vs padded: {args.model}, {args.attn}, {str(dtype).removeprefix('torch.')}, {device.type}; "
             f"{args.pairs} HelpSteer pairs per micro-batch, max_length {args.max_length}, {args.batches} batches x "
             f"{args.reps} reps")  # fmt: skip
    print_table(title, ["layout", "rows x T (mean)", "tokens/batch", "padding", "step s (median)", "tokens/s",
                        "vs padded", "peak MiB", "vs padded"], rows,  # fmt: skip
                note=f"largest |row log-prob difference| packed vs padded: {results['max_row_logp_diff']:.2e}; "
                f"load average at start {started['load_avg_1m']}")  # fmt: skip
    write_json(args.json, "padding_free", vars(args), results, started=started)


if __name__ == "__main__":
    main()
