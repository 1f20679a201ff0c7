"""RACO's Gram-space math: from the K x K Gram of the objectives' gradients to coefficients.

Everything here is a small pure function of a float64 Gram ``H`` (``H_ij = <g_i, g_j>``),
user weights ``w`` on the simplex and a conflict radius ``c`` in [0, 1) (DESIGN.md s.1)::

    b  = H w,   s = c * sqrt(w^T H w)
    p  = argmin_{p in simplex} f(p),   f(p) = b^T p + s * sqrt(p^T H p)     (the dual)
    p~ = min(p, w) elementwise (RACO's clip, not renormalised; p~ = p for CAGrad)
    a  = w + s / sqrt(p~^T H p~) * p~   (a = w when s == 0 or p~^T H p~ == 0)

How the dual is solved exactly. Factor ``H = U^T U`` (columns ``u_k`` play the role of the
gradients) and write ``d = U p``, ``g0 = U w``: then ``f = <g0, d> + s ||d||`` over the polytope
``conv{u_k}``. On a face F whose vertices are affinely independent, with ``Q`` an orthonormal
basis of the face's direction space and ``d0`` its affine hull's point closest to the origin, the
stationary point is ``d = d0 - kappa * Q Q^T g0`` with ``kappa = ||d0|| / sqrt(s^2 - ||Q^T g0||^2)``
(the ``lambda``-quadratic of the Gram form, solved geometrically, which stays accurate on
nearly singular faces). Some optimum lies in the relative interior of such a face: a vertex of
``{p in simplex : U p = d*}`` has affinely independent support (Caratheodory), and if that face's
affine hull contains the origin, f is positively homogeneous there, so the optimum slides towards
the origin onto a lower face or onto ``d = 0`` itself (covered by ``kappa = 0``). Enumerating all
faces (batched by size, numpy) therefore finds the optimum for K <= ``ENUMERATION_MAX_K``. Above
that, the optimum is ``d* = proj_hull(-g0 / mu)`` for a ``mu`` with ``mu ||d*|| = s``: Wolfe's
exact min-norm-point algorithm inside a bisection on ``mu``, polished if needed by enumeration on
working sets of objectives. Either way the answer must pass a duality-gap certificate (the
Frank-Wolfe gap where f is differentiable, a dual point from a non-negative least-squares problem
where ``U p = 0``); if it fails, a projected-gradient fallback is re-certified, and otherwise
:class:`SolverError` is raised.

Where the optimum is not unique (identical or affinely dependent gradients), the distinct optimal
face solutions are averaged, so that equal objectives get equal duals whatever the rounding.

>>> import torch
>>> gram = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
>>> w = torch.tensor([0.5, 0.5], dtype=torch.float64)
>>> solve_dual(gram, w, 0.4).tolist()
[0.5, 0.5]
>>> [round(x, 6) for x in raco_coefficients(gram, w, 0.4).tolist()]
[0.7, 0.7]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np
import torch

__all__ = [
    "AGGREGATORS",
    "Aggregation",
    "Aggregator",
    "ENUMERATION_MAX_K",
    "SolverError",
    "aggregate",
    "dual_gap",
    "get_aggregator",
    "raco_coefficients",
    "register_aggregator",
    "solve_dual",
    "validate_weights",
]

ENUMERATION_MAX_K = 12
"""Largest K solved by enumerating every face (2^K - 1 of them, batched); above it, Wolfe + bisection."""

GAP_TOLERANCE = 1e-9
"""Required relative duality (Frank-Wolfe) gap of every returned dual."""

_SYMMETRY_RTOL = 1e-8  # an all-reduced S S^T is symmetric to rounding, far below this
_PSD_RTOL = 1e-8  # eigenvalues above -1e-8 * scale are rounding of a true Gram
_WEIGHT_SUM_TOL = 1e-6
_EIG_KEEP = 1e-14  # correlation eigenvalues below this (relative) are rounding, not directions
_INDEPENDENT = 1e-13  # a face is affinely dependent when a QR pivot is this small (relative)
_FEASIBLE = 1e-10  # barycentric coordinates above -this are rounding of a point on the face
_CANCELLED = 1e-12  # ||U p|| below this times sum_k p_k ||u_k|| is cancellation to rounding: 0
_TIE = 1e-12  # candidates this close in f (relative to its terms) are equally optimal: average them


class SolverError(RuntimeError):
    """The dual could not be certified optimal (a bug: please report the Gram and weights)."""


# --------------------------------------------------------------------------------------------
# Validation


def _as_numpy(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a tensor of numbers, got {type(x).__name__}: {error}") from None


def _checked_weights(weights, K: int | None = None) -> np.ndarray:
    """User weights as float64 numpy, checked to be a point on the simplex (of dimension K if given)."""
    w = _as_numpy(weights, "weights")
    if w.ndim != 1 or w.shape[0] == 0 or (K is not None and w.shape[0] != K):
        expected = f"length K = {K} (one per objective, matching the gram)" if K is not None else "one per objective"
        raise ValueError(f"weights must be a vector of {expected}, got shape {tuple(w.shape)}")
    if not np.isfinite(w).all():
        raise ValueError(f"weights contain NaN or inf: {w.tolist()}; pass finite weights on the simplex")
    if (w < 0).any():
        raise ValueError(
            f"weights must be non-negative, got {w.tolist()}; user weights lie on the simplex, "
            "use 0 to ignore an objective"
        )
    if abs(float(w.sum()) - 1.0) > _WEIGHT_SUM_TOL:
        raise ValueError(
            f"weights must sum to 1 (tolerance {_WEIGHT_SUM_TOL:g}), got sum {float(w.sum())!r} for "
            f"{w.tolist()}; divide them by their sum"
        )
    return w


def validate_weights(weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """User weights as a float64 CPU tensor, or a ValueError saying why they are not on the simplex.

    Framework adapters call this once at construction, so a bad weight vector
    fails before any training step.

    >>> validate_weights([0.25, 0.75]).tolist()
    [0.25, 0.75]
    >>> validate_weights([0.5, 0.6])
    Traceback (most recent call last):
    ...
    ValueError: weights must sum to 1 (tolerance 1e-06), got sum 1.1 for [0.5, 0.6]; divide them by their sum
    """
    return torch.from_numpy(_checked_weights(weights).copy())


def _validate(gram, weights, c: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Check the inputs and return (symmetrised Gram, weights, c) as float64 numpy.

    Every message says what was found, why it fails and how to fix it.
    """
    H = _as_numpy(gram, "gram")
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(
            f"gram must be a non-empty square K x K matrix, got shape {tuple(H.shape)}; "
            "pass H_ij = <g_i, g_j> for the K objectives' gradients"
        )
    K = H.shape[0]
    if not np.isfinite(H).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(H))[:, 0]})
        raise ValueError(
            f"gram contains NaN or inf (rows {bad}); a non-finite gradient has no defined Gram, "
            "skip the step or fix the loss of those objectives"
        )
    scale = float(np.abs(H).max())
    asym = float(np.abs(H - H.T).max())
    if asym > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"gram is not symmetric: max |H - H^T| = {asym:.3e} vs max |H| = {scale:.3e}; "
            "a Gram of gradients is symmetric, so pass (H + H.T) / 2 if this is rounding, "
            "else check how the matrix was built"
        )
    H = 0.5 * (H + H.T)
    if scale > 0:
        eigs = np.linalg.eigvalsh(H)
        top = float(np.abs(eigs).max())
        if eigs[0] < -_PSD_RTOL * top:
            raise ValueError(
                f"gram is not positive semi-definite: min eigenvalue {eigs[0]:.3e} vs max |eigenvalue| "
                f"{top:.3e}; a Gram of gradients has no negative eigenvalue beyond rounding, "
                "so build it as G @ G.T in float64"
            )
    w = _checked_weights(weights, K)
    if isinstance(c, bool) or not isinstance(c, (int, float, np.floating, np.integer)) or not math.isfinite(c):
        raise ValueError(f"c must be a finite float in [0, 1), got {c!r}")
    if not 0.0 <= float(c) < 1.0:
        raise ValueError(
            f"c must lie in [0, 1), got {c!r}; c is the conflict radius relative to ||g0|| "
            "(paper default 0.4), c >= 1 lets the update leave the half-space of g0"
        )
    return H, w, float(c)


