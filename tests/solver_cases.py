"""A shared set of hard inputs for the solver tests: (name, gram, weights, c).

Degenerate on purpose: zero, identical, collinear and opposed gradients, Grams of rank below K,
gradient norms spread over 1e-8..1e8, zeros and one-hots in the weights, c = 0 (torchjd keeps
such a set in tests/unit/aggregation/_inputs.py).
"""

from __future__ import annotations

import numpy as np
import torch


def _gram(G: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(G @ G.T)


def _dirichlet(rng: np.random.Generator, K: int) -> np.ndarray:
    return rng.dirichlet(np.ones(K))


def hard_cases(max_k: int = 8, seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """Degenerate and random (gram, weights, c) for K = 1..max_k."""
    rng = np.random.default_rng(seed)
    cases = []

    def add(name, G, w, c=0.4):
        cases.append((name, _gram(np.asarray(G, dtype=np.float64)), torch.tensor(w, dtype=torch.float64), c))

    e = np.eye(4)
    add("single", [[2.0, 1.0]], [1.0])
    add("single_zero", [[0.0, 0.0]], [1.0])
    add("all_zero", np.zeros((3, 4)), [0.2, 0.3, 0.5])
    add("opposed_pair", [e[0], -e[0]], [0.5, 0.5])
    add("opposed_unequal", [2 * e[0], -e[0]], [0.5, 0.5])
    add("opposed_null_optimum", [e[0], -e[0], e[1]], [0.1, 0.1, 0.8])
    add("identical", [e[0] + e[1], e[0] + e[1], e[2]], [0.3, 0.3, 0.4])
    add("identical_all", [e[0] + 2 * e[1]] * 4, [0.1, 0.2, 0.3, 0.4])
    add("collinear", [e[0], 3 * e[0], -2 * e[0]], [0.2, 0.5, 0.3])
    add("collinear_same_sign", [e[0], 3 * e[0], 0.5 * e[0]], [0.2, 0.5, 0.3])
    add("zero_and_other", [np.zeros(4), e[0] - e[1]], [0.5, 0.5])
    add("zero_gradient_in_three", [e[0], np.zeros(4), -0.5 * e[0] + e[1]], [0.4, 0.3, 0.3])
    add("one_hot_w", [e[0], e[1], -e[0] + 0.2 * e[2]], [0.0, 1.0, 0.0])
    add("zero_w", [e[0], e[1] - e[0], e[2]], [0.5, 0.0, 0.5])
    add("c_zero", [e[0], -e[0] + e[1], e[2]], [0.3, 0.3, 0.4], 0.0)
    add("g0_zero", [e[0], -e[0]], [0.5, 0.5], 0.9)
    add("orthogonal", [e[0], e[1], e[2]], [1 / 3, 1 / 3, 1 / 3])
    add("tiny_vs_huge_one_hot", [1e8 * e[0], 1e-8 * (-0.9 * e[0] + 0.1 * e[1])], [0.0, 1.0])
    add("tiny_vs_huge", [1e8 * e[0], 1e-8 * (-0.9 * e[0] + 0.1 * e[1])], [0.5, 0.5])
    add("near_collinear", [e[0], e[0] + 1e-9 * e[1], -e[0] + 1e-7 * e[2]], [0.3, 0.3, 0.4])
    for K in range(2, max_k + 1):
        for c in (0.4, 0.9):
            add(f"random_K{K}_c{c}", rng.standard_normal((K, K + 2)), _dirichlet(rng, K), c)
        add(f"rank1_K{K}", np.outer(rng.standard_normal(K), rng.standard_normal(5)), _dirichlet(rng, K))
        add(f"rank2_K{K}", rng.standard_normal((K, 2)) @ rng.standard_normal((2, 6)), _dirichlet(rng, K))
        spread = 10.0 ** rng.uniform(-8, 8, size=K)
        add(f"spread_K{K}", spread[:, None] * rng.standard_normal((K, K + 1)), _dirichlet(rng, K))
        w = np.zeros(K)
        w[rng.integers(K)] = 1.0
        add(f"one_hot_K{K}", rng.standard_normal((K, 3)), w)
        G = rng.standard_normal((K, K))
        G[K // 2] = G[0]  # a duplicated objective
        G[-1] = -2.0 * G[1] if K > 2 else G[-1]
        w = _dirichlet(rng, K)
        w[rng.integers(K)] = 0.0
        add(f"duplicated_K{K}", G, w / w.sum())
        G = rng.standard_normal((K, K + 1))
        G[rng.integers(K)] = 0.0
        add(f"zero_row_K{K}", G, _dirichlet(rng, K), 0.6)
        # conflicting: gradients around a cone opposite to each other
        base = rng.standard_normal(K + 1)
        G = np.array([(-1) ** k * base + 0.3 * rng.standard_normal(K + 1) for k in range(K)])
        add(f"conflict_K{K}", G, _dirichlet(rng, K), 0.4)
        # opposed collinear pair with a rounding-level cancellation (v and -k v, k not a power of 2)
        v = rng.standard_normal(K + 1)
        G = rng.standard_normal((K, K + 1))
        G[0], G[1] = v, -rng.uniform(0.2, 5.0) * v
        add(f"cancel_K{K}", G, _dirichlet(rng, K), 0.4)
    return cases
