"""Per-module-type rules: K parameter gradients from a module's input and output gradient.

A rule sees one call of a module: its input ``x`` (rows first), the gradient
``g`` of its output, and the step's row coefficients, and returns objective
k's contribution to each of the module's parameters, stacked (K, *shape).
Rules never read parameter values, so under ZeRO-3 nothing is gathered for
them. A module type with no rule cannot be captured exactly: construction
raises (see :func:`rule_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._coefficients import CoefficientShape, RowCoefficients
from ._params import PLAIN, ParameterView

__all__ = ["DeviceCoefficients", "Rule", "RuleSpec", "UnsupportedModuleError", "rule_for"]

# Bound on the temporary (groups x Dout x Din) products of one Linear weight (shared pairs): a chunk of
# groups is multiplied at once only while it fits; a single group's product may exceed it (it is no
# larger than one objective's gradient of that weight, which the capture holds K of anyway).
_GROUP_CHUNK_BYTES = 32 << 20


class UnsupportedModuleError(TypeError):
    """A module owns trainable parameters that one-pass capture cannot split by objective."""


@dataclass(frozen=True)
class _SoleGroup:
    """Rows that only ``objective`` scores, each with coefficient ``direction * row_scale[r]``."""

    objective: int
    direction: float
    rows: torch.Tensor  # row indices on the device
    runs: tuple[tuple[int, int], ...] | None  # the rows as a few contiguous [start, stop) runs: views, no gather
    unit_scale: bool  # every row_scale is 1 (0/1 membership): no scaled copy of the output gradient


_MAX_RUNS = 4  # a sole group in at most this many contiguous runs is read through views


def _contiguous_runs(rows: list[int]) -> tuple[tuple[int, int], ...] | None:
    """``rows`` (sorted) as at most ``_MAX_RUNS`` [start, stop) runs, or None.

    >>> _contiguous_runs([0, 1, 2, 5, 6])
    ((0, 3), (5, 7))
    """
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][1]:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return tuple((a, b) for a, b in runs) if len(runs) <= _MAX_RUNS else None


@dataclass
class DeviceCoefficients(CoefficientShape):
    """:class:`RowCoefficients` moved to the compute device once per backward, split for the Linear rule.

    Groups whose direction has one nonzero entry (every group of per-objective
    rows; a shared pair that only one objective scores) are ``sole`` groups:
    their product goes straight into that objective's gradient. The others are
    ``shared`` groups (a pair that several objectives score), whose products are
    folded into all K gradients by their directions.
    """

    matrix: torch.Tensor  # (K, R) float32
    row_scale: torch.Tensor  # (R,) float32
    sole: tuple[_SoleGroup, ...]
    shared_rows: tuple[torch.Tensor, ...]
    """Row indices per shared group."""
    shared_directions: torch.Tensor  # (K, J_shared) float32
    shared_equal: torch.Tensor | None
    """(J_shared, s) row indices when every shared group has s rows (batched products), else None."""

    @classmethod
    def build(cls, rc: RowCoefficients, device: torch.device) -> DeviceCoefficients:
        """Move ``rc`` to ``device`` (fp32; the float64 originals stay on the host)."""
        directions = rc.directions.to(torch.float32)
        sole, shared = [], []
        for j, column in enumerate(directions.T):
            nonzero = torch.nonzero(column).flatten().tolist()
            if len(nonzero) == 1:
                rows = rc.group_rows[j]
                sole.append(_SoleGroup(
                    objective=nonzero[0], direction=float(column[nonzero[0]]), rows=rows.to(device),
                    runs=_contiguous_runs(rows.tolist()), unit_scale=bool((rc.row_scale[rows] == 1).all()),
                ))  # fmt: skip
            else:
                shared.append(j)
        shared_rows = tuple(rc.group_rows[j].to(device) for j in shared)
        equal = None
        if shared_rows and len({len(rows) for rows in shared_rows}) == 1:
            equal = torch.stack(list(shared_rows))
        return cls(
            matrix=rc.matrix.to(device=device, dtype=torch.float32),
            row_scale=rc.row_scale.to(device=device, dtype=torch.float32),
            sole=tuple(sole),
            shared_rows=shared_rows,
            shared_directions=directions[:, shared].to(device),
            shared_equal=equal,
        )

    def per_row(self, rows: torch.Tensor) -> torch.Tensor:
        """(K, n) = C @ rows for per-row sums ``rows`` (R, n): cheap parameters (biases, norms)."""
        return self.matrix @ rows.to(torch.float32)


def _rows_first(module_name: str, t: torch.Tensor, dc: DeviceCoefficients) -> None:
    if t.dim() < 1 or t.shape[0] != dc.num_rows:
        raise RuntimeError(
            f"one-pass capture: module {module_name} saw a tensor of shape {tuple(t.shape)} but the row "
            f"coefficients have {dc.num_rows} rows; every captured module must see the batch rows as dim 0 "
            "(a module that flattens rows and tokens, e.g. an MoE expert, is not supported)"
        )


def _outer_by_group(g: torch.Tensor, x: torch.Tensor, dc: DeviceCoefficients) -> torch.Tensor:
    """(K, Dout, Din): sum_r C[k, r] * g_r^T x_r, one matmul per row group (the rows of a group batched).

    The FLOPs of one dense weight gradient plus K x J x Dout x Din. A sole group
    (one objective: per-objective rows) is multiplied straight into that
    objective's slice; the shared groups' products (one per pair that several
    objectives score) are formed at most ``_GROUP_CHUNK_BYTES`` at a time
    (batched when they have equal sizes) and folded into all K slices with one
    (K, chunk) x (chunk, Dout*Din) product.
    """
    r = g.shape[0]
    d_out, d_in = g.shape[-1], x.shape[-1]
    g3, x3 = g.reshape(r, -1, d_out), x.reshape(r, -1, d_in)
    scale = dc.row_scale.to(g.dtype)
    out = torch.zeros(dc.num_objectives, d_out, d_in, dtype=torch.float32, device=g.device)

    def scaled(rows: torch.Tensor | slice) -> torch.Tensor:
        return g3[rows] * scale[rows].view(-1, 1, 1)

    for group in dc.sole:
        # Per-objective rows collated objective by objective are a few contiguous runs with unit
        # scale: read them as views (no gathered or scaled copy of the activations).
        pieces = [slice(a, b) for a, b in group.runs] if group.runs is not None else [group.rows]
        for rows in pieces:
            gr = (g3[rows] if group.unit_scale else scaled(rows)).reshape(-1, d_out)
            xr = x3[rows].reshape(-1, d_in)
            if gr.dtype == torch.float32:
                out[group.objective].addmm_(gr.T, xr, alpha=group.direction)
            else:  # bf16: the product in the compute dtype, accumulated in fp32
                out[group.objective].add_((gr.T @ xr).to(torch.float32), alpha=group.direction)
    if not dc.shared_rows:
        return out
    flat_out = out.view(dc.num_objectives, -1)
    step = max(1, _GROUP_CHUNK_BYTES // max(1, d_out * d_in * g.element_size()))
    if dc.shared_equal is not None:
        j, s = dc.shared_equal.shape
        for lo in range(0, j, step):
            hi = min(j, lo + step)
            rows = dc.shared_equal[lo:hi].flatten()
            gp = scaled(rows).reshape(hi - lo, s * g3.shape[1], d_out)
            xp = x3[rows].reshape(hi - lo, s * x3.shape[1], d_in)
            prod = torch.bmm(gp.transpose(1, 2), xp).reshape(hi - lo, -1).to(torch.float32)
            flat_out.addmm_(dc.shared_directions[:, lo:hi], prod)
        return out
    for j, rows in enumerate(dc.shared_rows):
        gr, xr = scaled(rows).reshape(-1, d_out), x3[rows].reshape(-1, d_in)
        flat_out.addmm_(dc.shared_directions[:, j : j + 1], (gr.T @ xr).reshape(1, -1).to(torch.float32))
    return out


def _row_sums(t: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """Sum every dim except the rows (dim 0) and the trailing ``keep`` dims, in fp32: (R, *trailing)."""
    t = t.to(torch.float32)
    dims = tuple(range(1, t.dim() - keep))
    return t.sum(dim=dims) if dims else t


Rule = Callable[[nn.Module, str, torch.Tensor, torch.Tensor, DeviceCoefficients, frozenset[str]], dict[str, torch.Tensor]]
"""rule(module, name, input, output_grad, coefficients, wanted) -> {param name in wanted: (K, *shape)}."""


def _affine(x: torch.Tensor, g: torch.Tensor, name: str, dc: DeviceCoefficients, wanted: frozenset[str], weight_is_out_in: bool) -> dict[str, torch.Tensor]:
    # nn.Linear stores W as (Dout, Din); transformers' Conv1D (GPT-2) as (Din, Dout).
    if x.dim() < 2 or g.dim() < 2:  # an unbatched vector: its one dim is features, never rows
        raise RuntimeError(
            f"one-pass capture: module {name} was called on an unbatched input of shape {tuple(x.shape)}; every "
            "captured module must see the batch rows as dim 0"
        )
    _rows_first(name, x, dc)
    _rows_first(name, g, dc)
    out: dict[str, torch.Tensor] = {}
    if "weight" in wanted:
        out["weight"] = _outer_by_group(g, x, dc) if weight_is_out_in else _outer_by_group(x, g, dc)
    if "bias" in wanted:
        out["bias"] = dc.per_row(_row_sums(g).reshape(dc.num_rows, -1))
    return out


def _linear(module: nn.Module, name: str, x: torch.Tensor, g: torch.Tensor, dc: DeviceCoefficients, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    return _affine(x, g, name, dc, wanted, weight_is_out_in=True)


def _conv1d(module: nn.Module, name: str, x: torch.Tensor, g: torch.Tensor, dc: DeviceCoefficients, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    return _affine(x, g, name, dc, wanted, weight_is_out_in=False)


def _embedding_rule(scale: float, view: ParameterView) -> Rule:
    """The rule of ``y = E[ids] * scale`` (``scale`` 1.0 for nn.Embedding): dE[id] += scale * g per occurrence."""

    def rule(module: nn.Module, name: str, ids: torch.Tensor, g: torch.Tensor, dc: DeviceCoefficients,
             wanted: frozenset[str]) -> dict[str, torch.Tensor]:  # fmt: skip
        _rows_first(name, ids, dc)
        weight = module.weight
        if "weight" not in wanted:
            return {}
        vocab, dim = view.full_shape(weight)
        k = dc.matrix.shape[0]
        flat_ids = ids.reshape(-1)
        gf = g.reshape(dc.num_rows, -1, dim).to(torch.float32)
        if scale != 1.0:
            gf = gf * scale
        out = torch.zeros(k, vocab, dim, dtype=torch.float32, device=g.device)
        for obj in range(k):
            coef = dc.matrix[obj]
            if not bool((coef != 0).any()):
                continue
            out[obj].index_add_(0, flat_ids, (gf * coef.view(-1, 1, 1)).reshape(-1, dim))
        if module.padding_idx is not None:
            out[:, module.padding_idx] = 0  # nn.Embedding never updates the padding row
        return {"weight": out}

    return rule


def _layer_norm(module: nn.Module, name: str, x: torch.Tensor, g: torch.Tensor, dc: DeviceCoefficients, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    _rows_first(name, x, dc)
    shape = tuple(module.normalized_shape)
    xhat = F.layer_norm(x.to(torch.float32), shape, None, None, module.eps)
    out: dict[str, torch.Tensor] = {}
    keep = len(shape)
    if "weight" in wanted:
        out["weight"] = dc.per_row(_row_sums(g.to(torch.float32) * xhat, keep).reshape(dc.num_rows, -1)).view(-1, *shape)
    if "bias" in wanted:
        out["bias"] = dc.per_row(_row_sums(g, keep).reshape(dc.num_rows, -1)).view(-1, *shape)
    return out


def _torch_rms_norm(module: nn.Module, name: str, x: torch.Tensor, g: torch.Tensor, dc: DeviceCoefficients, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    _rows_first(name, x, dc)
    shape = tuple(module.normalized_shape)
    if "weight" not in wanted:
        return {}
    xhat = F.rms_norm(x.to(torch.float32), shape, None, module.eps)
    rows = _row_sums(g.to(torch.float32) * xhat, len(shape)).reshape(dc.num_rows, -1)
    return {"weight": dc.per_row(rows).view(-1, *shape)}


def _hf_rms_norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(module, attr, None), float):
            return getattr(module, attr)
    raise UnsupportedModuleError(f"{type(module).__name__}: no float eps attribute (variance_epsilon/eps)")


def _hf_rms_norm(module: nn.Module, name: str, x: torch.Tensor, g: torch.Tensor, dc: DeviceCoefficients, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    # Llama: w * xhat; Gemma: (1 + w) * xhat. Either way dL/dw = g * xhat, with
    # xhat recomputed in fp32 from the saved input (never pinned by a hook).
    _rows_first(name, x, dc)
    if "weight" not in wanted:
        return {}
    xf = x.to(torch.float32)
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _hf_rms_norm_eps(module))
    rows = _row_sums(g.to(torch.float32) * xhat.to(x.dtype).to(torch.float32)).reshape(dc.num_rows, -1)
    return {"weight": dc.per_row(rows)}


def _overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def _check_hf_rms_norm(module: nn.Module, name: str, view: ParameterView) -> None:
    """Verify numerically, for this instance, that the module's weight gradient is g * xhat."""
    weight = module.weight
    if view.values_absent(weight) or weight.dim() != 1:
        return  # values not here: the capture's first-step self-check covers it
    dim = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, dim, generator=gen).to(weight.device)
    g = torch.randn(2, 3, dim, generator=gen).to(weight.device)
    w = (torch.rand(dim, generator=gen) + 0.5).to(weight.device).requires_grad_(True)
    with torch.enable_grad():
        y = torch.func.functional_call(module, {"weight": w}, (x,))
        (ref,) = torch.autograd.grad((y.to(torch.float32) * g).sum(), w)
    dc = DeviceCoefficients.build(RowCoefficients.from_matrix(torch.ones(1, 2, dtype=torch.float64)), weight.device)
    got = _hf_rms_norm(module, name, x, g, dc, frozenset({"weight"}))["weight"][0]
    if not torch.allclose(got, ref.to(torch.float32), rtol=1e-4, atol=1e-5):
        raise UnsupportedModuleError(
            f"one-pass capture: module {name} ({type(module).__name__}) looks like an RMSNorm but its weight "
            "gradient is not g * x_hat; register a rule for it with raco_ds.onepass.register_rule"
        )