# --------------------------------------------------------------------------------------------
# The factored problem


@dataclass(frozen=True)
class _Problem:
    """The dual in factored form, normalised so that max_k H_kk = 1 (p is scale invariant)."""

    H: np.ndarray  # (K, K) normalised Gram
    U: np.ndarray  # (r, K), U^T U ~= H
    b: np.ndarray  # (K,) H w
    g0: np.ndarray  # (r,) U w
    s: float  # c * ||g0||


def _factor(H: np.ndarray) -> np.ndarray:
    """U (r x K) with U^T U = H, accurate column by column whatever the spread of norms.

    Gradient norms spread over 1e-8..1e8 make H's diagonal spread over 1e32: an eigendecomposition
    of H itself would lose every small gradient in rounding. Factoring the correlation matrix
    D^-1/2 H D^-1/2 and scaling back keeps each column's relative accuracy.
    """
    K = H.shape[0]
    diag = np.clip(np.diag(H), 0.0, None)
    nonzero = np.flatnonzero(diag > 0)
    if nonzero.size == 0:
        return np.zeros((1, K))
    root = np.sqrt(diag[nonzero])
    corr = H[np.ix_(nonzero, nonzero)] / np.outer(root, root)
    lam, V = np.linalg.eigh(corr)
    keep = lam > _EIG_KEEP * lam[-1]
    Ut = np.sqrt(lam[keep])[:, None] * V[:, keep].T
    U = np.zeros((Ut.shape[0], K))
    U[:, nonzero] = Ut * root
    return U


