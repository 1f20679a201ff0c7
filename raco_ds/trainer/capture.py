"""Where each objective's gradient comes from in one optimizer step: K passes, or one pass for all.

Both strategies end in ``hook.step()`` (Gram -> solve -> write -> engine.step())
and differ only in how the hook's K shards get filled (the hook's capture seam):

- :class:`KPassCapture`: per-objective data runs each objective's micro-batches
  inside ``with hook.objective(k)``; shared-pair data calls
  ``hook.backward_shared`` (one forward for all K losses on ZeRO 0-2; under
  ZeRO-3 the hook re-runs the forward per objective).
- :class:`OnePassCapture`: one forward and one backward per micro-batch for all
  K objectives (raco_ds.onepass, DESIGN.md section 6). The seed is the sum of
  the rows' response log-probs and the (K, 2B) row coefficients are
  dL_k/dlogp_r, which covers both data shapes with one recipe; per-objective
  data puts every objective's micro-batch into the same forward.

:func:`choose_capture` picks one once, from ``raco.capture`` and what the engine
supports, and says why.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from raco_ds.trainer.config import ConfigError

__all__ = ["KPassCapture", "OnePassCapture", "choose_capture"]

logger = logging.getLogger("raco_ds.trainer")


class KPassCapture:
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


class OnePassCapture:
    """All K gradients from one forward + one backward per micro-batch (raco_ds.onepass)."""

    name = "onepass"

    def __init__(self, run) -> None:
        from raco_ds.onepass import DeepSpeedOnePass

        # Bound to the hook's rows (the last one DeepSpeed's own buffer where possible), the K shards
        # are reduced straight into them during the backward.
        self.rows = run.hook.capture_rows()
        self.adapter = DeepSpeedOnePass(run.engine, len(run.names), run.hook.shard_layout, shard_buffer=self.rows)

    def step(self, run, record) -> Any:
        """Run one optimizer step's passes and ``hook.step()``; fills ``record``; returns the hook's stats."""
        from raco_ds.onepass import coefficients_from_losses

        k_total, gas, hook = len(run.names), run.cfg.optimisation.gradient_accumulation_steps, run.hook
        step_started = time.perf_counter()
        reduced_before = self.adapter.scatter.seconds
        self.adapter.zero()
        for _ in range(gas):
            # Per-objective data: every objective's next micro-batch in one forward (labels of a pair
            # are 0 for the objectives it does not belong to, so each loss averages its own pairs).
            items = [item for stream in run.streams for item in stream.next_items()]
            batch = run.collator(items).to(run.device)
            record.tokens += int(batch.attention_mask.sum())
            with self.adapter.record(rows=batch.input_ids.shape[0]):
                logits = self.adapter.forward(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
                out, logps = run.losses_from_logits(batch, logits)
                coefficients = coefficients_from_losses(logps, out.losses)  # (K, 2B) = dL_k / dlogp_r
                self.adapter.backward(logps.sum(), coefficients)
            record.add(out, range(k_total))
        self.adapter.scatter_into(self.rows)  # a finaliser: the reduction ran inside backward()
        hook.mark_captured()
        record.scatter_seconds = self.adapter.scatter.seconds - reduced_before
        record.passes_seconds = time.perf_counter() - step_started - record.scatter_seconds
        return hook.step(before_engine_step=self.adapter.finish_engine_backward)


def choose_capture(run) -> KPassCapture | OnePassCapture:
    """The capture ``raco.capture`` asks for: "auto" = one pass where the engine supports it, else K passes."""
    wanted = run.cfg.raco.capture
    if wanted == "k_pass":
        return KPassCapture()
    try:
        from raco_ds.onepass import onepass_unsupported_reason

        reason = onepass_unsupported_reason(run.engine)
    except ImportError:  # an older raco_ds without the DeepSpeed one-pass adapter
        reason = "raco_ds.onepass has no DeepSpeed adapter in this installation"
    if reason is None:
        return OnePassCapture(run)
    if wanted == "onepass":
        raise ConfigError(f"raco.capture='onepass' cannot run here: {reason}; use --capture auto or k_pass")
    logger.warning("capture: K passes per step (one-pass capture unavailable: %s)", reason)
    return KPassCapture()