def _embedding_scale(module: nn.Embedding, name: str, view: ParameterView) -> float:
    """The scalar s of an embedding subclass whose forward is ``E[ids] * s``, measured on this instance.

    The forward runs on a small random table (functional_call), so nothing of the
    real weight is read or gathered; a forward that is not a scaled lookup is refused.
    Where the weight is partitioned (ZeRO-3) the forward cannot run on a
    stand-in table: the module's ``embed_scale`` (1.0 without one) is taken as a
    hypothesis that the capture's first-step self-check then verifies.
    """
    weight = module.weight
    if view.values_absent(weight):
        scale = getattr(module, "embed_scale", 1.0)
        return float(scale.item() if isinstance(scale, torch.Tensor) else scale)
    rows = max(8, (module.padding_idx or 0) + 1)
    if rows > 1 << 16:
        raise UnsupportedModuleError(
            f"one-pass capture: embedding {name} ({type(module).__name__}) overrides forward and has padding_idx "
            f"{module.padding_idx}, too large to probe; register a rule for it or use K-pass capture"
        )
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(rows, weight.shape[1], generator=gen).to(device=weight.device, dtype=weight.dtype)
    ids = torch.arange(rows, device=weight.device).view(1, -1)
    try:
        with torch.no_grad():
            y = torch.func.functional_call(module, {"weight": table}, (ids,))
    except Exception:  # a forward that is not a lookup of its input ids (e.g. positions from a mask)
        y = None
    lookup = F.embedding(ids, table, module.padding_idx)
    if not isinstance(y, torch.Tensor) or y.shape != lookup.shape:
        raise UnsupportedModuleError(
            f"one-pass capture: embedding {name} ({type(module).__name__}) overrides forward and does not return "
            "a lookup of its table; register a rule for it with raco_ds.onepass.register_rule or use K-pass capture"
        )
    yf, lf = y.to(torch.float64), lookup.to(torch.float64)
    scale = float((yf * lf).sum() / (lf * lf).sum())
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    if not torch.allclose(yf, scale * lf, rtol=tolerance, atol=tolerance * abs(scale)):
        raise UnsupportedModuleError(
            f"one-pass capture: embedding {name} ({type(module).__name__}) overrides forward and its output is not "
            "its table lookup times a constant; register a rule for it with raco_ds.onepass.register_rule or use "
            "K-pass capture"
        )
    return scale


