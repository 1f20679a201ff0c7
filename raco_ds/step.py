"""The backend-neutral RACO step: options, objective bookkeeping, Gram -> consensus -> write -> optimizer step.

One optimizer step, whatever the framework (DESIGN.md section 2)::

    with step.objective(k): ...backward passes of objective k...   # for every k: capture its shard
    stats = step.step()    # local Gram -> all-reduce + solve (consensus.py) -> write sum_k a_k S[k] -> optimizer

:class:`RacoStep` runs that sequence and owns everything that does not depend on
the framework: the validated :class:`StepOptions`, which objectives are captured,
the consensus solve, the non-finite policy (skip everywhere or raise) and the
step's :class:`~raco_ds.step_stats.RacoStepStats`. A backend
(``raco_ds.deepspeed.RacoHook``, ``raco_ds.megatron.RacoMegatron``) subclasses it
and implements only where its shards live: begin / end / abort an objective's
capture, the local Gram inputs, the write-back, the optimizer step and the
discard of a step.

>>> StepOptions.validated([0.25, 0.75], "raco", 0.4).num_objectives
2
>>> StepOptions.validated([0.5, 0.5], "raco", 1.0)
Traceback (most recent call last):
...
ValueError: c (the conflict radius) must be in [0, 1), got 1.0; the paper's default is 0.4 (0 = the weighted sum)
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from raco_ds.collectives import collective_device, rank
from raco_ds.consensus import StepSolution, solve_across_ranks
from raco_ds.solver import AGGREGATORS, validate_weights
from raco_ds.step_stats import NonFiniteGradientError, RacoStepStats

__all__ = ["ON_NONFINITE", "RacoStep", "StepOptions"]

logger = logging.getLogger(__name__)

ON_NONFINITE = ("skip", "raise")
"""What a step does when some objective's gradient is NaN/inf on any rank: skip it everywhere, or raise."""


@dataclass(frozen=True)
class StepOptions:
    """The validated options of a RACO step, shared by every backend."""

    weights: torch.Tensor
    """User weights w (float64, on the simplex), one per objective."""
    aggregator: str
    """A name registered in ``raco_ds.solver.AGGREGATORS``."""
    c: float
    """Conflict radius in [0, 1)."""
    on_nonfinite: str
    """One of :data:`ON_NONFINITE`."""

    @property
    def num_objectives(self) -> int:
        """K."""
        return int(self.weights.numel())

    @classmethod
    def validated(cls, weights: Sequence[float] | torch.Tensor, aggregator: str = "raco", c: float = 0.4,
                  on_nonfinite: str = "skip") -> StepOptions:
        """Check every option; a ``ValueError`` says what was found and how to fix it."""
        checked = validate_weights(weights)
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; registered: {sorted(AGGREGATORS)} "
                             "(add one with raco_ds.solver.register_aggregator)")
        if not 0.0 <= float(c) < 1.0:
            raise ValueError(f"c (the conflict radius) must be in [0, 1), got {c}; "
                             "the paper's default is 0.4 (0 = the weighted sum)")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        return cls(checked, aggregator, float(c), on_nonfinite)


