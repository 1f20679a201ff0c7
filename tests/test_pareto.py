"""Pareto math and plots: weight grids, hypervolume (hand values + Monte Carlo), Spearman, fronts, PNG."""

import math
import random

import pytest

from raco_ds.evaluation.bootstrap import Estimate
from raco_ds.pareto import (
    hypervolume,
    non_dominated,
    parse_weights,
    plot_sweep,
    simplex_grid,
    spearman,
    validate_weights,
)

# ---------------------------------------------------------------------------
# Grids


@pytest.mark.parametrize("k,step,count", [(1, 0.25, 1), (2, 0.25, 5), (2, 0.1, 11), (3, 0.25, 15), (3, 0.5, 6), (4, 0.5, 10)])
def test_grid_points_lie_on_the_simplex(k, step, count):
    grid = simplex_grid(k, step)
    assert len(grid) == count == len(set(grid))
    for w in grid:
        assert len(w) == k
        assert min(w) >= 0
        assert math.isclose(sum(w), 1.0, abs_tol=1e-12)
        # every entry is a multiple of the step
        assert all(math.isclose(x / step, round(x / step), abs_tol=1e-9) for x in w)


def test_default_two_objective_grid_is_the_issue_grid():
    assert [w[0] for w in simplex_grid(2)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_three_objective_grid_with_a_third_step_sums_to_one():
    grid = simplex_grid(3, 1 / 3)
    assert len(grid) == 10
    assert all(math.isclose(sum(w), 1.0, abs_tol=1e-12) for w in grid)


@pytest.mark.parametrize("step,message", [(0.3, "does not divide 1"), (0.0, "must be in"), (1.5, "must be in")])
def test_rejects_bad_grid_steps(step, message):
    with pytest.raises(ValueError, match=message):
        simplex_grid(2, step)


def test_rejects_bad_weight_vectors():
    with pytest.raises(ValueError, match="sums to 0.9"):
        validate_weights([0.4, 0.5])
    with pytest.raises(ValueError, match=">= 0"):
        validate_weights([1.5, -0.5])
    with pytest.raises(ValueError, match="3 entries for 2 objectives"):
        validate_weights([0.2, 0.3, 0.5], 2)
    with pytest.raises(ValueError, match="weights entry 1"):
        parse_weights("0,1;a,b")


# ---------------------------------------------------------------------------
# Hypervolume


def test_hypervolume_hand_values_2d():
    # Staircase (1,3), (2,2), (3,1) above (0,0): 3*1 + 2*1 + 1*1 = 6.
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (0, 0)) == pytest.approx(6.0)
    # A dominated point changes nothing; a duplicate changes nothing.
    assert hypervolume([(1, 3), (2, 2), (3, 1), (1, 1), (2, 2)], (0, 0)) == pytest.approx(6.0)
    # A shifted reference: (1,3)->(0.5,2.5), (2,2)->(1.5,1.5), (3,1)->(2.5,0.5) relative: 2.5*0.5+1.5*1+0.5*1
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (0.5, 0.5)) == pytest.approx(0.5 * 2.5 + 1.0 * 1.5 + 1.0 * 0.5)
    # Points at or below the reference in any coordinate add nothing.
    assert hypervolume([(0.4, 0.9), (0.5, 0.5)], (0.5, 0.5)) == 0.0
    assert hypervolume([], (0, 0)) == 0.0


def test_hypervolume_hand_values_3d():
    # Two boxes [0,1]^3 and [0,2]x[0,0.5]x[0,0.5]: 1 + 0.5 - 0.25 overlap.
    assert hypervolume([(1, 1, 1), (2, 0.5, 0.5)], (0, 0, 0)) == pytest.approx(1.25)
    # The unit simplex corners each give an empty box above 0 (a zero coordinate): volume 0.
    assert hypervolume([(1, 0, 0), (0, 1, 0)], (0, 0, 0)) == 0.0


@pytest.mark.parametrize("dim", [2, 3])
def test_hypervolume_matches_monte_carlo(dim):
    rng = random.Random(dim)
    points = [tuple(rng.uniform(0.2, 1.0) for _ in range(dim)) for _ in range(7)]
    ref = (0.1,) * dim
    exact = hypervolume(points, ref)
    samples = 40_000
    hits = 0
    for _ in range(samples):
        z = [rng.uniform(0.1, 1.0) for _ in range(dim)]
        hits += any(all(zi <= pi for zi, pi in zip(z, p)) for p in points)
    estimate = hits / samples * 0.9**dim
    stderr = math.sqrt(estimate * (0.9**dim - estimate) / samples)
    assert abs(exact - estimate) < 5 * stderr + 1e-9


def test_hypervolume_2d_matches_a_fine_grid_count():
    points = [(0.55, 0.9), (0.7, 0.8), (0.9, 0.52), (0.6, 0.6)]
    n = 400  # cell centres of a 400 x 400 grid over [0.5, 1]^2
    cell = 0.5 / n
    hits = sum(
        any(0.5 + (i + 0.5) * cell <= p[0] and 0.5 + (j + 0.5) * cell <= p[1] for p in points)
        for i in range(n)
        for j in range(n)
    )
    assert hypervolume(points, (0.5, 0.5)) == pytest.approx(hits * cell * cell, abs=2 * 0.5 * cell * 2)


def test_hypervolume_rejects_bad_reference():
    with pytest.raises(ValueError, match="reference point"):
        hypervolume([(1, 1)], (math.nan, 0))
    with pytest.raises(ValueError, match="has 3"):
        hypervolume([(1, 1)], (0, 0, 0))


# ---------------------------------------------------------------------------
# Fronts and rank correlation


def test_non_dominated_extracts_the_front():
    pts = [(0.5, 0.5), (0.6, 0.4), (0.4, 0.4), (0.6, 0.5), (math.nan, 1.0), (0.2, 0.9)]
    assert non_dominated(pts) == [3, 5]  # (0.6,0.5) dominates the first two; NaN never on the front


def test_spearman_on_crafted_data():
    assert spearman([0, 0.25, 0.5, 0.75, 1], [0.1, 0.2, 0.3, 0.4, 0.9]) == pytest.approx(1.0)
    assert spearman([0, 0.25, 0.5, 0.75, 1], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties get average ranks: x ranks 1..4, y ranks 1, 2.5, 2.5, 4 -> rho = 0.9486833
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant input: undefined
    assert math.isnan(spearman([1], [2]))


def test_spearman_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(20):
        x = [rng.choice([0, 0.25, 0.5, 0.75, 1]) for _ in range(9)]
        y = [rng.choice([0.1, 0.2, 0.3, 0.5]) for _ in range(9)]
        expected = scipy_stats.spearmanr(x, y).statistic
        got = spearman(x, y)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


# ---------------------------------------------------------------------------
# Plot


def test_plot_writes_a_valid_png(tmp_path):
    def est(v):
        return Estimate(v, v - 0.05, v + 0.04, 2)

    stats = {
        "raco": {"weights": [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]],
                 "means": [[est(0.6), est(0.8)], [est(0.7), est(0.7)], [est(0.8), est(0.4)]]},
        "linear": {"weights": [[0.0, 1.0], [1.0, 0.0]], "means": [[est(0.55), est(0.75)], [est(0.78), est(0.5)]]},
    }
    path = plot_sweep(stats, tmp_path / "sub" / "front.png", objectives=["helpful", "harmless"],
                      metric_labels=["accuracy/helpful", "-gen/length_tokens"], title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
    assert not list(path.parent.glob("*.tmp*"))  # the temporary file was renamed away
