"""Where each objective's gradient comes from in one optimizer step: K passes, or one pass for all.

Both strategies end in ``hook.step()`` (Gram -> solve -> write -> engine.step())
and differ only in how the hook's K shards get filled (the hook's capture seam):

- :class:`KPassStep`: per-objective data runs each objective's micro-batches
  inside ``with hook.objective(k)``; shared-pair data calls
  ``hook.backward_shared`` (one forward for all K losses on ZeRO 0-2; under
  ZeRO-3 the hook re-runs the forward per objective).
- :class:`OnePassStep`: one forward and one backward per micro-batch for all
  K objectives (raco_ds.onepass, DESIGN.md section 6). The seed is the sum of
  the rows' response log-probs and the (K, 2B) row coefficients are
  dL_k/dlogp_r, which covers both data shapes with one recipe; per-objective
  data puts every objective's micro-batch into the same forward. Its first
  step (and every ``raco.verify_every`` steps) first checks the capture against
  autograd on the step's first micro-batch; a mismatch falls back to K passes.

:func:`choose_capture` picks one once, from ``raco.capture`` and what the engine
and the model support, and says why.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from raco_ds.trainer.config import ConfigError

__all__ = ["KPassStep", "OnePassStep", "choose_capture"]

logger = logging.getLogger("raco_ds.trainer")


class KPassStep:
    """One backward per objective (DeepSpeed reduces each), captured by the hook."""

    name = "k_pass"

    def step(self, run, record) -> Any:
        """Run one optimizer step's passes and ``hook.step()``; fills ``record``; returns the hook's stats."""
        k_total, gas, hook = len(run.names), run.cfg.optimisation.gradient_accumulation_steps, run.hook
        step_started = time.perf_counter()
        if not run.dataset.shared:
            # Per-objective pairs: objective k's own micro-batches, each objective on its own boundary.
            for k in range(k_total):
                started = time.perf_counter()
                with hook.objective(k):
                    for _ in range(gas):
                        batch = run.streams[k].next().to(run.device)
                        record.tokens += int(batch.attention_mask.sum())
                        out = run.losses(batch)
                        hook.backward(out.losses[k])
                        record.add(out, [k])
                record.pass_seconds[k] = time.perf_counter() - started
        else:
            # Shared pairs: all K losses of a micro-batch from one forward. Under ZeRO-3 the hook calls
            # forward() once per objective (no retain_graph there), so the call times split the passes.
            for _ in range(gas):
                batch = run.streams[0].next().to(run.device)
                record.tokens += int(batch.attention_mask.sum())
                calls: list[float] = []
                last: list[Any] = []

                def forward(batch=batch, calls=calls, last=last):
                    """The micro-batch's K losses (called by the hook once, or once per objective)."""
                    calls.append(time.perf_counter())
                    last[:] = [run.losses(batch)]
                    return last[0].losses

                hook.backward_shared(forward)
                calls.append(time.perf_counter())
                record.add(last[0], range(k_total))
                if len(calls) == k_total + 1:
                    for k in range(k_total):
                        previous = 0.0 if math.isnan(record.pass_seconds[k]) else record.pass_seconds[k]
                        record.pass_seconds[k] = previous + calls[k + 1] - calls[k]
        record.passes_seconds = time.perf_counter() - step_started
        return hook.step()


class OnePassStep:
    """All K gradients from one forward + one backward per micro-batch (raco_ds.onepass).

    Built only where the engine supports it and every trainable module has a
    covering rule (construction raises UnsupportedModuleError otherwise). The
    capture checks itself against autograd when its first step's forward starts
    (and every ``raco.verify_every`` steps); on a mismatch under
    ``raco.capture=auto`` this logs why, removes the capture's hooks, and the run
    continues with :class:`KPassStep` from this very step, on the same data;
    ``raco.capture=onepass`` raises instead.
    """

    name = "onepass"

    def __init__(self, run) -> None:
        raco = run.cfg.raco
        self.adapter = run.hook.attach_onepass(verify=raco.verify_onepass, verify_every=raco.verify_every)
        self._logged_check = None

    def step(self, run, record) -> Any:
        """Run one optimizer step's passes and ``hook.step()``; fills ``record``; returns the hook's stats.

        Falls back to K passes (``run.capture`` becomes a :class:`KPassStep`) when the self-check fails.
        """
        from raco_ds.onepass import OnePassMismatchError

        positions = [stream.state_dict() for stream in run.streams]  # a fallback replays the step's data
        try:
            return self._step(run, record)
        except OnePassMismatchError as err:
            if run.cfg.raco.capture == "onepass":
                raise OnePassMismatchError(f"raco.capture='onepass': {err}; use --capture auto or k_pass") from None
            for stream, position in zip(run.streams, positions):
                stream.load_state_dict(position)
            if run.rank == 0:  # every rank reached the same verdict (the check is agreed across ranks)
                logger.warning("capture: K passes per step from here on (%s)", err)
            run.hook.detach_onepass()
            run.capture = KPassStep()
            return run.capture.step(run, record)  # the check runs before anything is recorded

    def _step(self, run, record) -> Any:
        from raco_ds.onepass import coefficients_from_losses

        k_total, gas, hook = len(run.names), run.cfg.optimisation.gradient_accumulation_steps, run.hook
        step_started = time.perf_counter()
        reduced_before = self.adapter.scatter.seconds
        with hook.onepass() as op:  # the K shards are reduced into the hook's rows during each backward
            for _ in range(gas):
                # Per-objective data: every objective's next micro-batch in one forward (labels of a pair
                # are 0 for the objectives it does not belong to, so each loss averages its own pairs).
                items = [item for stream in run.streams for item in stream.next_items()]
                batch = run.collator(items).to(run.device)
                with op.record(rows=batch.input_ids.shape[0]):
                    logits = op.forward(  # checks the capture first when a check is due
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                    ).logits
                    out, logps = run.losses_from_logits(batch, logits)
                    coefficients = coefficients_from_losses(logps, out.losses)  # (K, 2B) = dL_k / dlogp_r
                    op.backward(logps.sum(), coefficients)
                record.tokens += int(batch.attention_mask.sum())
                record.add(out, range(k_total))
        record.scatter_seconds = self.adapter.scatter.seconds - reduced_before
        record.passes_seconds = time.perf_counter() - step_started - record.scatter_seconds
        check = self.adapter.capture.last_check
        if check is not None and check is not self._logged_check:
            self._logged_check = check
            logger.info("capture: one-pass self-check on the step's first micro-batch: %s (%.1fs)", check.describe(),
                        check.seconds)  # fmt: skip
        return hook.step()


def choose_capture(run) -> KPassStep | OnePassStep:
    """The capture ``raco.capture`` asks for: "auto" = one pass where the engine and the model support it."""
    from raco_ds.data.packing import ONEPASS_REFUSAL
    from raco_ds.onepass import UnsupportedModuleError

    wanted = run.cfg.raco.capture
    if wanted == "k_pass":
        return KPassStep()
    reason = ONEPASS_REFUSAL if run.cfg.data.padding_free else run.hook.onepass_unsupported_reason()
    if reason is None:
        try:
            return OnePassStep(run)
        except UnsupportedModuleError as err:
            reason = str(err)
    if wanted == "onepass":
        raise ConfigError(f"raco.capture='onepass' cannot run here: {reason}; use --capture auto or k_pass")
    if run.rank == 0:
        logger.warning("capture: K passes per step (one-pass capture unavailable: %s)", reason)
    return KPassStep()
