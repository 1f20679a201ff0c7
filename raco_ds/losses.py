"""Per-objective preference losses (DPO, IPO, hinge, SimPO) for RACO.

Each of K objectives sees the same B preference pairs (A, B) through a row of
a (K, B) label tensor: +1 = objective k prefers response A, -1 = it prefers
response B, 0 = tie or not this objective's pair (no gradient). Objective k's
loss is the mean, over its own non-tie pairs, of a per-pair loss of the signed
margin z = s_kr * m_r, where the pair margin is

    m_r = [log pi(A) - log ref(A)] - [log pi(B) - log ref(B)]    (reference-based)
    m_r = log pi(A) / |A| - log pi(B) / |B|                      (SimPO: reference-free,
                                                                  length-normalised)

The math is split in two layers so that the one-pass capture (DESIGN.md
section 6) can backpropagate the sum of pair margins and still get each
objective's row coefficients dL_k/dm_r:

- :func:`pair_margins` turns log-probs into the margins m (B,);
- :func:`losses_from_margins` turns margins and labels into the K losses;
- :func:`margin_jacobian` gives dL_k/dm_r (K, B) from the same code;
- :func:`preference_losses` composes the first two and adds detached metrics.

Per-pair losses live in the :data:`LOSSES` registry (``register_loss``), one
small pure function each, so a new variant is one decorated function and never
a branch in shared code.

Example:
    >>> import torch
    >>> out = preference_losses(
    ...     torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -12.0]),
    ...     torch.tensor([[1, -1], [0, 1]]),
    ...     reference_logps_a=torch.tensor([-10.0, -12.0]),
    ...     reference_logps_b=torch.tensor([-10.0, -13.0]))
    >>> out.losses
    tensor([0.5981, 0.7981])
    >>> out.num_pairs
    tensor([2, 1])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "PairLoss",
    "PreferenceLoss",
    "PreferenceLosses",
    "get_loss",
    "losses_from_margins",
    "margin_jacobian",
    "pair_margins",
    "preference_losses",
    "register_loss",
]

PairLoss = Callable[..., torch.Tensor]
"""A per-pair loss: ``fn(z, beta, **options) -> Tensor``, elementwise in the signed margin z."""


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered per-pair loss and how its pair margin is formed.

    Calling it applies the per-pair loss elementwise to signed margins z.

    Attributes:
        name: registry name (``"dpo"``, ...).
        fn: ``fn(z, beta, **options) -> Tensor``, elementwise, differentiable in z.
        reference_free: the margin ignores reference log-probs (SimPO).
        length_normalised: each response's log-prob is divided by its token count.
        options: names of the keyword options ``fn`` accepts (checked at call time,
            so a misspelt option is an error instead of being silently ignored).

    Example:
        >>> import torch
        >>> get_loss("hinge")(torch.tensor([0.0, 10.0]), beta=0.2)
        tensor([1., 0.])
    """

    name: str
    fn: PairLoss
    reference_free: bool = False
    length_normalised: bool = False
    options: tuple[str, ...] = ()

    def __call__(self, z: torch.Tensor, beta: float, **options: float) -> torch.Tensor:
        return self.fn(z, beta, **options)


LOSSES: dict[str, PreferenceLoss] = {}
"""Registry: loss name -> :class:`PreferenceLoss`. Extend it with :func:`register_loss`."""


def register_loss(
    name: str, *, reference_free: bool = False, length_normalised: bool = False
) -> Callable[[PairLoss], PairLoss]:
    """Decorator registering ``fn(z, beta, **options)`` as the per-pair loss ``name``.

    The keyword-only parameters of ``fn`` after ``beta`` become the loss's
    options (passed through ``preference_losses(..., **options)``).

    Example:
        >>> import torch
        >>> @register_loss("squared_example")
        ... def _squared(z, beta):
        ...     return (1 - beta * z) ** 2
        >>> losses_from_margins(torch.tensor([1.0]), torch.tensor([[1]]), loss="squared_example", beta=0.5)
        tensor([0.2500])
        >>> del LOSSES["squared_example"]
    """

    def decorator(fn: PairLoss) -> PairLoss:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered; pick another name")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or [p.name for p in params[:2]] != ["z", "beta"]:
            raise ValueError(
                f"loss {name!r}: the function must take (z, beta, *, options...), got {inspect.signature(fn)}"
            )
        if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params[2:]):
            raise ValueError(
                f"loss {name!r}: options after (z, beta) must be keyword-only, got {inspect.signature(fn)}"
            )
        options = tuple(p.name for p in params[2:])
        LOSSES[name] = PreferenceLoss(name, fn, reference_free, length_normalised, options)
        return fn

    return decorator