@dataclass(frozen=True)
class RuleSpec:
    """A rule and the names of the module's own parameters it computes gradients for."""

    fn: Rule
    covers: frozenset[str]


_RULES: dict[type, RuleSpec] = {}


def register_rule(module_type: type, *, covers: tuple[str, ...] | frozenset[str]) -> Callable[[Rule], Rule]:
    """Register a rule for ``module_type`` (exact type) computing the parameters named in ``covers``.

    The rule returns ``{param_name: (K, *shape)}`` for the names in ``wanted``
    (the module's trainable parameters); a module of this type owning a trainable
    parameter not in ``covers`` is refused at construction.
    """

    def deco(fn: Rule) -> Rule:
        _RULES[module_type] = RuleSpec(fn, frozenset(covers))
        return fn

    return deco


_WEIGHT = frozenset({"weight"})
_WEIGHT_BIAS = frozenset({"weight", "bias"})


def _builtin_rule(module: nn.Module, name: str, view: ParameterView) -> RuleSpec | None:
    """The built-in rule of a standard module, checked on this instance; None when there is none."""
    cls = type(module)
    if isinstance(module, nn.Linear) and not _overrides_forward(module, nn.Linear):
        return RuleSpec(_linear, _WEIGHT_BIAS)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedModuleError(
                f"one-pass capture: embedding {name} uses max_norm/scale_grad_by_freq/sparse, which one-pass "
                "capture does not reproduce; disable them or use K-pass capture"
            )
        # A plain nn.Embedding's forward is the lookup whatever attributes it carries (a scale that
        # the caller applies is already inside the output gradient); a subclass is measured.
        scale = _embedding_scale(module, name, view) if _overrides_forward(module, nn.Embedding) else 1.0
        return RuleSpec(_embedding_rule(scale, view), _WEIGHT)
    if isinstance(module, nn.LayerNorm) and not _overrides_forward(module, nn.LayerNorm):
        return RuleSpec(_layer_norm, _WEIGHT_BIAS)
    if isinstance(module, nn.RMSNorm) and not _overrides_forward(module, nn.RMSNorm):
        return RuleSpec(_torch_rms_norm, _WEIGHT)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return RuleSpec(_conv1d, _WEIGHT_BIAS)
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if cls.__name__.endswith("RMSNorm") and own == ["weight"]:
        _check_hf_rms_norm(module, name, view)
        return RuleSpec(_hf_rms_norm, _WEIGHT)
    return None