class RacoStep(abc.ABC):
    """One RACO optimizer step over a framework's sharded gradients; a backend implements the ``_``-methods.

    Args:
        options: the validated weights, aggregator, c and non-finite policy.
        verify: check every step that all ranks computed identical coefficients.

    The backend's part, called in this order per step:

    - :meth:`_begin_objective` / :meth:`_end_objective` around each ``objective(k)``
      block (:meth:`_abort_objective` instead of the end when the block raises);
    - :meth:`_local_gram`, then :meth:`_write` and :meth:`_optimizer_step`, or, for
      a skipped step, :meth:`_skip` (the non-finite "skip" policy) or :meth:`_discard`.
    """

    stats_type: type[RacoStepStats] = RacoStepStats
    """What :meth:`step` returns (a backend may report more, e.g. its optimizer's verdict)."""

    def __init__(self, options: StepOptions, verify: bool = True) -> None:
        self.weights, self.aggregator, self.c = options.weights, options.aggregator, options.c
        self.on_nonfinite = options.on_nonfinite
        self.verify = verify
        self._captured = [False] * options.num_objectives
        self._active: int | None = None
        self._seconds_capture = 0.0

    @property
    def num_objectives(self) -> int:
        """K, the number of objectives (length of ``weights``)."""
        return int(self.weights.numel())

    # -- capture ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def objective(self, k: int) -> Iterator[None]:
        """Scope the backward passes of objective ``k``; its shard is captured when the block ends."""
        if not 0 <= k < self.num_objectives:
            raise IndexError(f"objective {k} out of range for {self.num_objectives} objectives")
        if self._active is not None:
            raise RuntimeError(f"objective({k}) entered inside objective({self._active}): objectives do not nest")
        if self._captured[k]:
            raise RuntimeError(f"objective {k} was already captured this step; call step() before capturing it again")
        self._timed(lambda: self._begin_objective(k))
        self._active = k
        try:
            yield
        except BaseException:
            self._active = None
            self._timed(lambda: self._abort_objective(k))
            raise
        self._active = None
        self._timed(lambda: self._end_objective(k))
        self._captured[k] = True

    def _mark_all_captured(self) -> None:
        """Every objective's shard is in place (filled by a capture other than ``objective(k)`` blocks)."""
        self._captured = [True] * self.num_objectives

    def _capture_started(self) -> bool:
        """True once some objective of this step was captured or is being captured."""
        return self._active is not None or any(self._captured)

    def _timed(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` and count its time as capture time (reported as ``seconds_capture``)."""
        started = time.perf_counter()
        try:
            fn()
        finally:
            self._seconds_capture += time.perf_counter() - started

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> RacoStepStats:
        """Local Gram -> all-reduce -> solve -> write sum_k a_k S[k] -> the framework's optimizer step.

        Every rank reaches the same verdict on a non-finite gradient (it shows in the
        all-reduced Gram): the step is skipped everywhere, or, with
        ``on_nonfinite="raise"``, discarded and :class:`NonFiniteGradientError` raised.
        """
        missing = [k for k, done in enumerate(self._captured) if not done]
        if missing:
            raise RuntimeError(f"step() before objective(s) {missing} were captured this step: "
                               f"{self._capture_hint()}")
        started = time.perf_counter()
        gram, group = self._local_gram()
        gram_done = time.perf_counter()
        solution = solve_across_ranks(gram, self.weights, self.aggregator, self.c, group=group,
                                      device=collective_device(group), verify=self.verify)  # fmt: skip
        stats = self.stats_type.from_solution(solution, seconds_capture=self._seconds_capture,
                                              seconds_gram=gram_done - started)  # fmt: skip
        self._captured = [False] * self.num_objectives
        self._seconds_capture = 0.0
        if solution.skipped:
            return self._skipped(solution, stats)
        write_started = time.perf_counter()
        self._write(solution.coefficients)
        stats.seconds_write = time.perf_counter() - write_started
        self._optimizer_step(stats)
        return stats

    def _skipped(self, solution: StepSolution, stats: RacoStepStats) -> RacoStepStats:
        if rank() == 0:
            logger.warning("RACO: non-finite gradient in objective(s) %s; step skipped",
                           solution.nonfinite_objectives)  # fmt: skip
        if self.on_nonfinite == "raise":
            self._discard()
            raise NonFiniteGradientError(stats)
        self._skip(stats)
        return stats

    def discard_step(self) -> None:
        """Drop everything captured so far this step and clear the framework's gradients (no update).

        For a caller that abandons a step half-way (an exception inside a pass, a
        data error); the next ``objective(0)`` then starts a clean step.
        """
        self._active = None
        self._captured = [False] * self.num_objectives
        self._seconds_capture = 0.0
        self._discard()

    # -- what a backend implements ------------------------------------------------------------------
    @abc.abstractmethod
    def _begin_objective(self, k: int) -> None:
        """Make the framework's gradient empty before objective ``k``'s first backward."""

    @abc.abstractmethod
    def _end_objective(self, k: int) -> None:
        """Capture objective ``k``'s reduced shard and leave the framework clean; raise if ``k`` is incomplete."""

    @abc.abstractmethod
    def _abort_objective(self, k: int) -> None:
        """Objective ``k``'s block raised: drop its partial gradient."""

    def _capture_hint(self) -> str:
        """How to capture the missing objectives (the end of :meth:`step`'s error message)."""
        return "run `with objective(k):` for each"

    @abc.abstractmethod
    def _local_gram(self) -> tuple[torch.Tensor, object]:
        """This rank's (K, K) float64 Gram of its counted shard columns, and the group to all-reduce it over."""

    @abc.abstractmethod
    def _write(self, coefficients: torch.Tensor) -> None:
        """Write sum_k coefficients[k] * S[k] where the framework's optimizer step reads the rank's shard."""

    @abc.abstractmethod
    def _optimizer_step(self, stats: RacoStepStats) -> None:
        """Run the framework's optimizer step on the written gradient (adding what it reports to ``stats``)."""

    @abc.abstractmethod
    def _discard(self) -> None:
        """Drop the step's captured shards and the framework's gradients (no update)."""

    def _skip(self, stats: RacoStepStats) -> None:
        """A non-finite step under ``on_nonfinite="skip"``: by default discard it (no optimizer step)."""
        self._discard()