def get_loss(name: str) -> PreferenceLoss:
    """The registered loss called ``name``; ValueError listing the known names otherwise.

    Example:
        >>> get_loss("dpo").reference_free
        False
        >>> get_loss("simpo").options
        ('gamma',)
    """
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}") from None


# ---------------------------------------------------------------------------
# The per-pair losses. z is the signed margin (> 0: the policy already prefers
# the response this objective prefers, relative to the reference).


@register_loss("dpo")
def _dpo(z: torch.Tensor, beta: float, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al.); label_smoothing > 0 is conservative DPO (cDPO):
    the label is trusted with probability 1 - label_smoothing."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the label flip probability), got {label_smoothing}")
    loss = -F.logsigmoid(beta * z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * z)
    return loss


@register_loss("ipo")
def _ipo(z: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): regress the margin onto 1 / (2 beta) instead of pushing it to infinity."""
    return (z - 1.0 / (2.0 * beta)) ** 2


@register_loss("hinge")
def _hinge(z: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023): zero once beta * z clears a margin of 1."""
    return F.relu(1.0 - beta * z)


@register_loss("simpo", reference_free=True, length_normalised=True)
def _simpo(z: torch.Tensor, beta: float, *, gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024): sigmoid loss on the length-normalised margin minus a target margin gamma.

    SimPO's margins are per-token averages, much smaller than DPO's summed
    log-ratios, so pass a larger beta than the DPO default (the paper uses 2.0-2.5).
    """
    if not math.isfinite(gamma):
        raise ValueError(f"gamma (SimPO target margin) must be finite, got {gamma}")
    return -F.logsigmoid(beta * z - gamma)


# ---------------------------------------------------------------------------
# Validation. Each check names the argument, what was found and the fix.


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")


def _check_options(spec: PreferenceLoss, options: dict[str, float]) -> None:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"loss {spec.name!r} got unknown option(s) {unknown}; it accepts {list(spec.options)}")


def _check_vector(name: str, value: object, batch: int | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B,), got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D of shape (B,), got shape {tuple(value.shape)}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(
            f"{name} has {value.shape[0]} pairs but the batch has {batch}; all per-pair inputs need shape (B,)"
        )
    return value


def _check_float_vector(name: str, value: object, batch: int | None) -> torch.Tensor:
    value = _check_vector(name, value, batch)
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (summed log-probs), got {value.dtype}")
    return value


def _check_labels(labels: object, batch: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of shape (K, B), got {type(labels).__name__}")
    if labels.dim() != 2:
        raise ValueError(
            f"labels must be 2-D of shape (K, B), got shape {tuple(labels.shape)}; "
            "for a single objective use labels.unsqueeze(0)"
        )
    if labels.shape[0] == 0:
        raise ValueError("labels has no objectives (shape (0, B)); K must be at least 1")
    if labels.shape[1] != batch:
        raise ValueError(
            f"labels has {labels.shape[1]} pairs (shape {tuple(labels.shape)}) but the log-probs have {batch}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor with values in {{-1, 0, 1}}, got dtype {labels.dtype}; "
            "use labels.long()"
        )
    bad = (labels != 1) & (labels != 0) & (labels != -1)
    if bool(bad.any()):
        found = sorted(set(labels[bad].tolist()))[:5]
        raise ValueError(
            f"labels must be in {{-1, 0, 1}} (+1 prefers A, -1 prefers B, 0 tie), found {found}"
        )
    return labels


# ---------------------------------------------------------------------------
# The two layers: log-probs -> pair margins, margins + labels -> K losses.


def _log_ratios(
    spec: PreferenceLoss,
    policy_logps_a: torch.Tensor,
    policy_logps_b: torch.Tensor,
    reference_logps_a: torch.Tensor | None,
    reference_logps_b: torch.Tensor | None,
    lengths_a: torch.Tensor | None,
    lengths_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated per-response u_A, u_B with implicit reward beta * u and pair margin u_A - u_B."""
    policy_logps_a = _check_float_vector("policy_logps_a", policy_logps_a, None)
    batch = policy_logps_a.shape[0]
    policy_logps_b = _check_float_vector("policy_logps_b", policy_logps_b, batch)
    # Losses are computed in at least float32: bf16 log-prob differences of
    # long responses lose most of their digits.
    dtype = torch.promote_types(torch.promote_types(policy_logps_a.dtype, policy_logps_b.dtype), torch.float32)
    u_a, u_b = policy_logps_a.to(dtype), policy_logps_b.to(dtype)

    if not spec.reference_free:
        if reference_logps_a is None or reference_logps_b is None:
            raise ValueError(
                f"loss {spec.name!r} needs reference_logps_a and reference_logps_b (the frozen reference "
                f"model's summed log-probs); pass both, or use a reference-free loss "
                f"{sorted(n for n, s in LOSSES.items() if s.reference_free)}"
            )
        ref_a = _check_float_vector("reference_logps_a", reference_logps_a, batch)
        ref_b = _check_float_vector("reference_logps_b", reference_logps_b, batch)
        # The reference is frozen: never let a gradient reach it, even if the
        # caller computed it with autograd on.
        u_a = u_a - ref_a.detach().to(dtype)
        u_b = u_b - ref_b.detach().to(dtype)

    if spec.length_normalised:
        if lengths_a is None or lengths_b is None:
            raise ValueError(
                f"loss {spec.name!r} is length-normalised and needs lengths_a and lengths_b "
                "(response token counts, shape (B,)); pass both"
            )
        for name, lengths in (("lengths_a", lengths_a), ("lengths_b", lengths_b)):
            _check_vector(name, lengths, batch)
            if lengths.is_complex() or lengths.dtype == torch.bool or not bool((lengths > 0).all()):
                raise ValueError(f"{name} must be positive token counts, got {lengths.tolist()[:8]}")
        u_a = u_a / lengths_a.detach().to(dtype)
        u_b = u_b / lengths_b.detach().to(dtype)
    return u_a, u_b


