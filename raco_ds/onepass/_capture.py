"""One forward, one backward: all K per-objective parameter gradients.

:class:`OnePassCapture` hooks every module that owns trainable parameters.
During a capture pass the parameters are switched to ``requires_grad=False``
so autograd computes activation gradients only (no dense parameter gradient
that would be thrown away); each hooked module's output goes through a small
autograd Function (``_Tap``) that saves the module input with
``save_for_backward`` -- so activation checkpointing recomputes it instead of
a hook pinning it -- and, in the backward, hands (input, output gradient) to
the module's rule, which adds objective k's share into a (K, numel) buffer
per parameter. Tied parameters share one buffer and sum their uses.

Streaming (:meth:`OnePassCapture.stream_to`): the forward counts how many
hooked calls use each parameter (a tied weight: two); in the backward a
parameter whose count is reached is complete, and its (K, numel) buffer goes to
the sink at once (under DeepSpeed: reduce-scattered into the rank's shard and
freed), so no rank holds more than the parameters still in flight. Parameters
not completed by the end of the backward (unused this pass) follow in
registration order, so every rank hands the sink the same sequence.

Never silently wrong: construction refuses any trainable parameter that no
rule covers (:func:`~raco_ds.onepass._rules.rule_for`), and
:meth:`OnePassCapture.self_check` compares one capture pass with autograd's
gradient of the same randomly row-weighted scores, which exposes what no static
check sees (a weight used outside its module's hooked call, rows recognised by
shape). Non-finite row coefficients (a NaN loss) never raise: that objective's
gradient becomes NaN, so the step is skipped like a NaN gradient would be.

This module forms gradients only; Gram, solver and write-back live elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ._coefficients import RowCoefficients
from ._params import PLAIN, ParameterView
from ._rules import DeviceCoefficients, RuleSpec, UnsupportedModuleError, rule_for

__all__ = ["FusedKernelError", "GradientSink", "OnePassCapture", "OnePassMismatchError", "SelfCheck",
           "UnsupportedModuleError"]

logger = logging.getLogger(__name__)


class FusedKernelError(RuntimeError):
    """The model's output layer was bypassed (e.g. fused linear cross-entropy), hiding its output gradient."""


class OnePassMismatchError(RuntimeError):
    """The self-check found one-pass gradients that differ from autograd's: one-pass capture is wrong for this model."""


_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_CHECK_TOLERANCE_LOW_PRECISION = 1e-1