def _problem(H: np.ndarray, w: np.ndarray, c: float) -> _Problem:
    top = float(np.diag(H).max())
    Hn = H / top if top > 0 else np.zeros_like(H)
    U = _factor(Hn)
    g0 = U @ w
    s = c * math.sqrt(max(float(w @ Hn @ w), 0.0))
    return _Problem(H=Hn, U=U, b=Hn @ w, g0=g0, s=s)


def _objective(P: _Problem, p: np.ndarray) -> np.ndarray:
    """f for one p (K,) or a batch (n, K)."""
    d = p @ P.U.T
    return p @ P.b + P.s * np.sqrt(np.einsum("...r,...r->...", d, d))


def dual_gap(gram: torch.Tensor, weights: torch.Tensor, c: float, p: torch.Tensor) -> float:
    """Relative duality gap of a candidate dual ``p``: 0 at the optimum, <= 1e-9 for every answer.

    Where ``p^T H p > 0`` this is the Frank-Wolfe gap ``grad^T p - min_i grad_i`` of
    f(p) = b^T p + s sqrt(p^T H p); where ``U p = 0`` (f is not differentiable) the dual point comes
    from a non-negative least-squares problem. Divided by ``max_i |b_i| + s sqrt(H_ii)``, a bound on
    the size of the gradient entries, so it is invariant to scaling H.

    >>> import torch
    >>> gram = torch.eye(2, dtype=torch.float64)
    >>> w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    >>> dual_gap(gram, w, 0.4, torch.tensor([0.5, 0.5], dtype=torch.float64)) < 1e-15
    True
    """
    H, w, c = _validate(gram, weights, c)
    P = _problem(H, w, c)
    return _gap(P, _as_numpy(p, "p"))


def _gap_scale(P: _Problem) -> float:
    return float(np.max(np.abs(P.b) + P.s * np.sqrt(np.clip(np.diag(P.H), 0, None)))) or 1.0


def _gap(P: _Problem, p: np.ndarray) -> float:
    """Relative duality gap f(p) - (a lower bound on min f), see :func:`dual_gap`."""
    scale = _gap_scale(P)
    if P.s == 0.0:
        return float(p @ P.b - P.b.min()) / scale
    # ||U p||, not sqrt(p^T H p): where the gradients cancel (U p ~ 0), the square root would
    # turn the Gram's rounding (1e-16) into an error of 1e-8 in f.
    d = P.U @ p
    norm_d = float(np.linalg.norm(d))
    value = float(p @ P.b) + P.s * norm_d
    gap = math.inf
    if norm_d > _CANCELLED * float(p @ np.linalg.norm(P.U, axis=0)):
        # y = s * d / ||d|| is dual feasible; b + U^T y is exactly the gradient of f at p.
        grad = P.b + P.s * (P.U.T @ d) / norm_d
        gap = value - float(grad.min())
    if gap > GAP_TOLERANCE * scale:
        # Near U p = 0 the gradient is unstable; use the best dual point y = U q, with
        # q = argmin_{q >= 0} ||g0 + U q|| (Moreau: the distance from g0 to {z : U^T z >= 0}).
        q = _nnls(P.U, -P.g0)
        y = P.U @ q
        norm = float(np.linalg.norm(y))
        if norm > P.s:
            y *= P.s / norm
        gap = min(gap, value - float((P.b + P.U.T @ y).min()))
    return max(gap, 0.0) / scale