def pair_margins(
    policy_logps_a: torch.Tensor,
    policy_logps_b: torch.Tensor,
    *,
    reference_logps_a: torch.Tensor | None = None,
    reference_logps_b: torch.Tensor | None = None,
    loss: str = "dpo",
    lengths_a: torch.Tensor | None = None,
    lengths_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pair margins m (B,) that ``loss`` is a function of (differentiable in the policy log-probs).

    Reference-based losses: m = [log pi(A) - log ref(A)] - [log pi(B) - log ref(B)].
    Length-normalised reference-free losses (SimPO): m = log pi(A)/|A| - log pi(B)/|B|.
    Reference log-probs and lengths are treated as constants (detached).

    Example:
        >>> import torch
        >>> pair_margins(torch.tensor([-4.0]), torch.tensor([-6.0]),
        ...              reference_logps_a=torch.tensor([-5.0]), reference_logps_b=torch.tensor([-5.0]))
        tensor([2.])
        >>> pair_margins(torch.tensor([-4.0]), torch.tensor([-6.0]), loss="simpo",
        ...              lengths_a=torch.tensor([2]), lengths_b=torch.tensor([4]))
        tensor([-0.5000])
    """
    u_a, u_b = _log_ratios(
        get_loss(loss), policy_logps_a, policy_logps_b, reference_logps_a, reference_logps_b, lengths_a, lengths_b
    )
    return u_a - u_b


def _reduce(
    spec: PreferenceLoss, margins: torch.Tensor, labels: torch.Tensor, beta: float, options: dict[str, float]
) -> torch.Tensor:
    """K losses from margins broadcastable to (K, B): mean per-pair loss over each row's non-tie pairs."""
    labels = labels.to(margins.device)
    mask = labels != 0
    # Mask both before and after the loss: before, so a tie pair's margin (even
    # inf/NaN from another objective's data) never enters the loss function and
    # its backward sees 0 * finite; after, because the loss of z = 0 is not 0.
    zero = torch.zeros((), dtype=margins.dtype, device=margins.device)
    z = torch.where(mask, labels.to(margins.dtype) * margins, zero)
    per_pair = torch.where(mask, spec(z, beta, **options), zero)
    # An objective with no non-tie pair divides 0 by 1: loss exactly 0.0 with a
    # zero gradient, instead of 0/0 = NaN that would poison the Gram.
    counts = mask.sum(dim=1).clamp(min=1).to(margins.dtype)
    return per_pair.sum(dim=1) / counts


def losses_from_margins(
    margins: torch.Tensor, labels: torch.Tensor, *, loss: str = "dpo", beta: float = 0.2, **options: float
) -> torch.Tensor:
    """The K per-objective losses (K,) as a function of the pair margins m (B,).

    L_k = mean over pairs r with labels[k, r] != 0 of loss(labels[k, r] * m[r]);
    exactly 0.0 (zero gradient) for an objective with no non-tie pair. This is
    the single place the loss math lives: :func:`preference_losses` calls it,
    and one-pass capture differentiates it (see :func:`margin_jacobian`).

    Example:
        >>> import torch
        >>> losses_from_margins(torch.tensor([0.0, 5.0]), torch.tensor([[1, 0], [1, -1], [0, 0]]), beta=0.2)
        tensor([0.6931, 1.0032, 0.0000])
    """
    spec = get_loss(loss)
    _check_beta(beta)
    _check_options(spec, options)
    margins = _check_float_vector("margins", margins, None)
    labels = _check_labels(labels, margins.shape[0])
    return _reduce(spec, margins.unsqueeze(0), labels, beta, options)


def margin_jacobian(
    margins: torch.Tensor, labels: torch.Tensor, *, loss: str = "dpo", beta: float = 0.2, **options: float
) -> torch.Tensor:
    """dL_k/dm_r as a detached (K, B) tensor: the row coefficients of one-pass capture.

    Computed by autograd through :func:`losses_from_margins`'s math in a single
    backward (each objective gets its own copy of the margins, and L_k only
    depends on its own copy). For DPO this is
    -beta * s_kr * sigmoid(-beta * s_kr * m_r) / n_k, and 0 on ties.

    Example:
        >>> import torch
        >>> margin_jacobian(torch.tensor([0.0, 0.0]), torch.tensor([[1, -1], [0, 1]]), beta=0.2)
        tensor([[-0.0500,  0.0500],
                [ 0.0000, -0.1000]])
    """
    spec = get_loss(loss)
    _check_beta(beta)
    _check_options(spec, options)
    margins = _check_float_vector("margins", margins, None)
    labels = _check_labels(labels, margins.shape[0])
    with torch.enable_grad():
        copies = margins.detach().to(torch.promote_types(margins.dtype, torch.float32))
        copies = copies.expand(labels.shape[0], -1).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_reduce(spec, copies, labels, beta, options).sum(), copies)
    return grad