@dataclass
class SelfCheck:
    """One-pass gradients of a random row weighting against autograd's (:meth:`OnePassCapture.self_check`)."""

    names: list[str]
    """Trainable parameter names (tied ones once), in the capture's order."""
    errors: torch.Tensor
    """(P,) float64: ||capture - autograd|| / max(||autograd||, ||capture||, floor) per parameter
    (floor: 1e-3 of the total gradient norm, scaled by the parameter's share of the elements)."""
    tolerance: float
    """Largest error accepted (1e-3 in fp32, 0.1 for bf16/fp16 parameters: autograd itself rounds there)."""
    seconds: float = 0.0
    """Wall time of the check (two extra forward and backward passes)."""
    inconclusive: bool = False
    """True when autograd's own gradient was not finite (nothing to compare with)."""
    error: str | None = None
    """The error that stopped the capture's pass on the check's batch, if one did (every parameter fails)."""

    @property
    def mismatches(self) -> list[tuple[str, float]]:
        """(name, error) of every parameter over the tolerance, worst first."""
        bad = [(n, float(e)) for n, e in zip(self.names, self.errors) if not float(e) <= self.tolerance]
        return sorted(bad, key=lambda item: -item[1] if math.isfinite(item[1]) else -math.inf)

    @property
    def passed(self) -> bool:
        """True when every parameter's one-pass gradient matches autograd's."""
        return not self.inconclusive and not self.mismatches

    def describe(self, limit: int = 6) -> str:
        """One line: the mismatching parameters with their relative errors, or the largest error."""
        if self.inconclusive:
            return "self-check inconclusive: autograd's gradient of the check was not finite"
        if self.error is not None:
            return f"the capture's pass failed on the check's batch: {self.error}; use K-pass capture for this model"
        bad = self.mismatches
        if not bad:
            worst = float(self.errors.max()) if self.errors.numel() else 0.0
            return f"one-pass gradients match autograd (largest relative error {worst:.1e})"
        shown = ", ".join(f"{n} ({e:.2g})" for n, e in bad[:limit])
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        return (
            f"one-pass gradients differ from autograd's for {len(bad)} of {len(self.names)} parameters "
            f"(relative error, tolerance {self.tolerance:g}): {shown}{more}. A weight is used outside its module's "
            "call (F.linear on another module's weight, a direct module.forward(), weight slices), or a module's "
            "input is not rows-first; use K-pass capture for this model"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`OnePassMismatchError` with :meth:`describe` unless the check passed or was inconclusive."""
        if not self.passed and not self.inconclusive:
            raise OnePassMismatchError("one-pass capture self-check failed: " + self.describe())


class GradientSink(Protocol):
    """Receives each parameter's K gradients of one backward as soon as they are complete."""

    def on_final(self, param: nn.Parameter, index: int, grad: torch.Tensor | None) -> None:
        """``param`` (registration ``index``) is complete for this backward: ``grad`` (K, numel), or None = zeros.

        The sink owns ``grad`` from here on (the capture keeps no reference).
        """

    def end_backward(self) -> None:
        """Every parameter was handed over for this backward (flush what is still buffered)."""


class _Tap(torch.autograd.Function):
    """Identity on a module's output; its backward feeds (saved input, output gradient) to a site."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, site: _Site, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.site = site
        ctx.save_for_backward(x)  # recomputed under checkpointing, freed with the graph otherwise
        # A view of a custom Function's input may not be modified in place (CTRL and XLM scale their
        # embeddings with *=), so the output is a copy; the logits stay a view: their copy would
        # double the largest activation, and nothing modifies them in place.
        return out.view_as(out) if site.module is site.owner.output_module else out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        owner = ctx.site.owner
        if ctx.site.module is owner.output_module:
            owner._find_nonfinite_rows(grad)
        if owner._dropped_rows is not None:  # NaN rows contribute to no objective, here and upstream
            x, grad = _without_rows(x, owner._dropped_rows), _without_rows(grad, owner._dropped_rows)
        ctx.site.capture(x, grad)
        return None, None, None, grad


@dataclass(eq=False)
class _Site:
    """One hooked module: its rule and where its parameters' buffers are."""

    owner: OnePassCapture
    name: str
    module: nn.Module
    rule: RuleSpec
    params: dict[str, nn.Parameter]
    fired: bool = False
    handles: list = field(default_factory=list)

    @property
    def wanted(self) -> frozenset[str]:
        """Names of the module's own trainable parameters (frozen ones get no gradient)."""
        return frozenset(self.params)

    def capture(self, x: torch.Tensor, g: torch.Tensor) -> None:
        dc = self.owner._device_coefficients(g.device)
        with torch.no_grad():
            grads = self.rule.fn(self.module, self.name, x, g, dc, self.wanted)
            # Every own parameter counts this call as one contribution, even one the rule left out
            # (a zero contribution), so that streaming's per-parameter count is reached.
            for pname, p in self.params.items():
                self.owner._contribute(p, grads.pop(pname, None))


class OnePassCapture:
    """Per-objective gradients of a model from one forward and one backward.

    Args:
        model: the model (plain ``nn.Module``; under DeepSpeed the engine's module).
        num_objectives: K.
        accumulate_dtype: dtype of the (K, numel) buffers (fp32 default).
        output_module: the module whose output carries the logits (default:
            ``model.get_output_embeddings()`` when present); a pass in which it
            never runs raises :class:`FusedKernelError`.

        verify: check the capture against autograd on the first pass's batch
            (:meth:`self_check`, run automatically when the model's forward starts
            inside :meth:`record`; two extra forward and backward passes, once).
            A mismatch raises :class:`OnePassMismatchError` there, before any
            gradient is formed, and every later pass raises it again.
        verify_every: repeat the check on the first pass after every N-th
            :meth:`zero` (0: only the first pass).

    Raises :class:`UnsupportedModuleError` at construction for a module that
    owns trainable parameters and has no rule, or a trainable parameter that
    its rule does not cover, naming both. The automatic check takes dim 0 of
    the model's output as the rows (any per-row scalar of it exercises every
    parameter); for a model whose output is not rows-first, build with
    ``verify=False`` and call :meth:`self_check` with your own row scores.

    Usage (one micro-batch; shared pairs)::

        cap = OnePassCapture(model, K)
        with cap.record():
            logits = model(input_ids, attention_mask=mask).logits
            logps, _ = response_logps(logits, input_ids, response_mask)      # (2B,)
            margins = pair_margins(logps[:B], logps[B:], reference_logps_a=..., reference_logps_b=...)
            jac = margin_jacobian(margins, labels, beta=beta)               # (K, B)
            cap.backward(margins.sum(), shared_pair_coefficients(jac))
        grads = cap.gradients()    # {name: (K, *shape)}
    """

    def __init__(
        self,
        model: nn.Module,
        num_objectives: int,
        *,
        accumulate_dtype: torch.dtype = torch.float32,
        output_module: nn.Module | None = None,
        verify: bool = True,
        verify_every: int = 0,
        parameter_view: ParameterView = PLAIN,
    ) -> None:
        if num_objectives < 1:
            raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
        if verify_every < 0:
            raise ValueError(f"verify_every must be >= 0 (0: only the first pass), got {verify_every}")
        self.model = model
        self.num_objectives = num_objectives
        self.accumulate_dtype = accumulate_dtype
        self.parameter_view = parameter_view
        self._active = False
        self._coefficients: RowCoefficients | None = None
        self._device_cache: dict[torch.device, DeviceCoefficients] = {}
        self._buffers: dict[int, torch.Tensor] = {}
        self._anchor = torch.zeros((), requires_grad=True)  # makes every tapped output require grad
        # Unique trainable parameters in model order (tied ones once): the collective order for ZeRO.
        self.parameters: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for pname, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.parameters.append((pname, p))
        self.sites: list[_Site] = []
        hooked: set[int] = set()
        for mname, module in model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own or id(module) in hooked:
                continue
            hooked.add(id(module))
            site = _Site(self, mname or type(module).__name__, module, rule_for(module, mname, parameter_view), own)
            site.handles.append(module.register_forward_hook(self._forward_hook(site)))
            self.sites.append(site)
        if output_module is None:
            getter = getattr(model, "get_output_embeddings", None)
            output_module = getter() if callable(getter) else None
        self.output_module = output_module
        self._requires_grad_saved: list[bool] | None = None
        self._rows: int | None = None
        self._nonfinite: set[int] = set()
        self._dropped_rows: torch.Tensor | None = None  # (R,) rows found non-finite in this backward
        self._names = {id(p): n for n, p in self.parameters}
        self._index = {id(p): i for i, (_, p) in enumerate(self.parameters)}
        # Streaming state: the sink, and per record() / per backward the contribution counts.
        self._sink: GradientSink | None = None
        self._in_backward = False
        self._expected: dict[int, int] = {}
        self._received: dict[int, int] = {}
        self._final: set[int] = set()
        # Bytes of (K, numel) buffers held now / at most since construction (memory tests, benchmarks).
        self.live_buffer_bytes = 0
        self.peak_buffer_bytes = 0
        # The self-check: due before the first pass and every verify_every steps (zero() calls) after.
        self.verify = verify
        self.verify_every = verify_every
        self.agree: Callable[[SelfCheck], SelfCheck] | None = None
        """Combines this process's self-check with the other ranks' (set by a distributed adapter)."""
        self.last_check: SelfCheck | None = None
        """The latest self-check's result (None before the first)."""
        self._steps = 0
        self._checked_at: int | None = None
        self._failed: SelfCheck | None = None
        self._checking = False
        self._model_hook = model.register_forward_pre_hook(self._before_model_forward, with_kwargs=True)

    # -- hooks -------------------------------------------------------------------------------

    def _forward_hook(self, site: _Site):
        def hook(module: nn.Module, args: tuple, output):
            if not self._active:
                return None
            site.fired = True
            if not self._in_backward:
                # A use in the forward is one contribution in the backward. Calls under no_grad count
                # too: reentrant checkpointing runs the forward without grad and taps in the backward's
                # recomputation; non-reentrant recomputation happens during the backward (not counted),
                # its taps are never run, and the forward's own taps contribute.
                for p in site.params.values():
                    self._expected[id(p)] = self._expected.get(id(p), 0) + 1
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                if torch.is_grad_enabled():
                    raise RuntimeError(f"one-pass capture: module {site.name} returned {type(output).__name__}, not a tensor")
                return None
            if not args or not isinstance(args[0], torch.Tensor):
                raise RuntimeError(f"one-pass capture: module {site.name} was called without a positional tensor input")
            x = args[0]
            if self._rows is None and x.dim() > 0 and x.shape[0] > 1:
                self._rows = x.shape[0]
            broadcast_row = x.dim() > 0 and x.shape[0] == 1 and output.dim() >= 3 and output.shape[0] == 1
            if broadcast_row and self._rows is not None and self._rows > 1:
                # A row-broadcast input (e.g. GPT-2's learned positions, shape (1, T)): its (1, T, D)
                # output is summed over rows later by broadcasting, which would merge the rows'
                # gradients. Expanding it here gives the tap each row's own output gradient (a view, no
                # copy). A lower-rank output such as (1, D) broadcasts against (R, T, D) as (1, 1, D):
                # expanding its leading 1 would be wrong, so it is left alone and the rule refuses it.
                x = x.expand(self._rows, *x.shape[1:])
                output = output.expand(self._rows, *output.shape[1:])
            anchor = self._anchor if self._anchor.device == output.device else self._anchor_on(output.device)
            return _Tap.apply(anchor, site, x, output)

        return hook

    def _anchor_on(self, device: torch.device) -> torch.Tensor:
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        return self._anchor

    # -- pass control ------------------------------------------------------------------------

    @contextlib.contextmanager
    def record(self, rows: int | None = None) -> Iterator[OnePassCapture]:
        """A capture pass: run the forward and :meth:`backward` inside it.

        Parameters do not require grad inside (no dense gradients); their flags
        are restored on exit. ``rows`` (R) is inferred from the first hooked
        module whose input has more than one row when not given; a hooked module
        whose input has a single row (a row-broadcast position table) is then
        expanded to R rows so that each row keeps its own gradient. When a
        self-check is due, the model's forward runs it first (see the class).
        """
        if self._active:
            raise RuntimeError("one-pass capture: record() is not re-entrant")
        if self._failed is not None:
            self._failed.raise_if_failed()
        self._check_trainable_unchanged()
        self._enter_pass(rows)
        try:
            yield self
        finally:
            self._exit_pass()

    def _check_trainable_unchanged(self) -> None:
        """Raise when parameters were frozen or unfrozen after construction (their rules and buffers are fixed)."""
        changed = [n for n, p in self.model.named_parameters() if p.requires_grad != (id(p) in self._index)]
        if changed:
            raise RuntimeError(
                f"one-pass capture: parameters {changed[:6]}{' ...' if len(changed) > 6 else ''} were frozen or "
                "unfrozen after the capture was built; freeze the model first, then build the capture"
            )

    def _enter_pass(self, rows: int | None) -> None:
        self._rows = rows
        self._requires_grad_saved = [p.requires_grad for _, p in self.parameters]
        for _, p in self.parameters:
            p.requires_grad_(False)
        for site in self.sites:
            site.fired = False
        self._expected = {}
        self._active = True

    def _exit_pass(self) -> None:
        self._active = False
        self._rows = None
        self._coefficients = None
        self._device_cache.clear()
        for (_, p), flag in zip(self.parameters, self._requires_grad_saved):
            p.requires_grad_(flag)
        self._requires_grad_saved = None

    @property
    def check_due(self) -> bool:
        """True when the next pass's forward runs a self-check first."""
        if not self.verify:
            return False
        return self._checked_at is None or bool(self.verify_every and self._steps - self._checked_at >= self.verify_every)

    def _before_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active or self._checking or self._in_backward or not self.check_due:
            return
        rows = self._rows
        self._exit_pass()  # the check runs its own passes, with the parameters as the caller left them
        try:
            result = self._checked(lambda: _row_projection(self.model(*args, **kwargs)))
        finally:
            self._enter_pass(rows)
        if result.inconclusive:
            logger.warning("one-pass capture: %s; checking again on the next pass", result.describe())
            return
        self._checked_at = self._steps
        if not result.passed:
            self._failed = result  # record()'s exit restores the parameters' flags
            result.raise_if_failed()

    def _checked(self, row_scores: Callable[[], torch.Tensor]) -> SelfCheck:
        """:meth:`self_check`, with an error inside it reported as a failed check, combined across ranks."""
        try:
            result = self.self_check(row_scores, seed=self._steps)
        except Exception as err:  # a rule refused what only a real batch shows (rows, shapes)
            names = [n for n, _ in self.parameters]
            result = SelfCheck(names, torch.full((len(names),), math.inf, dtype=torch.float64), 0.0, error=str(err))
        if self.agree is not None:
            result = self.agree(result)
        self.last_check = result
        return result

    def set_coefficients(self, coefficients: torch.Tensor | RowCoefficients, scale: float = 1.0) -> RowCoefficients:
        """Set the (K, R) row coefficients the next backward uses (times ``scale``)."""
        rc = coefficients if isinstance(coefficients, RowCoefficients) else RowCoefficients.from_matrix(coefficients)
        if rc.num_objectives != self.num_objectives:
            raise ValueError(f"row coefficients have {rc.num_objectives} objectives, capture was built for {self.num_objectives}")
        self._coefficients = rc.scaled(scale) if scale != 1.0 else rc
        self._device_cache.clear()
        return self._coefficients

    def backward(self, seed: torch.Tensor, coefficients: torch.Tensor | RowCoefficients, scale: float = 1.0) -> None:
        """One backward of ``seed`` that adds sum_r C[k, r] * (row r's d seed/d theta) into objective k's buffers.

        A row of ``coefficients`` with an inf/NaN (objective k's loss was not
        finite) contributes nothing to this backward and makes objective k's
        gradient NaN for the step (:attr:`nonfinite_objectives`), as K separate
        backwards would.
        """
        if not self._active:
            raise RuntimeError("one-pass capture: call backward() inside `with capture.record():`")
        if not isinstance(coefficients, RowCoefficients):
            finite = torch.isfinite(coefficients).all(dim=-1) if coefficients.dim() == 2 else None
            if finite is not None and not bool(finite.all()):
                self._nonfinite.update(int(k) for k in torch.nonzero(~finite).flatten())
                coefficients = torch.where(finite.view(-1, 1), coefficients, torch.zeros_like(coefficients))
        self.set_coefficients(coefficients, scale)
        self._run_backward(seed)

    def _run_backward(self, seed: torch.Tensor) -> None:
        self.check_output_module()
        if not seed.requires_grad:
            raise RuntimeError("one-pass capture: the seed does not require grad (was the forward run inside record()?)")
        self._received, self._final = {}, set()
        self._in_backward = True
        try:
            seed.backward()
        finally:
            self._in_backward = False
            self._coefficients = None
            self._dropped_rows = None
        if self._sink is not None:
            # Not completed in the backward: unused this pass (or used only under no_grad outside a
            # checkpoint). Registration order, so every rank hands the sink the same sequence.
            for index, (_, p) in enumerate(self.parameters):
                if id(p) not in self._final:
                    self._sink.on_final(p, index, self.take(p))
            self._final = set()
            self._sink.end_backward()

    def _find_nonfinite_rows(self, grad: torch.Tensor) -> None:
        """Mark the objectives that score a non-finite row of the output layer's gradient, and drop those rows.

        A NaN row (NaN logits, a NaN loss term) would otherwise reach every objective through
        products with a zero coefficient (0 * NaN), here and in every module below, whose local
        derivatives at NaN activations are NaN too. K separate passes make exactly the
        objectives that score the row non-finite; so does this, by zeroing the row's input and
        output gradient at every hooked module of this backward. One reduction over the
        output layer's gradient; nothing more unless a row is bad.
        """
        rc = self._coefficients
        if rc is None or grad.dim() < 1 or grad.shape[0] != rc.num_rows:
            return
        bad = ~torch.isfinite(grad.reshape(grad.shape[0], -1).sum(dim=1, dtype=torch.float32))
        if not bool(bad.any()):
            return
        scoring = (rc.matrix[:, bad.cpu()] != 0).any(dim=1)
        self._nonfinite.update(int(k) for k in torch.nonzero(scoring).flatten())
        self._dropped_rows = bad

    @property
    def nonfinite_objectives(self) -> list[int]:
        """Objectives whose row coefficients were not finite in a backward since :meth:`zero` (their gradient is NaN)."""
        return sorted(self._nonfinite)

    # -- self-check ----------------------------------------------------------------------------

    def self_check(self, row_scores: Callable[[], torch.Tensor], *, seed: int = 0) -> SelfCheck:
        """Compare one capture pass with autograd on the same batch; the capture's state is left untouched.

        ``row_scores`` runs the model's forward on one batch and returns its (R,)
        per-row scores (what the seed of :meth:`backward` sums, e.g. each row's
        response log-prob). With random row weights v (seeded, both signs), autograd
        computes d(sum_r v_r s_r)/d theta in one forward and backward, and the
        capture computes the same from a second forward and backward with v as the
        row coefficients of a single objective. A weight used outside its module's
        hooked call, or rows recognised by shape, make the two differ; random v
        exposes rows assigned wrongly, which an all-ones weighting would not.
        Randomness (dropout) is replayed identically in both passes and restored
        afterwards. Costs two extra forward and backward passes and, transiently,
        two dense gradients of the trainable parameters.

        Under autograd the parameters must require grad, so call it outside
        :meth:`record`. Under reentrant activation checkpointing, which cannot run
        ``torch.autograd.grad``, the reference is a plain backward, refused where it
        would fire gradient hooks (DeepSpeed's): use the non-reentrant variant there.
        """
        if self._active:
            raise RuntimeError("one-pass capture: self_check() runs its own passes; call it outside record()")
        self._checking = True
        try:
            return self._self_check(row_scores, seed)
        finally:
            self._checking = False

    def _self_check(self, row_scores: Callable[[], torch.Tensor], seed: int) -> SelfCheck:
        started = time.perf_counter()
        params = [p for _, p in self.parameters]
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            state = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])
            with torch.enable_grad():
                scores = row_scores()
                weights = _check_weights(scores.shape[0], seed, scores)
                reference = _autograd_gradients((scores * weights).sum(), params)
            del scores
            torch.set_rng_state(state[0])
            for d, s in zip(devices, state[1]):
                torch.cuda.set_rng_state(s, d)
            captured = self._capture_rows_weighted(row_scores, weights)
        errors = torch.zeros(len(params), dtype=torch.float64)
        total = math.sqrt(sum(float(r.double().pow(2).sum()) for r in reference if r is not None))
        numel_total = sum(self.numel(p) for p in params)
        finite = math.isfinite(total)
        for i, (p, ref) in enumerate(zip(params, reference)):
            got = captured.get(id(p))
            ref64 = ref.reshape(-1).to(torch.float64) if ref is not None else None
            got64 = got.reshape(-1).to(torch.float64) if got is not None else None
            if ref64 is None and got64 is None:
                continue
            if ref64 is None:
                ref64 = torch.zeros_like(got64)
            if got64 is None:
                got64 = torch.zeros_like(ref64)
            floor = 1e-3 * total * math.sqrt(self.numel(p) / max(numel_total, 1))
            scale = max(float(ref64.norm()), float(got64.norm()), floor, 1e-30)
            errors[i] = float((got64.to(ref64.device) - ref64).norm()) / scale
        dtypes = {p.dtype for p in params}
        tolerance = max((_CHECK_TOLERANCE.get(d, _CHECK_TOLERANCE_LOW_PRECISION) for d in dtypes), default=1e-3)
        return SelfCheck([n for n, _ in self.parameters], errors, tolerance, time.perf_counter() - started,
                         inconclusive=not finite)  # fmt: skip

    def _capture_rows_weighted(self, row_scores: Callable[[], torch.Tensor], weights: torch.Tensor) -> dict[int, torch.Tensor]:
        """{id(param): (1, numel)} = sum_r weights[r] * d s_r / d param through the capture's rules, without its sink."""
        saved = self._sink, self._buffers, self.live_buffer_bytes, self.peak_buffer_bytes, self.num_objectives
        self._sink, self._buffers, self.num_objectives = None, {}, 1
        try:
            with self.record(rows=weights.shape[0]):
                scores = row_scores()
                self._coefficients = RowCoefficients.from_matrix(weights.detach().view(1, -1).to(torch.float64).cpu())
                self._device_cache.clear()
                self._run_backward(scores.sum())
            return self._buffers
        finally:
            self._sink, self._buffers, self.live_buffer_bytes, self.peak_buffer_bytes, self.num_objectives = saved

    def stream_to(self, sink: GradientSink | None) -> None:
        """Hand each parameter's K gradients to ``sink`` as soon as they are complete in each backward.

        With a sink the capture keeps nothing between backwards (:meth:`gradients`
        reads zeros); ``None`` returns to accumulating full buffers until :meth:`zero`.
        """
        if self._active:
            raise RuntimeError("one-pass capture: stream_to() cannot change inside record()")
        self._sink = sink

    def check_output_module(self) -> None:
        """Raise :class:`FusedKernelError` if the output layer is hooked but did not run in this pass."""
        site = next((s for s in self.sites if s.module is self.output_module), None)
        if site is not None and not site.fired:
            raise FusedKernelError(
                f"one-pass capture: output layer {site.name} did not run in this forward; a fused kernel "
                "(e.g. fused linear cross-entropy) computed the logits from its weight directly, which hides the "
                "logits gradient. Disable the fused loss (e.g. Liger's fused_linear_cross_entropy) or use K-pass capture"
            )

    def _device_coefficients(self, device: torch.device) -> DeviceCoefficients:
        if self._coefficients is None:
            raise RuntimeError("one-pass capture: a backward reached a hooked module without row coefficients; use capture.backward()")
        dc = self._device_cache.get(device)
        if dc is None:
            dc = self._device_cache[device] = DeviceCoefficients.build(self._coefficients, device)
        return dc

    # -- buffers -----------------------------------------------------------------------------

    def numel(self, p: nn.Parameter) -> int:
        """The full (unpartitioned) element count of ``p`` (see :attr:`parameter_view`)."""
        return self.parameter_view.numel(p)

    def shape(self, p: nn.Parameter) -> tuple[int, ...]:
        """The full (unpartitioned) shape of ``p`` (see :attr:`parameter_view`)."""
        return tuple(self.parameter_view.full_shape(p))

    def _contribute(self, p: nn.Parameter, grad: torch.Tensor | None) -> None:
        """One hooked call's share of ``p`` (None: nothing); under streaming, hand ``p`` over once complete."""
        pid = id(p)
        if self._sink is None:
            if grad is not None:
                self._accumulate(p, grad)
            return
        if pid in self._final:
            raise RuntimeError(
                f"one-pass capture: parameter {self._names.get(pid)} got a gradient contribution after it was "
                f"complete (the forward counted {self._expected.get(pid, 0)} uses) and already reduce-scattered; "
                "a module was called in the backward's recomputation that the forward did not call"
            )
        if grad is not None:
            self._accumulate(p, grad)
        received = self._received[pid] = self._received.get(pid, 0) + 1
        if received == self._expected.get(pid, 0):
            self._final.add(pid)
            self._sink.on_final(p, self._index[pid], self.take(p))

    def _accumulate(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        flat = grad.reshape(grad.shape[0], -1)
        buf = self._buffers.get(id(p))
        if buf is None:
            buf = self._buffers[id(p)] = flat.to(self.accumulate_dtype) if flat.dtype != self.accumulate_dtype else flat.contiguous()
            self.live_buffer_bytes += buf.numel() * buf.element_size()
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, self.live_buffer_bytes)
        else:
            buf.add_(flat.to(buf.dtype))

    def flat_gradient(self, p: nn.Parameter, device: torch.device | None = None) -> torch.Tensor:
        """(K, numel) gradients of ``p`` accumulated so far (zeros if it got none; NaN rows: non-finite objectives)."""
        buf = self._buffers.get(id(p))
        if buf is None:
            dev = device if device is not None else (p.device if p.device.type != "meta" else torch.device("cpu"))
            buf = torch.zeros(self.num_objectives, self.numel(p), dtype=self.accumulate_dtype, device=dev)
        for k in self._nonfinite:
            buf[k] = float("nan")
        return buf

    def take(self, p: nn.Parameter) -> torch.Tensor | None:
        """Remove and return ``p``'s (K, numel) buffer (None if it has none); the caller owns it from here on."""
        buf = self._buffers.pop(id(p), None)
        if buf is not None:
            self.live_buffer_bytes -= buf.numel() * buf.element_size()
        return buf

    def gradients(self) -> dict[str, torch.Tensor]:
        """{parameter name: (K, *shape)} for every trainable parameter (tied ones once)."""
        return {n: self.flat_gradient(p).view(self.num_objectives, *self.shape(p)) for n, p in self.parameters}

    def zero(self) -> None:
        """Drop all accumulated gradients and non-finite marks (start of an optimizer step)."""
        self._steps += 1
        self._buffers.clear()
        self._nonfinite.clear()
        self.live_buffer_bytes = 0

    def remove(self) -> None:
        """Remove every hook (the model is back to plain)."""
        for site in self.sites:
            for h in site.handles:
                h.remove()
            site.handles.clear()
        self._model_hook.remove()