def _nnls(A: np.ndarray, t: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin_{x >= 0} ||A x - t|| by Lawson-Hanson's active set (exact, finitely many steps)."""
    n = A.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(A).max()) * max(1.0, float(np.abs(t).max())))
    for _ in range(max_iter or 3 * n + 10):
        grad = A.T @ (t - A @ x)
        grad[passive] = -np.inf
        j = int(np.argmax(grad))
        if grad[j] <= tol:
            break
        passive[j] = True
        while True:
            idx = np.flatnonzero(passive)
            z = np.zeros(n)
            z[idx] = np.linalg.lstsq(A[:, idx], t, rcond=None)[0]
            if (z[idx] > 0).all():
                x = z
                break
            neg = idx[z[idx] <= 0]
            ratios = x[neg] / (x[neg] - z[neg])
            x = x + float(ratios.min()) * (z - x)
            x[neg[np.argmin(ratios)]] = 0.0  # at least one index leaves: the loop terminates
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


# --------------------------------------------------------------------------------------------
# Face solves


@lru_cache(maxsize=64)
def _subsets(K: int, m: int) -> np.ndarray:
    return np.array(list(combinations(range(K), m)), dtype=np.intp).reshape(-1, m)


def _face_candidates(U: np.ndarray, g0: np.ndarray, s: float, faces: np.ndarray, min_norm: bool) -> np.ndarray:
    """Stationary points of the faces ``faces`` (n, m), as full simplex vectors (n', K).

    Faces without an interior stationary point, affinely dependent faces and candidates outside
    their face are dropped. The first vertex of each face must be its shortest (accuracy: the
    origin's projection is computed relative to that vertex). ``min_norm`` asks for the point of
    least norm on the face instead (MGDA).
    """
    K = U.shape[1]
    n, m = faces.shape
    base = U[:, faces[:, 0]].T  # (n, r)
    A = np.transpose(U[:, faces[:, 1:]], (1, 0, 2)) - base[:, :, None]  # (n, r, m-1)
    Q, R = np.linalg.qr(A)
    pivots = np.abs(np.diagonal(R, axis1=1, axis2=2))
    columns = np.linalg.norm(A, axis=1)  # (n, m-1)
    # Dependent: a pivot lost to rounding against its column, or a column that is the
    # rounding-level difference of two identical vertices (its own pivot would look fine).
    vertex = np.linalg.norm(U, axis=0)
    far = columns > 1e3 * _INDEPENDENT * np.maximum(vertex[faces[:, 1:]], vertex[faces[:, :1]])
    independent = ((pivots > _INDEPENDENT * columns) & far).all(axis=1)
    Qb = np.einsum("nrk,nr->nk", Q, base)
    d0 = base - np.einsum("nrk,nk->nr", Q, Qb)
    nd0 = np.linalg.norm(d0, axis=1)
    if min_norm:
        kappa = np.zeros(n)
        Qg = np.zeros_like(Qb)
    else:
        Qg = Q.transpose(0, 2, 1) @ g0  # (n, m-1)
        rho2 = s * s - np.einsum("nk,nk->n", Qg, Qg)
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = np.where(rho2 > 0, nd0 / np.sqrt(np.where(rho2 > 0, rho2, 1.0)), np.nan)
        # An affine hull through the origin with s <= ||Q^T g0||: f is unbounded below on the hull,
        # but d = 0 itself may still be the optimum (opposed gradients), so keep it as a candidate.
        through_origin = nd0 <= 1e-12 * np.linalg.norm(base, axis=1).clip(min=1e-300)
        kappa = np.where(np.isnan(kappa) & through_origin, 0.0, kappa)
    ok = independent & np.isfinite(kappa)
    if not ok.any():
        return np.zeros((0, K))
    rhs = -(Qb[ok] + kappa[ok, None] * Qg[ok])  # Q^T (d - base), as Q^T d0 = 0
    coeff = np.linalg.solve(R[ok], rhs[:, :, None])[:, :, 0]
    bary = np.concatenate([1.0 - coeff.sum(axis=1, keepdims=True), coeff], axis=1)
    inside = (bary >= -_FEASIBLE).all(axis=1)
    bary = np.clip(bary[inside], 0.0, None)
    bary /= bary.sum(axis=1, keepdims=True)
    out = np.zeros((bary.shape[0], K))
    np.put_along_axis(out, faces[ok][inside], bary, axis=1)
    return out