# ---------------------------------------------------------------------------
# The full loss with metrics.


@dataclass(frozen=True)
class PreferenceLosses:
    """Per-objective losses of one batch, with detached per-objective metrics (all shape (K,)).

    An objective with no non-tie pair has loss exactly 0.0 (zero gradient),
    num_pairs 0 and NaN accuracy, margin, chosen_reward and rejected_reward
    (a mean over no pairs; NaN rather than 0 so that it cannot be mistaken for
    a measured value, and dashboards show a gap).

    Attributes:
        losses: differentiable; L_k = mean per-pair loss over objective k's non-tie pairs.
        accuracy: fraction of non-tie pairs whose preferred response has the strictly
            higher implicit reward.
        margin: mean implicit-reward margin, preferred minus other.
        chosen_reward: mean implicit reward of the preferred response.
        rejected_reward: mean implicit reward of the other response.
        num_pairs: long, number of non-tie pairs of each objective.

    The implicit reward of a response is beta * (log pi - log ref), or
    beta * log pi / length for reference-free length-normalised losses.

    Example:
        >>> import torch
        >>> out = preference_losses(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([[1], [0]]),
        ...                         loss="simpo", beta=2.0, lengths_a=torch.tensor([1]), lengths_b=torch.tensor([1]))
        >>> out.scalars(["helpful", "harmless"])["margin/helpful"]
        2.0
    """

    losses: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    num_pairs: torch.Tensor

    def scalars(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Flat ``{"<metric>/<objective>": float}`` for logging; objectives are named by index if no names.

        Example:
            >>> import torch
            >>> sorted(PreferenceLosses(*([torch.zeros(1)] * 6)).scalars())[:2]
            ['accuracy/0', 'chosen_reward/0']
        """
        num = self.losses.shape[0]
        names = [str(k) for k in range(num)] if names is None else list(names)
        if len(names) != num:
            raise ValueError(f"got {len(names)} objective names for {num} objectives")
        out: dict[str, float] = {}
        for field in ("losses", "accuracy", "margin", "chosen_reward", "rejected_reward", "num_pairs"):
            values = getattr(self, field).detach().cpu().tolist()
            key = "loss" if field == "losses" else field
            out.update({f"{key}/{name}": float(v) for name, v in zip(names, values)})
        return out


def preference_losses(
    policy_logps_a: torch.Tensor,
    policy_logps_b: torch.Tensor,
    labels: torch.Tensor,
    *,
    reference_logps_a: torch.Tensor | None = None,
    reference_logps_b: torch.Tensor | None = None,
    loss: str = "dpo",
    beta: float = 0.2,
    lengths_a: torch.Tensor | None = None,
    lengths_b: torch.Tensor | None = None,
    **options: float,
) -> PreferenceLosses:
    """K per-objective preference losses and metrics from the log-probs of both responses of B pairs.

    Args:
        policy_logps_a, policy_logps_b: (B,) summed log-probs of response A / B under the
            policy (differentiable).
        labels: (K, B) integer; +1 = objective k prefers A, -1 = prefers B, 0 = tie or
            not objective k's pair (contributes nothing, not even through the mean).
        reference_logps_a, reference_logps_b: (B,) reference-model log-probs (treated as
            constants); required by reference-based losses, ignored by reference-free ones.
        loss: a :data:`LOSSES` name: "dpo" (sigmoid), "ipo", "hinge", "simpo".
        beta: inverse temperature; 0.2 is the RACO paper's DPO value. SimPO's length-normalised
            margins are ~100x smaller: pass beta around 2.0 with ``loss="simpo"``.
        lengths_a, lengths_b: (B,) response token counts; required by length-normalised losses.
        **options: loss-specific: ``label_smoothing`` (dpo, cDPO), ``gamma`` (simpo target
            margin, default 0.5).

    Non-finite log-probs are not rejected (that would need a device sync per
    step): they make non-finite the losses and metrics of exactly the
    objectives whose non-tie pairs contain them, where the RACO hook's
    non-finite handling sees them. On a pair that is a tie for every objective
    they reach nothing, gradients included. (Through the shared margin, the
    gradient of another objective's loss can still turn NaN, e.g. IPO's
    0 * inf; RacoHook(on_nonfinite="skip") skips such a step.)

    Example:
        >>> import torch
        >>> policy_a = torch.tensor([-10.0, -20.0], requires_grad=True)
        >>> out = preference_losses(policy_a, torch.tensor([-12.0, -19.0]), torch.tensor([[1, 1], [0, -1]]),
        ...                         reference_logps_a=torch.tensor([-11.0, -20.0]),
        ...                         reference_logps_b=torch.tensor([-11.0, -20.0]), loss="ipo", beta=0.5)
        >>> out.losses
        tensor([2.5000, 0.0000], grad_fn=<DivBackward0>)
        >>> out.accuracy, out.num_pairs
        (tensor([0.5000, 1.0000]), tensor([2, 1]))
    """
    spec = get_loss(loss)
    _check_beta(beta)
    _check_options(spec, options)
    u_a, u_b = _log_ratios(
        spec, policy_logps_a, policy_logps_b, reference_logps_a, reference_logps_b, lengths_a, lengths_b
    )
    labels = _check_labels(labels, u_a.shape[0])
    losses = _reduce(spec, (u_a - u_b).unsqueeze(0), labels, beta, options)

    with torch.no_grad():
        labels = labels.to(u_a.device)
        mask = labels != 0
        prefers_a = labels > 0
        reward_a, reward_b = beta * u_a.detach(), beta * u_b.detach()
        chosen = torch.where(prefers_a, reward_a, reward_b)
        rejected = torch.where(prefers_a, reward_b, reward_a)
        counts = mask.sum(dim=1)
        nan = torch.tensor(float("nan"), dtype=u_a.dtype, device=u_a.device)

        def masked_mean(values: torch.Tensor) -> torch.Tensor:
            # where() rather than multiply: a NaN reward on a tie pair stays out.
            total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
            return torch.where(counts > 0, total / counts.clamp(min=1), nan)

        metrics = PreferenceLosses(
            losses=losses,
            accuracy=masked_mean((chosen > rejected).to(u_a.dtype)),
            margin=masked_mean(chosen - rejected),
            chosen_reward=masked_mean(chosen),
            rejected_reward=masked_mean(rejected),
            num_pairs=counts,
        )
    return metrics
