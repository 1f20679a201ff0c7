"""RacoStep, the backend-neutral step, on an in-memory backend: the sequence, the non-finite policy, misuse.

The backend holds K gradient vectors in one process (no process group), so the
step must reproduce the solver on their Gram and apply sum_k a_k g_k exactly.
"""

from __future__ import annotations

import pytest
import torch

from raco_ds.gram import local_gram
from raco_ds.solver import aggregate
from raco_ds.step import RacoStep, StepOptions
from raco_ds.step_stats import NonFiniteGradientError, RacoStepStats

WEIGHTS = [0.2, 0.3, 0.5]


class InMemoryStep(RacoStep):
    """A backend whose "framework" is a parameter vector and K known gradients."""

    def __init__(self, gradients: torch.Tensor, **options) -> None:
        super().__init__(StepOptions.validated(WEIGHTS, **options))
        self.gradients = gradients
        self.rows = torch.zeros_like(gradients)
        self.param = torch.zeros(gradients.shape[1], dtype=gradients.dtype)
        self.calls: list[str] = []

    def _begin_objective(self, k: int) -> None:
        self.calls.append(f"begin {k}")

    def _end_objective(self, k: int) -> None:
        self.rows[k] = self.gradients[k]
        self.calls.append(f"end {k}")

    def _abort_objective(self, k: int) -> None:
        self.calls.append(f"abort {k}")

    def _local_gram(self) -> tuple[torch.Tensor, object]:
        return local_gram(self.rows), None

    def _write(self, coefficients: torch.Tensor) -> None:
        self.update = coefficients.to(self.rows.dtype) @ self.rows

    def _optimizer_step(self, stats: RacoStepStats) -> None:
        self.param -= self.update
        self.calls.append("optimizer step")

    def _discard(self) -> None:
        self.rows.zero_()
        self.calls.append("discard")


def capture_all(step: InMemoryStep) -> None:
    for k in range(step.num_objectives):
        with step.objective(k):
            pass


def test_step_applies_the_solvers_combination() -> None:
    gradients = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    step = InMemoryStep(gradients, aggregator="raco", c=0.4)
    capture_all(step)
    stats = step.step()
    expected = aggregate("raco", gradients @ gradients.T, torch.tensor(WEIGHTS, dtype=torch.float64), 0.4)
    torch.testing.assert_close(stats.coefficients, expected.coefficients, rtol=1e-12, atol=0)
    torch.testing.assert_close(step.param, -(expected.coefficients @ gradients), rtol=1e-12, atol=1e-15)
    assert step.calls == ["begin 0", "end 0", "begin 1", "end 1", "begin 2", "end 2", "optimizer step"]
    assert not stats.skipped and stats.seconds_capture >= 0.0


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_discards_the_step(policy: str) -> None:
    gradients = torch.ones(3, 4, dtype=torch.float64)
    gradients[1, 2] = float("nan")
    step = InMemoryStep(gradients, on_nonfinite=policy)
    capture_all(step)
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"objective\(s\) \[1\]") as caught:
            step.step()
        stats = caught.value.stats
    else:
        stats = step.step()
    assert stats.skipped and stats.nonfinite_objectives == [1] and stats.coefficients is None
    assert step.calls[-1] == "discard" and "optimizer step" not in step.calls
    assert bool((step.param == 0).all())
    capture_all(step)  # the next step starts clean
    assert step.calls[-2:] == ["begin 2", "end 2"]


def test_step_before_every_objective_is_captured_raises() -> None:
    step = InMemoryStep(torch.ones(3, 4))
    with step.objective(0):
        pass
    with pytest.raises(RuntimeError, match=r"before objective\(s\) \[1, 2\] were captured"):
        step.step()


def test_an_objective_that_raises_is_aborted_and_not_captured() -> None:
    step = InMemoryStep(torch.ones(3, 4))
    with pytest.raises(ValueError, match="data error"), step.objective(1):
        raise ValueError("data error")
    assert step.calls == ["begin 1", "abort 1"]
    with step.objective(1):  # not captured: it may run again
        pass


def test_misuse_of_objective_raises_the_error_meant() -> None:
    step = InMemoryStep(torch.ones(3, 4))
    with pytest.raises(IndexError, match="out of range"), step.objective(3):
        pass
    with pytest.raises(RuntimeError, match="do not nest"), step.objective(0), step.objective(1):
        pass
    with step.objective(2):
        pass
    with pytest.raises(RuntimeError, match="already captured"), step.objective(2):
        pass


def test_discard_step_forgets_the_captures() -> None:
    step = InMemoryStep(torch.ones(3, 4))
    with step.objective(0):
        pass
    step.discard_step()
    assert step.calls[-1] == "discard"
    with pytest.raises(RuntimeError, match=r"before objective\(s\) \[0, 1, 2\]"):
        step.step()


@pytest.mark.parametrize(
    "options, fragment",
    [({"aggregator": "nope"}, "unknown aggregator"), ({"c": 1.0}, "conflict radius"),
     ({"on_nonfinite": "ignore"}, "on_nonfinite")],
)
def test_rejects_bad_options(options: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        StepOptions.validated(WEIGHTS, **options)