def _enumerate(P: _Problem, min_norm: bool) -> list[np.ndarray]:
    """Every face's candidate; returns the optimal ones (ties averaged) first, best single second."""
    K = P.U.shape[1]
    r = P.U.shape[0]
    order = np.argsort(np.linalg.norm(P.U, axis=0), kind="stable")  # shortest vertex first
    Us = P.U[:, order]
    cands = [np.eye(K)]
    for m in range(2, min(K, r + 1) + 1):  # more than r + 1 points are affinely dependent
        faces = _subsets(K, m)
        cands.append(_face_candidates(Us, P.g0, P.s, faces, min_norm))
    allc = np.concatenate(cands, axis=0)
    pts = np.empty_like(allc)
    pts[:, order] = allc
    vals = _quadratic(P, pts) if min_norm else _objective(P, pts)
    at = int(np.argmin(vals))
    # Ties are judged against the size of the summands of f at the best point (what rounding
    # acts on), not against the problem's scale: with gradient norms spread over 1e16, f* can be
    # 1e-15 of the scale, and at d = 0 f is a sum of terms that cancel exactly.
    norms = np.linalg.norm(P.U, axis=0)
    if min_norm:
        size = float(pts[at] @ norms) ** 2
    else:
        size = float(pts[at] @ (np.abs(P.b) + P.s * norms))
    tied = pts[vals <= vals[at] + _TIE * size]
    # One representative per distinct optimal point: several faces (and rounding) can yield the
    # same point, and counting it twice would make the average depend on rounding.
    distinct: list[np.ndarray] = []
    for point in tied:
        if all(np.abs(point - other).max() > 1e-8 for other in distinct):
            distinct.append(point)
    return [np.mean(distinct, axis=0), pts[at]]


def _quadratic(P: _Problem, p: np.ndarray) -> np.ndarray:
    d = p @ P.U.T
    return np.einsum("...r,...r->...", d, d)


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex (sort-based, exact)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, v.size + 1)
    rho = np.flatnonzero(u - css / k > 0)[-1]
    return np.clip(v - css[rho] / (rho + 1), 0.0, None)


def _gradient(P: _Problem, p: np.ndarray, min_norm: bool) -> np.ndarray:
    if min_norm:
        return 2 * (P.H @ p)
    d = P.U @ p
    norm_d = float(np.linalg.norm(d))
    if norm_d > 0:
        return P.b + P.s * (P.U.T @ d) / norm_d
    # at U p = 0: the directional derivative towards each vertex
    return P.b + P.s * np.sqrt(np.clip(np.diag(P.H), 0, None))


def _projected_gradient(P: _Problem, min_norm: bool, iters: int = 500) -> np.ndarray:
    """Accelerated projected gradient with restarts: a support guess for the working sets, and
    the last-resort fallback (its answer is certified like any other)."""
    K = P.U.shape[1]
    value = _quadratic if min_norm else _objective
    p = np.full(K, 1.0 / K)
    y, p_prev, t = p.copy(), p.copy(), 1.0
    step = 1.0
    for _ in range(iters):
        grad = _gradient(P, y, min_norm)
        fy = value(P, y)
        while True:
            cand = _project_simplex(y - step * grad)
            diff = cand - y
            if value(P, cand) <= fy + grad @ diff + (diff @ diff) / (2 * step) + 1e-16 or step < 1e-12:
                break
            step *= 0.5
        if value(P, cand) > value(P, p_prev):  # restart the momentum
            t, y = 1.0, p_prev.copy()
            continue
        t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        y = cand + (t - 1) / t_next * (cand - p_prev)
        p_prev, p, t = cand, cand, t_next
        step = min(step * 1.5, 1e6)
    return p


def _certificate(P: _Problem, p: np.ndarray, min_norm: bool) -> float:
    if min_norm:
        Hp = P.H @ p
        return max(2 * float(p @ Hp - Hp.min()), 0.0)  # max H_kk = 1 after normalisation
    return _gap(P, p)


def _restrict(P: _Problem, idx: np.ndarray) -> _Problem:
    """The same dual with p forced to 0 outside ``idx`` (g0 and s stay those of the full problem)."""
    return _Problem(H=P.H[np.ix_(idx, idx)], U=P.U[:, idx], b=P.b[idx], g0=P.g0, s=P.s)


