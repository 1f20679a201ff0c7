"""The RACO solver: optimality against independent brute force, certificates, properties, errors."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import raco_ds.solver as solver
from raco_ds.solver import (
    AGGREGATORS,
    Aggregation,
    aggregate,
    dual_gap,
    get_aggregator,
    raco_coefficients,
    register_aggregator,
    solve_dual,
)
from solver_cases import hard_cases

CASES = hard_cases(max_k=8)
SMALL = [case for case in CASES if case[1].shape[0] <= 3]
LARGER = [case for case in CASES if case[1].shape[0] >= 4]


def _ids(cases):
    return [case[0] for case in cases]


# ---------------------------------------------------------------------------------------------
# An independent statement of the problem (plain numpy on the raw Gram, no solver internals)


def _terms(H: np.ndarray, w: np.ndarray, c: float):
    b = H @ w
    s = c * math.sqrt(max(float(w @ H @ w), 0.0))
    scale = float(np.max(np.abs(b) + s * np.sqrt(np.clip(np.diag(H), 0, None)))) or 1.0
    return b, s, scale


def _f(H, w, c, p):
    b, s, _ = _terms(H, w, c)
    p = np.atleast_2d(p)
    quad = np.einsum("ni,ij,nj->n", p, H, p)
    return p @ b + s * np.sqrt(np.clip(quad, 0, None))


def _f_error(H, w, c, p):
    """How far the float evaluation of f(p) can be off: the Gram's rounding (1e-16 relative)
    moves p^T H p by delta, and sqrt turns that into up to sqrt(delta) where the gradients
    cancel (p^T H p ~ 0). Away from cancellation this is negligible."""
    _, s, _ = _terms(H, w, c)
    p = np.atleast_2d(p)
    quad = np.clip(np.einsum("ni,ij,nj->n", p, H, p), 0, None)
    delta = 1e-15 * (p @ np.sqrt(np.clip(np.diag(H), 0, None))) ** 2
    return s * (np.sqrt(quad + delta) - np.sqrt(quad))


def _grid(K: int, n: int) -> np.ndarray:
    if K == 1:
        return np.ones((1, 1))
    if K == 2:
        t = np.linspace(0, 1, n + 1)
        return np.stack([t, 1 - t], axis=1)
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    a, b = i[keep] / n, j[keep] / n
    return np.stack([a, b, 1 - a - b], axis=1)


def _slsqp(fun, K: int, starts: list[np.ndarray], error=lambda p: 0.0) -> float:
    """Multi-start SLSQP on the simplex: an upper bound on the best value found (plus its
    evaluation error: near cancellation a float f can read below the true one)."""
    best = math.inf
    cons = [{"type": "eq", "fun": lambda p: p.sum() - 1.0, "jac": lambda p: np.ones_like(p)}]
    for x0 in starts:
        res = minimize(fun, x0, method="SLSQP", bounds=[(0, 1)] * K, constraints=cons,
                       options={"ftol": 1e-15, "maxiter": 500})
        p = np.clip(res.x, 0, None)
        p = p / p.sum()
        best = min(best, float(fun(p)) + float(error(p)))
    return best


def _starts(K: int, rng: np.random.Generator, n: int = 6) -> list[np.ndarray]:
    return [np.full(K, 1.0 / K)] + [np.eye(K)[i] * 0.9 + 0.1 / K for i in range(min(K, 3))] + [
        rng.dirichlet(np.ones(K)) for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Optimality


def test_docstring_examples():
    result = doctest.testmod(solver, raise_on_error=False, verbose=False)
    assert result.attempted >= 6 and result.failed == 0


@pytest.mark.parametrize("name,gram,weights,c", CASES, ids=_ids(CASES))
def test_certificate_on_hard_cases(name, gram, weights, c):
    p = solve_dual(gram, weights, c)
    assert p.dtype == torch.float64 and p.shape == weights.shape
    assert bool((p >= 0).all()) and abs(float(p.sum()) - 1) < 1e-12
    assert dual_gap(gram, weights, c, p) <= 1e-9


@pytest.mark.parametrize("name,gram,weights,c", SMALL, ids=_ids(SMALL))
def test_beats_dense_grid(name, gram, weights, c):
    H, w = gram.numpy(), weights.numpy()
    K = H.shape[0]
    grid = _grid(K, 4000 if K == 2 else 300)
    p = solve_dual(gram, weights, c).numpy()
    _, _, scale = _terms(H, w, c)
    values = _f(H, w, c, grid)
    at = int(np.argmin(values))
    grid_best = float(values[at])
    found = float(_f(H, w, c, p)[0])
    slack = float(_f_error(H, w, c, grid[at])[0] + _f_error(H, w, c, p)[0])
    assert found <= grid_best + 1e-12 * scale + slack
    # and the grid is not far off: the solver's answer is the minimum, not a lucky low value
    assert grid_best - found <= 1e-3 * scale


@pytest.mark.parametrize("name,gram,weights,c", LARGER, ids=_ids(LARGER))
def test_beats_multistart_slsqp(name, gram, weights, c):
    H, w = gram.numpy(), weights.numpy()
    K = H.shape[0]
    rng = np.random.default_rng(K)
    _, _, scale = _terms(H, w, c)
    p = solve_dual(gram, weights, c).numpy()
    found = float(_f(H, w, c, p)[0]) - float(_f_error(H, w, c, p)[0])
    best = _slsqp(lambda q: float(_f(H, w, c, q)[0]), K, _starts(K, rng), lambda q: _f_error(H, w, c, q)[0])
    assert found <= best + 1e-9 * scale


@pytest.mark.parametrize("K,rank", [(13, 13), (16, 3), (14, 14)])
def test_beyond_enumeration_is_certified(K, rank):
    rng = np.random.default_rng(K + rank)
    G = rng.standard_normal((K, rank))
    gram, weights = torch.from_numpy(G @ G.T), torch.from_numpy(rng.dirichlet(np.ones(K)))
    p = solve_dual(gram, weights, 0.4)
    assert dual_gap(gram, weights, 0.4, p) <= 1e-9
    H, w = gram.numpy(), weights.numpy()
    best = _slsqp(lambda q: float(_f(H, w, 0.4, q)[0]), K, _starts(K, rng, 2), lambda q: _f_error(H, w, 0.4, q)[0])
    assert float(_f(H, w, 0.4, p.numpy())[0] - _f_error(H, w, 0.4, p.numpy())[0]) <= best + 1e-9 * _terms(H, w, 0.4)[2]


def _closed_form_k2(H: np.ndarray, w: np.ndarray, c: float) -> float:
    """t* for p = (t, 1 - t): the K = 2 dual in closed form.

    f(t) = b2 + t delta + s sqrt(q(t)), delta = b1 - b2, q(t) = alpha t^2 - 2 beta t + B with
    alpha = ||g1 - g2||^2, beta = B - C. With u = alpha t - beta, q = (u^2 + D) / alpha, D = AB - C^2,
    f'(t) = 0 gives u^2 (s^2 alpha - delta^2) = delta^2 D with sign(u) = -sign(delta). If
    s^2 alpha <= delta^2, f is monotone and a vertex wins. f is convex: clip to [0, 1].
    """
    (A, C), (_, B) = H
    b = H @ w
    s = c * math.sqrt(w @ H @ w)
    delta, alpha, beta, D = b[0] - b[1], A + B - 2 * C, B - C, A * B - C * C
    if s * s * alpha <= delta * delta:
        return 0.0 if delta > 0 else 1.0
    u = -math.copysign(abs(delta) * math.sqrt(D / (s * s * alpha - delta * delta)), delta)
    return min(max((u + beta) / alpha, 0.0), 1.0)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=6, max_size=6),
    st.floats(0.0, 1.0),
    st.floats(0.01, 0.99),
)
def test_k2_closed_form(entries, w1, c):
    G = np.array(entries).reshape(2, 3)
    H = G @ G.T
    if H[0, 0] + H[1, 1] - 2 * H[0, 1] < 1e-6 or np.linalg.det(H) < 1e-6:
        return  # identical or collinear gradients: p need not be unique (covered elsewhere)
    w = np.array([w1, 1 - w1])
    t = _closed_form_k2(H, w, c)
    p = solve_dual(torch.from_numpy(H), torch.from_numpy(w), c).numpy()
    assert abs(p[0] - t) <= 1e-7


# ---------------------------------------------------------------------------------------------
# Properties


@st.composite
def _problems(draw, max_k: int = 6):
    K = draw(st.integers(1, max_k))
    rank = draw(st.integers(1, K + 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((K, rank)) * 10.0 ** rng.uniform(-3, 3, size=(K, 1)) ** draw(st.integers(0, 1))
    if K >= 2 and draw(st.booleans()):
        G[1] = draw(st.sampled_from([1.0, -1.0, 2.0, 0.0])) * G[0]
    w = rng.dirichlet(np.ones(K)) * (rng.random(K) < 0.8)
    if w.sum() == 0:
        w[0] = 1.0
    w = w / w.sum()
    c = draw(st.sampled_from([0.0, 0.1, 0.4, 0.9, 0.999]))
    return torch.from_numpy(G @ G.T), torch.from_numpy(w), c


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_properties(problem):
    gram, weights, c = problem
    agg = aggregate("raco", gram, weights, c)
    p, pt, a = agg.dual, agg.dual_clipped, agg.coefficients
    assert dual_gap(gram, weights, c, p) <= 1e-9
    assert torch.equal(pt, torch.minimum(p, weights))  # p~ = min(p, w), not renormalised
    assert bool((pt <= weights).all())
    assert bool((a >= weights).all())
    assert agg.clip_active == bool((pt < p).any())
    cag = aggregate("cagrad", gram, weights, c)
    assert torch.allclose(cag.coefficients, raco_coefficients(gram, weights, c, clip=False), rtol=0, atol=0)
    assert torch.equal(cag.dual, cag.dual_clipped) and not cag.clip_active
    if c == 0.0:
        assert torch.equal(a, weights)


@settings(max_examples=60, deadline=None)
@given(_problems(max_k=5), st.floats(-10, 15))
def test_scaling_the_gram_leaves_p_unchanged(problem, log_t):
    gram, weights, c = problem
    p = solve_dual(gram, weights, c)
    scaled = solve_dual(gram * 10.0**log_t, weights, c)
    assert torch.allclose(p, scaled, rtol=0, atol=1e-9)


@pytest.mark.parametrize("t", [1e-10, 1e-5, 1e5, 1e10, 1e15])
@pytest.mark.parametrize("name,gram,weights,c", CASES[:20], ids=_ids(CASES[:20]))
def test_scaling_hard_cases(name, gram, weights, c, t):
    assert torch.allclose(solve_dual(gram, weights, c), solve_dual(gram * t, weights, c), rtol=0, atol=1e-9)


def test_c_zero_gives_weights():
    gram = torch.tensor([[1.0, -0.9], [-0.9, 2.0]], dtype=torch.float64)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.equal(raco_coefficients(gram, w, 0.0), w)
    assert torch.equal(raco_coefficients(gram, w, 0.0, clip=False), w)


def test_coefficients_formula():
    G = np.array([[1.0, 0.0, 0.2], [-0.6, 0.8, 0.0], [0.1, -0.3, 1.0]])
    H, w, c = G @ G.T, np.array([0.5, 0.3, 0.2]), 0.4
    agg = aggregate("raco", torch.from_numpy(H), torch.from_numpy(w), c)
    p = agg.dual.numpy()
    pt = np.minimum(p, w)
    s = c * math.sqrt(w @ H @ w)
    expected = w + s / math.sqrt(pt @ H @ pt) * pt  # no 1/(1+c^2) rescale
    assert np.allclose(agg.coefficients.numpy(), expected, rtol=1e-13, atol=0)


def test_identical_objectives_are_treated_equally():
    g = np.array([1.0, 2.0, 0.0])
    G = np.array([g, g, [0.0, -1.0, 1.0]])
    p = solve_dual(torch.from_numpy(G @ G.T), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64), 0.4)
    assert abs(float(p[0] - p[1])) < 1e-12


def test_linear_gives_weights():
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    agg = aggregate("linear", torch.eye(3, dtype=torch.float64), w, 0.4)
    assert torch.equal(agg.coefficients, w) and agg.dual is None and not agg.clip_active


@pytest.mark.parametrize("name,gram,weights,c", CASES, ids=_ids(CASES))
def test_mgda_is_the_min_norm_point(name, gram, weights, c):
    H = gram.numpy()
    K = H.shape[0]
    a = aggregate("mgda", gram, weights, c).coefficients.numpy()
    assert (a >= 0).all() and abs(a.sum() - 1) < 1e-12
    top = max(float(np.diag(H).max()), 1e-300)
    Ha = H @ a
    assert 2 * (a @ Ha - Ha.min()) <= 1e-9 * top  # Frank-Wolfe gap of p^T H p
    best = _slsqp(lambda p: float(p @ H @ p), K, _starts(K, np.random.default_rng(0), 3))
    assert a @ H @ a <= best + 1e-12 * top


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry():
    assert {"raco", "cagrad", "linear", "mgda"} <= set(AGGREGATORS)
    assert get_aggregator("raco") is AGGREGATORS["raco"]
    with pytest.raises(ValueError, match=r"unknown aggregator 'nope'.*'cagrad'.*'raco'"):
        get_aggregator("nope")
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate("nope", torch.eye(2, dtype=torch.float64), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("raco")(lambda gram, weights, c: Aggregation(weights))

    @register_aggregator("_test_first")
    def _first(gram, weights, c):
        return Aggregation(torch.nn.functional.one_hot(torch.tensor(0), gram.shape[0]).double())

    try:
        out = aggregate("_test_first", torch.eye(3, dtype=torch.float64) * 2, torch.tensor([0.2, 0.3, 0.5]))
        assert out.coefficients.tolist() == [1.0, 0.0, 0.0]
        with pytest.raises(ValueError, match="sum to 1"):
            aggregate("_test_first", torch.eye(3, dtype=torch.float64), torch.tensor([0.2, 0.3, 0.6]))
    finally:
        AGGREGATORS.pop("_test_first")


# ---------------------------------------------------------------------------------------------
# Bad input

_EYE = torch.eye(2, dtype=torch.float64)
_W = torch.tensor([0.5, 0.5], dtype=torch.float64)

BAD = [
    ("nan_gram", torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), _W, 0.4, r"NaN or inf \(rows \[0, 1\]\)"),
    ("inf_gram", torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), _W, 0.4, r"NaN or inf \(rows \[0\]\).*skip the step"),
    ("non_square", torch.ones(2, 3), _W, 0.4, r"square K x K.*got shape \(2, 3\)"),
    ("vector_gram", torch.ones(3), _W, 0.4, r"square K x K.*got shape \(3,\)"),
    ("empty_gram", torch.ones(0, 0), torch.ones(0), 0.4, r"non-empty square"),
    ("asymmetric", torch.tensor([[1.0, 0.5], [0.2, 1.0]]), _W, 0.4, r"not symmetric.*\(H \+ H\.T\) / 2"),
    ("not_psd", torch.tensor([[1.0, 2.0], [2.0, 1.0]]), _W, 0.4,
     r"not positive semi-definite: min eigenvalue -1\.000e\+00"),
    ("negative_diag", torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), _W, 0.4, r"not positive semi-definite"),
    ("negative_weight", _EYE, torch.tensor([1.2, -0.2], dtype=torch.float64), 0.4,
     r"non-negative, got \[1\.2, -0\.2"),
    ("weights_sum", _EYE, torch.tensor([0.5, 0.6], dtype=torch.float64), 0.4,
     r"sum to 1 \(tolerance 1e-06\), got sum 1\.1.*divide them by their sum"),
    ("weights_length", _EYE, torch.tensor([0.2, 0.3, 0.5]), 0.4, r"length K = 2.*got shape \(3,\)"),
    ("weights_matrix", _EYE, torch.full((2, 1), 0.5), 0.4, r"length K = 2.*got shape \(2, 1\)"),
    ("weights_nan", _EYE, torch.tensor([float("nan"), 0.5]), 0.4, r"weights contain NaN or inf"),
    ("c_one", _EYE, _W, 1.0, r"c must lie in \[0, 1\), got 1\.0"),
    ("c_negative", _EYE, _W, -0.1, r"c must lie in \[0, 1\), got -0\.1"),
    ("c_nan", _EYE, _W, float("nan"), r"c must be a finite float"),
    ("c_string", _EYE, _W, "0.4", r"c must be a finite float in \[0, 1\), got '0\.4'"),
]


@pytest.mark.parametrize("name,gram,weights,c,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("entry", ["solve_dual", "raco_coefficients", "aggregate_raco", "aggregate_linear", "dual_gap"])
def test_bad_input_raises(name, gram, weights, c, match, entry):
    calls = {
        "solve_dual": lambda: solve_dual(gram, weights, c),
        "raco_coefficients": lambda: raco_coefficients(gram, weights, c),
        "aggregate_raco": lambda: aggregate("raco", gram, weights, c),
        "aggregate_linear": lambda: aggregate("linear", gram, weights, c),
        "dual_gap": lambda: dual_gap(gram, weights, c, weights),
    }
    with pytest.raises(ValueError, match=match):
        calls[entry]()


def test_rounding_is_not_bad_input():
    G = np.random.default_rng(3).standard_normal((4, 2))
    H = G @ G.T
    H[0, 1] += 1e-14  # asymmetric and slightly indefinite, both by rounding only
    w = torch.full((4,), 0.25, dtype=torch.float64) + torch.tensor([1e-9, 0, 0, -1e-9], dtype=torch.float64)
    assert dual_gap(torch.from_numpy(H), w, 0.4, solve_dual(torch.from_numpy(H), w, 0.4)) <= 1e-9


def test_certificate_at_the_origin():
    """Where U p = 0, f is not differentiable: the certificate uses the NNLS dual point."""
    e = np.eye(3)
    gram = torch.from_numpy(np.array([e[0], -e[0], e[1]]) @ np.array([e[0], -e[0], e[1]]).T)
    null = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    w = torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64)
    assert dual_gap(gram, w, 0.4, null) <= 1e-15  # d = 0 is optimal here
    assert torch.allclose(solve_dual(gram, w, 0.4), null, atol=1e-12)
    w = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)
    assert dual_gap(gram, w, 0.4, null) > 0.1  # ... and not here: f(e_2) < 0 = f(null)
    assert dual_gap(gram, w, 0.4, solve_dual(gram, w, 0.4)) <= 1e-9


def test_dual_gap_detects_a_wrong_answer():
    G = np.array([[1.0, 0.0], [-0.8, 0.6], [0.0, -1.0]])
    gram, w = torch.from_numpy(G @ G.T), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    p = solve_dual(gram, w, 0.4)
    assert dual_gap(gram, w, 0.4, p) <= 1e-9
    assert dual_gap(gram, w, 0.4, (p + w) / 2) > 1e-6


def test_cancelling_gradients_give_finite_coefficients():
    """At a dual optimum with G p = 0 up to rounding, CAGrad's a is w, not w + s / 1e-9 * p."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        v, u = rng.standard_normal(4), rng.standard_normal(4)
        u -= (u @ v) / (v @ v) * v
        v, u = v / np.linalg.norm(v), u / np.linalg.norm(u)  # then d = 0 is the optimum
        G = np.array([v, -3.0 * v, u])
        gram = torch.from_numpy(G @ G.T)
        w = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
        agg = aggregate("cagrad", gram, w, 0.4)
        assert dual_gap(gram, w, 0.4, agg.dual) <= 1e-9
        assert torch.allclose(agg.dual, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64), atol=1e-12)
        assert torch.equal(agg.coefficients, w)
