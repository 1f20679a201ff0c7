"""Median wall time of the RACO solver over random Grams, per number of objectives K.

    python benchmarks/solver_speed.py [--repeats 200] [--ks 1 2 3 4 6 8 10 12]

Prints one table row per K: median milliseconds of ``solve_dual`` and of
``raco_coefficients`` (validation included), over random rank-deficient and full-rank Grams.
Targets (issue 2): well under 1 ms for K <= 4, under 20 ms for K = 8.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from raco_ds.solver import raco_coefficients, solve_dual


def _inputs(K: int, repeats: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(repeats):
        rank = K if i % 2 == 0 else max(1, K // 2)  # half full rank, half rank-deficient
        G = rng.standard_normal((K, rank))
        out.append((torch.from_numpy(G @ G.T), torch.from_numpy(rng.dirichlet(np.ones(K)))))
    return out


def _median_ms(fn, inputs) -> float:
    times = []
    for gram, weights in inputs:
        start = time.perf_counter()
        fn(gram, weights, 0.4)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 10, 12, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'K':>3} {'solve_dual ms':>14} {'raco_coefficients ms':>21}   (median of {args.repeats})")
    for K in args.ks:
        inputs = _inputs(K, args.repeats, args.seed + K)
        _median_ms(solve_dual, inputs[:5])  # warm caches (subset tables, numpy dispatch)
        dual = _median_ms(solve_dual, inputs)
        coef = _median_ms(raco_coefficients, inputs)
        print(f"{K:>3} {dual:>14.3f} {coef:>21.3f}")


if __name__ == "__main__":
    main()