def _working_sets(P: _Problem, min_norm: bool, guess: np.ndarray) -> np.ndarray:
    """Above ENUMERATION_MAX_K: enumerate faces inside a working set of objectives, grown until
    the answer is certified on the full problem.

    ``guess`` picks the first working set (its support, then the smallest gradient entries);
    each round swaps in the index that violates optimality most, dropping an unused one.
    """
    K = P.U.shape[1]
    size = ENUMERATION_MAX_K
    grad = _gradient(P, guess, min_norm)
    # support first (largest p first), then the rest by increasing gradient
    rank = np.lexsort((grad, -np.where(guess > 1e-12 * guess.max(), guess, 0.0)))
    work = list(rank[:size])
    best, best_gap = guess, _certificate(P, guess, min_norm)
    for _ in range(2 * K):
        idx = np.array(sorted(work))
        sub = _restrict(P, idx)
        for q in _enumerate(sub, min_norm):
            p = np.zeros(K)
            p[idx] = q
            gap = _certificate(P, p, min_norm)
            if gap < best_gap:
                best, best_gap = p, gap
        if best_gap <= GAP_TOLERANCE:
            break
        grad = _gradient(P, best, min_norm)
        outside = np.setdiff1d(np.arange(K), idx)
        j = int(outside[np.argmin(grad[outside])])
        unused = [i for i in work if best[i] == 0.0]
        if not unused:
            break
        work.remove(max(unused, key=lambda i: grad[i]))
        work.append(j)
    return best


