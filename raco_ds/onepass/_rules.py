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

__all__ = ["DeviceCoefficients", "Rule", "UnsupportedModuleError", "rule_for"]

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
    _rows_first(name, x, dc)
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


def _embedding(module: nn.Module, name: str, ids: torch.Tensor, g: torch.Tensor, dc: DeviceCoefficients, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    _rows_first(name, ids, dc)
    weight = module.weight
    if "weight" not in wanted:
        return {}
    vocab, dim = tuple(getattr(weight, "ds_shape", weight.shape))
    scale = getattr(module, "embed_scale", None)
    if scale is not None:  # Gemma-3 style y = E[ids] * scale: dE = scale * g
        g = g * scale.to(g.dtype) if isinstance(scale, torch.Tensor) else g * scale
    k = dc.matrix.shape[0]
    flat_ids = ids.reshape(-1)
    gf = g.reshape(dc.num_rows, -1, dim).to(torch.float32)
    out = torch.zeros(k, vocab, dim, dtype=torch.float32, device=g.device)
    for obj in range(k):
        coef = dc.matrix[obj]
        if not bool((coef != 0).any()):
            continue
        out[obj].index_add_(0, flat_ids, (gf * coef.view(-1, 1, 1)).reshape(-1, dim))
    if module.padding_idx is not None:
        out[:, module.padding_idx] = 0  # nn.Embedding never updates the padding row
    return {"weight": out}


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


def _check_hf_rms_norm(module: nn.Module, name: str) -> None:
    """Verify numerically, once per type, that the module's weight gradient is g * xhat."""
    weight = module.weight
    if hasattr(weight, "ds_id") or weight.dim() != 1 or weight.device.type == "meta":
        return  # partitioned under ZeRO-3: trust the type (the single-process tests cover it)
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


_RULES: dict[type, Rule] = {}
_checked_types: set[type] = set()


def register_rule(module_type: type) -> Callable[[Rule], Rule]:
    """Register a rule for ``module_type`` (exact type); the rule returns {param_name: (K, *shape)}."""

    def deco(fn: Rule) -> Rule:
        _RULES[module_type] = fn
        return fn

    return deco


def rule_for(module: nn.Module, name: str) -> Rule:
    """The rule for ``module``, or raise :class:`UnsupportedModuleError` naming it and the fix."""
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    if isinstance(module, nn.Linear) and not _overrides_forward(module, nn.Linear):
        return _linear
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedModuleError(
                f"one-pass capture: embedding {name} uses max_norm/scale_grad_by_freq/sparse, which one-pass "
                "capture does not reproduce; disable them or use K-pass capture"
            )
        if not _overrides_forward(module, nn.Embedding) or hasattr(module, "embed_scale"):
            return _embedding
    if isinstance(module, nn.LayerNorm) and not _overrides_forward(module, nn.LayerNorm):
        return _layer_norm
    if isinstance(module, nn.RMSNorm) and not _overrides_forward(module, nn.RMSNorm):
        return _torch_rms_norm
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return _conv1d
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if cls.__name__.endswith("RMSNorm") and own == ["weight"]:
        if cls not in _checked_types:
            _check_hf_rms_norm(module, name)
            _checked_types.add(cls)
        return _hf_rms_norm
    raise UnsupportedModuleError(
        f"one-pass capture: module {name!r} of type {cls.__module__}.{cls.__name__} owns trainable parameters "
        f"{own} and has no one-pass rule (supported: Linear, Embedding, LayerNorm, RMSNorm and HF *RMSNorm, "
        "transformers Conv1D). Register one with raco_ds.onepass.register_rule, freeze those parameters, "
        "or use K-pass capture"
    )