def _check_weights(rows: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """(R,) random row weights of both signs, away from 0, from ``seed`` (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.randint(0, 2, (rows,), generator=gen).to(torch.float64) * 2 - 1
    return (magnitude * sign).to(device=like.device, dtype=like.dtype)


def _row_projection(output) -> torch.Tensor:
    """(R,) a fixed random scalar of each row of a model's output (its tensor, ``.logits``, or first tensor).

    out (R, ..., D) -> (out @ b) flattened per row @ a, with seeded Gaussian a and b:
    a generic per-row function of every output element, never a (R, ..., D) copy.
    """
    tensor = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if tensor is None:
        values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
        tensor = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if tensor is None or tensor.dim() < 1:
        raise RuntimeError(
            f"one-pass capture: the model's output ({type(output).__name__}) holds no tensor with rows for the "
            "self-check; build the capture with verify=False and call self_check(row_scores)"
        )
    rows = tensor.shape[0]
    flat = tensor.reshape(rows, -1, tensor.shape[-1] if tensor.dim() > 1 else 1)
    gen = torch.Generator().manual_seed(1234)
    b = torch.randn(flat.shape[-1], generator=gen, dtype=torch.float32).to(device=tensor.device, dtype=tensor.dtype)
    a = torch.randn(flat.shape[1], generator=gen, dtype=torch.float32).to(tensor.device)
    return (flat @ b).to(torch.float32) @ a


def _autograd_gradients(seed: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """d seed / d params by autograd, leaving every ``.grad`` as it was and firing no gradient hook.

    ``torch.autograd.grad`` runs no AccumulateGrad node, so hooks that frameworks
    hang there (DeepSpeed's reductions) stay silent. Reentrant activation
    checkpointing cannot run it; there, without such hooks, a plain backward
    with the ``.grad`` fields saved and restored gives the same.
    """
    try:
        # retain_graph: if reentrant checkpointing refuses half-way, the backward below still has the graph.
        return list(torch.autograd.grad(seed, params, allow_unused=True, retain_graph=True))
    except RuntimeError as err:
        if "checkpoint" not in str(err).lower() or "reentrant" not in str(err).lower():
            raise
        if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
            raise RuntimeError(
                "one-pass capture self-check: reentrant activation checkpointing needs a plain backward, which "
                "would fire the gradient hooks on these parameters (DeepSpeed's); use non-reentrant checkpointing "
                "(use_reentrant=False)"
            ) from err
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        seed.backward()
        return [p.grad for p in params]
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def _without_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows (dim 0) marked in ``rows`` zeroed; unchanged when its dim 0 is not the rows."""
    if t.dim() < 1 or t.shape[0] != rows.shape[0]:
        return t
    return t.masked_fill(rows.to(t.device).view(-1, *([1] * (t.dim() - 1))), 0)