def _wolfe(Y: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Wolfe's min-norm-point algorithm: the p on the simplex minimising ||Y p|| (exact steps).

    Keeps a corral S of affinely independent points whose affine minimiser lies inside it; adds
    the point most opposed to the current one, and on leaving the corral moves to its boundary.
    """
    K = Y.shape[1]
    norms = np.einsum("rk,rk->k", Y, Y)
    scale = max(float(norms.max()), 1e-300)
    j = int(np.argmin(norms))
    S, lam = [j], np.ones(1)
    for _ in range(max_iter):
        x = Y[:, S] @ lam
        v = Y.T @ x
        j = int(np.argmin(v))
        if float(x @ x - v[j]) <= 1e-15 * scale or j in S:
            break
        S, lam = S + [j], np.append(lam, 0.0)
        for _ in range(K + 1):
            base = Y[:, S[0]]
            A = Y[:, S[1:]] - base[:, None]
            beta = np.linalg.lstsq(A, -base, rcond=None)[0]
            alpha = np.concatenate([[1.0 - beta.sum()], beta])
            if (alpha > 0).all():
                lam = alpha
                break
            out = alpha <= 0
            theta = float(np.min(lam[out] / (lam[out] - alpha[out])))
            lam = lam + theta * (alpha - lam)
            keep = lam > 1e-15
            keep[np.argmax(lam)] = True
            S, lam = [s for s, k in zip(S, keep) if k], lam[keep]
            lam /= lam.sum()
    p = np.zeros(K)
    p[S] = lam
    return p


def _parametric(P: _Problem) -> np.ndarray:
    """Above ENUMERATION_MAX_K: the dual through projections onto the gradients' hull.

    At the optimum d* = U p*, g0 + s d*/||d*|| lies in minus the normal cone at d*, which says
    d* = proj_hull(-g0 / mu) with mu = s / ||d*||. So d(mu) = proj(-g0 / mu) (Wolfe's exact
    algorithm) and a root of phi(mu) = mu ||d(mu)|| = s gives an optimum (every such root is a
    KKT point of the convex problem); bisection on log mu finds one. No root (phi stays below s)
    means the optimum is d = 0, the min-norm point.
    """
    def at(mu: float) -> tuple[np.ndarray, float]:
        p = _wolfe(P.U + (P.g0 / mu)[:, None])
        return p, mu * float(np.linalg.norm(P.U @ p))

    lo, hi = 1.0, 1.0
    p_lo, phi = at(lo)
    for _ in range(200):
        if phi < P.s:
            break
        lo /= 4.0
        p_lo, phi = at(lo)
    p_hi, phi = at(hi)
    for _ in range(200):
        if phi > P.s:
            break
        hi *= 4.0
        p_hi, phi = at(hi)
    else:
        return _wolfe(P.U)  # the optimum is d = 0
    for _ in range(200):
        if hi <= lo * (1 + 4e-16):
            break
        mid = math.sqrt(lo * hi)
        p_mid, phi = at(mid)
        if phi < P.s:
            lo, p_lo = mid, p_mid
        else:
            hi, p_hi = mid, p_mid
    return min((p_lo, p_hi), key=lambda q: _gap(P, q))


def _solve(P: _Problem, min_norm: bool = False) -> np.ndarray:
    """The certified optimum of the (normalised) problem; see the module docstring."""
    K = P.U.shape[1]
    if not min_norm and P.s == 0.0:
        # f = b^T p is linear: every vertex with minimal b is optimal; spread p evenly over them
        # so that equal objectives are treated equally.
        low = P.b <= P.b.min() + _TIE * _gap_scale(P)
        return low / low.sum()
    if K <= ENUMERATION_MAX_K:
        tried = _enumerate(P, min_norm)
    elif min_norm:
        tried = [_wolfe(P.U)]
    else:
        tried = [_parametric(P)]
    for p in tried:
        if _certificate(P, p, min_norm) <= GAP_TOLERANCE:
            return p
    if K > ENUMERATION_MAX_K:
        # Polish: exact enumeration on working sets of objectives around the best answer so far.
        for guess in (tried[0], _projected_gradient(P, min_norm)):
            p = _working_sets(P, min_norm, guess)
            if _certificate(P, p, min_norm) <= GAP_TOLERANCE:
                return p
    # Fallback: a long projected-gradient run, re-certified.
    p = _projected_gradient(P, min_norm, iters=20000)
    gap = _certificate(P, p, min_norm)
    if gap <= GAP_TOLERANCE:
        return p
    raise SolverError(
        f"could not certify the {'min-norm point' if min_norm else 'RACO dual'}: relative gap {gap:.3e} > "
        f"{GAP_TOLERANCE:g} for K = {K}; please report this Gram (normalised to max H_kk = 1): {P.H.tolist()!r}"
    )


# --------------------------------------------------------------------------------------------
# Public math


def _dual(H: np.ndarray, w: np.ndarray, c: float) -> tuple[np.ndarray, _Problem]:
    P = _problem(H, w, c)
    return _solve(P), P


def _coefficients(P: _Problem, w: np.ndarray, p_tilde: np.ndarray) -> np.ndarray:
    """a = w + s / ||G p~|| p~, and a = w where s = 0 or G p~ = 0."""
    norm = float(np.linalg.norm(P.U @ p_tilde))
    # G p~ that cancels to rounding (opposed gradients at the dual's optimum d = 0) is zero:
    # dividing by its rounding-level norm would blow a up along a meaningless direction.
    if P.s == 0.0 or norm <= _CANCELLED * float(p_tilde @ np.linalg.norm(P.U, axis=0)):
        return w.copy()
    # s and ||U p~|| are both in the normalised units: their ratio is scale free.
    return w + P.s / norm * p_tilde


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


def solve_dual(gram: torch.Tensor, weights: torch.Tensor, c: float) -> torch.Tensor:
    """The RACO/CAGrad dual: p in the simplex minimising b^T p + s sqrt(p^T H p), float64 (K,).

    Exact and certified (relative duality gap <= 1e-9) for any K >= 1 and any positive
    semi-definite Gram, degenerate ones included. Where the optimum is not unique (identical
    gradients, s = 0) optimal points that tie are averaged, so equal objectives get equal duals.

    >>> import torch
    >>> gram = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> [round(x, 4) for x in solve_dual(gram, torch.tensor([0.5, 0.5]), 0.4).tolist()]
    [1.0, 0.0]
    """
    H, w, c = _validate(gram, weights, c)
    return _tensor(_dual(H, w, c)[0])


def raco_coefficients(gram: torch.Tensor, weights: torch.Tensor, c: float = 0.4, clip: bool = True) -> torch.Tensor:
    """RACO's coefficients a (float64, (K,)): the update direction is sum_k a_k g_k.

    a = w + s / sqrt(p~^T H p~) * p~ with p~ = min(p, w) (``clip=True``, RACO) or p~ = p
    (``clip=False``, CAGrad with user weights); a = w when s = 0 or p~^T H p~ = 0, where
    "= 0" includes a G p~ that cancels to rounding (||G p~|| <= 1e-12 sum_k p~_k ||g_k||).

    >>> import torch
    >>> w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    >>> raco_coefficients(torch.eye(2, dtype=torch.float64), w, c=0.0).tolist()
    [0.3, 0.7]
    """
    return aggregate("raco" if clip else "cagrad", gram, weights, c).coefficients


# --------------------------------------------------------------------------------------------
# Aggregators


@dataclass(frozen=True)
class Aggregation:
    """An aggregator's answer for one Gram."""

    coefficients: torch.Tensor
    """float64 (K,): the update direction is sum_k coefficients[k] * g_k."""
    dual: torch.Tensor | None = None
    """The dual p (raco, cagrad); None for aggregators without one."""
    dual_clipped: torch.Tensor | None = None
    """p~ = min(p, w) for raco, p for cagrad; None without a dual."""

    @property
    def clip_active(self) -> bool:
        """True when the clip changed the dual somewhere (p~ < p)."""
        if self.dual is None or self.dual_clipped is None:
            return False
        return bool((self.dual_clipped < self.dual).any())


Aggregator = Callable[[torch.Tensor, torch.Tensor, float], Aggregation]
"""(gram (K, K) float64, weights (K,) float64, c) -> Aggregation, for validated inputs."""

AGGREGATORS: dict[str, Aggregator] = {}
"""The registry of aggregators by name; add one with :func:`register_aggregator`."""


def register_aggregator(name: str) -> Callable[[Aggregator], Aggregator]:
    """Decorator that registers a Gram-only aggregator under ``name``.

    >>> @register_aggregator("uniform_demo")
    ... def _uniform(gram, weights, c):
    ...     k = gram.shape[0]
    ...     return Aggregation(torch.full((k,), 1.0 / k, dtype=torch.float64))
    >>> aggregate("uniform_demo", torch.eye(2, dtype=torch.float64), torch.tensor([0.2, 0.8])).coefficients.tolist()
    [0.5, 0.5]
    >>> _ = AGGREGATORS.pop("uniform_demo")
    """

    def decorate(fn: Aggregator) -> Aggregator:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is already registered; pick another name")
        AGGREGATORS[name] = fn
        return fn

    return decorate


def get_aggregator(name: str) -> Aggregator:
    """The aggregator registered under ``name``; ValueError listing the known names otherwise.

    >>> get_aggregator("raco") is AGGREGATORS["raco"]
    True
    """
    try:
        return AGGREGATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown aggregator {name!r}; known aggregators: {sorted(AGGREGATORS)}") from None


def aggregate(name: str, gram: torch.Tensor, weights: torch.Tensor, c: float = 0.4) -> Aggregation:
    """Validate (ValueError on bad input), then run the aggregator ``name``.

    >>> import torch
    >>> w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    >>> aggregate("linear", torch.eye(2, dtype=torch.float64), w).coefficients.tolist()
    [0.3, 0.7]
    """
    fn = get_aggregator(name)
    H, w, c = _validate(gram, weights, c)
    return fn(_tensor(H), _tensor(w), c)


def _raco_like(gram: torch.Tensor, weights: torch.Tensor, c: float, clip: bool) -> Aggregation:
    H, w = gram.detach().cpu().to(torch.float64).numpy(), weights.detach().cpu().to(torch.float64).numpy()
    p, P = _dual(H, w, c)
    p_tilde = np.minimum(p, w) if clip else p
    return Aggregation(_tensor(_coefficients(P, w, p_tilde)), _tensor(p), _tensor(p_tilde))


@register_aggregator("raco")
def _raco(gram: torch.Tensor, weights: torch.Tensor, c: float) -> Aggregation:
    """RACO: CAGrad's dual clipped at the user weights, p~ = min(p, w)."""
    return _raco_like(gram, weights, c, clip=True)


@register_aggregator("cagrad")
def _cagrad(gram: torch.Tensor, weights: torch.Tensor, c: float) -> Aggregation:
    """CAGrad with user weights: the unclipped dual, p~ = p."""
    return _raco_like(gram, weights, c, clip=False)


@register_aggregator("linear")
def _linear(gram: torch.Tensor, weights: torch.Tensor, c: float) -> Aggregation:
    """The weighted-loss baseline (DPO-LW): a = w."""
    return Aggregation(weights.detach().cpu().to(torch.float64).clone())


@register_aggregator("mgda")
def _mgda(gram: torch.Tensor, weights: torch.Tensor, c: float) -> Aggregation:
    """MGDA: the min-norm point of the gradients' convex hull; coefficients on the simplex.

    Ignores the weights and c. Solved by the same certified face enumeration (Frank-Wolfe gap
    of p^T H p <= 1e-9 relative to max_k H_kk).
    """
    H = gram.detach().cpu().to(torch.float64).numpy()
    K = H.shape[0]
    top = float(np.diag(H).max())
    if top <= 0:
        return Aggregation(_tensor(np.full(K, 1.0 / K)))
    Hn = H / top
    U = _factor(Hn)
    P = _Problem(H=Hn, U=U, b=np.zeros(K), g0=np.zeros(U.shape[0]), s=0.0)
    return Aggregation(_tensor(_solve(P, min_norm=True)))