def rule_for(module: nn.Module, name: str, view: ParameterView = PLAIN) -> RuleSpec:
    """The rule for ``module``, or raise :class:`UnsupportedModuleError` naming it, the parameters, and the fix.

    ``view`` says how the framework holds the parameters (their full shape, whether the values are here).

    Raises as well when the rule does not cover every trainable parameter the
    module owns (a scale registered on an nn.Linear, weight_norm's g and v).
    """
    cls = type(module)
    spec = _RULES.get(cls) or _builtin_rule(module, name, view)
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if spec is None:
        raise UnsupportedModuleError(
            f"one-pass capture: module {name!r} of type {cls.__module__}.{cls.__name__} owns trainable parameters "
            f"{own} and has no one-pass rule (supported: Linear, Embedding, LayerNorm, RMSNorm and HF *RMSNorm, "
            "transformers Conv1D). Register one with raco_ds.onepass.register_rule, freeze those parameters, "
            "or use K-pass capture"
        )
    uncovered = [n for n in own if n not in spec.covers]
    if uncovered:
        raise UnsupportedModuleError(
            f"one-pass capture: module {name!r} ({cls.__name__}) owns trainable parameter(s) "
            f"{[f'{name}.{n}' if name else n for n in uncovered]} that its one-pass rule (for {sorted(spec.covers)}) "
            "does not compute, e.g. a parametrisation such as weight_norm or a parameter used elsewhere; freeze "
            "them, register a rule covering them with raco_ds.onepass.register_rule, or use K-pass capture"
        )
    return spec
