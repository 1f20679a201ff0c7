"""Adversarial traps for one-pass capture (issue 14): never silently wrong.

Every trap is a tiny hand-made model. Each must end in one of three ways:

- ``refused``: :class:`UnsupportedModuleError` at construction, naming the parameter;
- ``caught``: construction succeeds, the one-pass gradients really differ from K
  separate backwards, and :meth:`OnePassCapture.self_check` fails naming the parameter
  (``raise_if_failed`` raises :class:`OnePassMismatchError` naming it too);
- ``exact``: nothing is refused, the one-pass gradients equal K separate backwards for
  both data shapes (shared pairs, per-objective rows) and the self-check passes;

or, for a few, ``stopped``: the capture pass itself raises a one-pass error naming the
module (rows that are not rows when their count differs from the batch's).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raco_ds.losses import losses_from_margins, margin_jacobian
from raco_ds.models import enable_activation_checkpointing
from raco_ds.onepass import (
    OnePassCapture,
    OnePassMismatchError,
    UnsupportedModuleError,
    objective_row_coefficients,
    shared_pair_coefficients,
)

V, D, T = 23, 8, 6  # vocab, width, tokens; R = 4 rows by default (no size equals another by accident)
K = 2
BETA = 0.5
TOL = 1e-5


# -- the harness ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only contend on a small shared CPU (restored after each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def capture(model: nn.Module, *, verify: bool = False) -> OnePassCapture:
    """A capture; its automatic first-pass check off unless ``verify`` (the tests call check() themselves)."""
    return OnePassCapture(model, K, verify=verify)



def ids_batch(rows: int = 4, seq: int = T, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (rows, seq), generator=gen)


def row_scores(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(R,) summed next-token log-probs per row; the RNG is reseeded so dropout repeats in every pass."""
    torch.manual_seed(1234)
    logits = model(ids)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)


def _labels(pairs: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    lab = torch.randint(-1, 2, (K, pairs), generator=gen)
    lab[:, 0] = torch.tensor([1, -1])
    return lab


def _owner(rows: int) -> torch.Tensor:
    return torch.arange(rows) % K


def _losses(scores: torch.Tensor, shape: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K losses, seed, (K, R) coefficients) of the two data shapes."""
    rows = scores.shape[0]
    if shape == "shared":
        pairs = rows // 2
        m = scores[:pairs] - scores[pairs:]
        lab = _labels(pairs)
        return losses_from_margins(m, lab, beta=BETA), m.sum(), shared_pair_coefficients(margin_jacobian(m, lab, beta=BETA))
    owner = _owner(rows)
    member = (owner.unsqueeze(0) == torch.arange(K).unsqueeze(1)).to(scores.dtype)
    losses = -(member * scores).sum(-1) / member.sum(-1).clamp_min(1)
    return losses, losses.sum(), objective_row_coefficients(owner, K)


def k_backwards(model: nn.Module, ids: torch.Tensor, shape: str) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses, _, _ = _losses(row_scores(model, ids), shape)
    out: dict[str, list[torch.Tensor]] = {n: [] for n, _ in params}
    for k in range(K):
        grads = torch.autograd.grad(losses[k], [p for _, p in params], retain_graph=True, allow_unused=True)
        for (n, p), g in zip(params, grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def one_pass(cap: OnePassCapture, model: nn.Module, ids: torch.Tensor, shape: str) -> dict[str, torch.Tensor]:
    cap.zero()
    with cap.record():
        _, seed, coeffs = _losses(row_scores(model, ids), shape)
        cap.backward(seed, coeffs)
    return cap.gradients()


def errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter: the largest relative error over objectives (floored at 1e-6 of the total gradient)."""
    assert got.keys() == ref.keys()
    total = math.sqrt(sum(float(r.double().pow(2).sum()) for r in ref.values()))
    out = {}
    for n in ref:
        worst = 0.0
        for k in range(K):
            r, g = ref[n][k].double(), got[n][k].double()
            worst = max(worst, float((g - r).norm()) / max(float(r.norm()), 1e-6 * total, 1e-30))
        out[n] = worst
    return out


def check(cap: OnePassCapture, model: nn.Module, ids: torch.Tensor):
    return cap.self_check(lambda: row_scores(model, ids))


def assert_refused(model: nn.Module, *names: str) -> None:
    """Construction refuses, naming every parameter in ``names``."""
    with pytest.raises(UnsupportedModuleError) as info:
        capture(model)
    for name in names:
        assert name in str(info.value), f"{name!r} not named in: {info.value}"


def assert_caught(model: nn.Module, ids: torch.Tensor, *names: str, shape: str = "shared") -> None:
    """Construction accepts, the gradients of ``names`` are wrong, and the self-check names each of them
    (and, where the capture checks its first pass by itself, that first pass raises naming them)."""
    cap = capture(model)
    err = errors(one_pass(cap, model, ids, shape), k_backwards(model, ids, shape))
    wrong = {n for n, e in err.items() if e > 1e-3}
    assert wrong, "the trap did not make the one-pass gradients wrong (a useless trap)"
    result = check(cap, model, ids)
    assert not result.passed, f"SILENTLY WRONG: self-check passed ({result.describe()}) but errors are {err}"
    flagged = {n for n, _ in result.mismatches}
    assert wrong <= flagged, f"wrong {sorted(wrong)} but the self-check flagged only {sorted(flagged)}"
    for name in names:
        assert name in flagged, f"{name} not flagged: {result.describe()}"
        assert name in result.describe(limit=50)
    with pytest.raises(OnePassMismatchError, match=names[0].replace(".", r"\.") if names else ""):
        result.raise_if_failed()
    with pytest.raises(OnePassMismatchError, match=names[0].replace(".", r"\.") if names else ""):
        one_pass(capture(model, verify=True), model, ids, shape)  # the automatic first-pass check stops it


def assert_exact(model: nn.Module, ids: torch.Tensor, shapes: tuple[str, ...] = ("shared", "rows")) -> None:
    """Nothing refused, one pass equals K backwards for every shape, and the self-check passes (also the
    automatic first-pass check)."""
    cap = capture(model, verify=True)
    for shape in shapes:
        err = errors(one_pass(cap, model, ids, shape), k_backwards(model, ids, shape))
        assert max(err.values()) <= TOL, f"{shape}: {sorted(err.items(), key=lambda kv: -kv[1])[:3]}"
    result = check(cap, model, ids)
    assert result.passed, f"FALSE ALARM on an exact model: {result.describe()}"


def assert_stopped(model: nn.Module, ids: torch.Tensor, match: str) -> None:
    """The capture pass raises a one-pass error (a clear stop before any step) matching ``match``."""
    cap = capture(model)
    with pytest.raises(RuntimeError, match=match) as info:
        one_pass(cap, model, ids, "shared")
    assert "one-pass capture" in str(info.value)


def outcome(model: nn.Module, ids: torch.Tensor, shape: str = "shared") -> str:
    """refused / stopped / caught / exact -- or SILENTLY WRONG / FALSE ALARM."""
    try:
        cap = capture(model)
    except UnsupportedModuleError:
        return "refused"
    try:
        err = max(errors(one_pass(cap, model, ids, shape), k_backwards(model, ids, shape)).values())
    except RuntimeError as exc:
        if "one-pass capture" in str(exc):
            return "stopped"
        raise
    passed = check(cap, model, ids).passed
    if err <= TOL:
        return "exact" if passed else "FALSE ALARM"
    return "SILENTLY WRONG" if passed else "caught"


# -- the base model ------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear (+ token mixing within each row) -> Linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)
        self.head = nn.Linear(D, V)
        with torch.no_grad():
            self.norm.weight.add_(0.2 * torch.randn(D))
            self.norm.bias.add_(0.2 * torch.randn(D))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)

    def block(self, h: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        mixed = h + h.cumsum(1) / steps  # causal mixing of tokens, within each row only
        return h + self.fc2(torch.tanh(self.fc1(self.norm(mixed))))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.block(self.embed(ids)))


def test_base_model_is_exact() -> None:
    assert_exact(TinyLM(), ids_batch())


# -- 1. a weight used outside its module's hooked call -------------------------------------------


class TiedByFLinear(TinyLM):
    """Output layer tied to the embedding through F.linear(h, embedding.weight) (no lm_head module)."""

    def __init__(self) -> None:
        super().__init__()
        del self.head

    def logits(self, h):
        return F.linear(h, self.emb.weight)


def test_tying_through_f_linear_is_caught() -> None:
    assert_caught(TiedByFLinear(), ids_batch(), "emb.weight")


class TiedByMatmul(TiedByFLinear):
    def logits(self, h):
        return h @ self.emb.weight.T


def test_tying_through_matmul_is_caught() -> None:
    assert_caught(TiedByMatmul(), ids_batch(), "emb.weight")


class TiedByModule(TinyLM):
    """Tying done right: the head is an nn.Linear that shares the embedding's parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight


def test_tying_through_a_shared_module_parameter_is_exact() -> None:
    assert_exact(TiedByModule(), ids_batch())


class SlicedLinear(TinyLM):
    """Bloom's pretraining_tp > 1 with slow_but_exact: F.linear on column slices of fc2's weight."""

    def block(self, h):
        x = torch.tanh(self.fc1(self.norm(h)))
        half = D // 2
        out = F.linear(x[..., :half], self.fc2.weight[:, :half]) + F.linear(x[..., half:], self.fc2.weight[:, half:])
        return h + out + self.fc2.bias


def test_weight_slices_are_caught() -> None:
    assert_caught(SlicedLinear(), ids_batch(), "fc2.weight", "fc2.bias")


def test_bloom_slow_but_exact_is_caught() -> None:
    """The real transformers Bloom with pretraining_tp=2 and slow_but_exact=True."""
    import onepass_zoo

    model = onepass_zoo.build("bloom")
    model.config.pretraining_tp = 2
    model.config.slow_but_exact = True
    for block in model.transformer.h:
        for attr in ("self_attention", "mlp"):
            part = getattr(block, attr)
            part.pretraining_tp, part.slow_but_exact = 2, True
    data = onepass_zoo.batch(onepass_zoo.VOCAB)
    cap = onepass_zoo.make_capture(model)
    got = onepass_zoo.onepass_grads(cap, model, data, onepass_zoo.labels())
    err, where = onepass_zoo.max_rel_err(got, onepass_zoo.reference_grads(model, data, onepass_zoo.labels()))
    assert err > 1e-3, "slow_but_exact no longer bypasses the dense modules: update this trap"
    result = cap.self_check(lambda: onepass_zoo.row_logps(model, data))
    assert not result.passed
    flagged = {n for n, _ in result.mismatches}
    assert any(n.endswith("dense.weight") or n.endswith("dense_4h_to_h.weight") for n in flagged), flagged


class DirectForward(TinyLM):
    """``module.forward(x)`` bypasses nn.Module.__call__ and therefore every hook."""

    def block(self, h):
        return h + self.fc2(torch.tanh(self.fc1.forward(self.norm(h))))


def test_direct_forward_call_is_caught() -> None:
    assert_caught(DirectForward(), ids_batch(), "fc1.weight", "fc1.bias")


class TransposedUse(TinyLM):
    """fc1's weight used a second time, transposed, outside its module (a tied decoder)."""

    def block(self, h):
        x = torch.tanh(self.fc1(self.norm(h)))
        return h + F.linear(x, self.fc1.weight.T)


def test_transposed_second_use_is_caught() -> None:
    assert_caught(TransposedUse(), ids_batch(), "fc1.weight")


class MaskedWeight(TinyLM):
    """A pruning mask applied to fc1's weight with masked_fill, then F.linear: the module never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.rand(D, D, generator=torch.Generator().manual_seed(2)) < 0.3)

    def block(self, h):
        w = self.fc1.weight.masked_fill(self.mask, 0.0)
        return h + self.fc2(torch.tanh(F.linear(self.norm(h), w, self.fc1.bias)))


def test_masked_fill_on_a_weight_is_caught() -> None:
    assert_caught(MaskedWeight(), ids_batch(), "fc1.weight", "fc1.bias")


class WeightAddedToActivations(TinyLM):
    """The module runs normally, and its bias is also added to the activations directly."""

    def block(self, h):
        return super().block(h) + self.fc1.bias


def test_extra_use_next_to_the_hooked_call_is_caught() -> None:
    assert_caught(WeightAddedToActivations(), ids_batch(), "fc1.bias")


class EmbeddingByFunctional(TinyLM):
    def embed(self, ids):
        return F.embedding(ids, self.emb.weight)


def test_functional_embedding_lookup_is_caught() -> None:
    assert_caught(EmbeddingByFunctional(), ids_batch(), "emb.weight")


class HookBeforeCapture(TinyLM):
    """A user forward hook that rescales fc1's output, registered BEFORE the capture's own hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1.register_forward_hook(lambda mod, args, out: out * 1.5)


def test_output_rescaling_hook_registered_before_the_capture_is_caught() -> None:
    assert_caught(HookBeforeCapture(), ids_batch(), "fc1.weight", "fc1.bias")


def test_output_hook_registered_after_the_capture_is_exact() -> None:
    model = TinyLM()
    cap = capture(model, verify=True)
    model.fc1.register_forward_hook(lambda mod, args, out: out * 1.5)
    ids = ids_batch()
    for shape in ("shared", "rows"):
        assert max(errors(one_pass(cap, model, ids, shape), k_backwards(model, ids, shape)).values()) <= TOL
    assert check(cap, model, ids).passed


def test_input_rescaling_pre_hook_is_exact() -> None:
    """A forward pre-hook changes the module's input; the capture sees the changed input."""
    model = TinyLM()
    model.fc1.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0 + 0.1,))
    assert_exact(model, ids_batch())


# -- 2. parameters that no rule covers -----------------------------------------------------------


def test_old_weight_norm_is_refused() -> None:
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fc1 = torch.nn.utils.weight_norm(model.fc1)
    assert_refused(model, "fc1.weight_g", "fc1.weight_v")


def test_parametrized_weight_norm_is_refused() -> None:
    model = TinyLM()
    model.fc1 = torch.nn.utils.parametrizations.weight_norm(model.fc1)
    assert_refused(model, "fc1.parametrizations.weight")


def test_other_parametrization_is_refused() -> None:
    model = TinyLM()
    model.fc1 = torch.nn.utils.parametrizations.orthogonal(model.fc1)
    assert_refused(model, "fc1.parametrizations.weight")


class LogitScaleOnLinear(TinyLM):
    """A logit scale registered on the head nn.Linear, applied by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.head.logit_scale = nn.Parameter(torch.tensor(1.7))

    def logits(self, h):
        return self.head(h) * self.head.logit_scale


def test_extra_parameter_on_a_linear_is_refused() -> None:
    assert_refused(LogitScaleOnLinear(), "head.logit_scale")


class AlphaEmbedding(nn.Embedding):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = nn.Parameter(torch.tensor(1.3))

    def forward(self, ids):
        return super().forward(ids) * self.alpha


def test_embedding_subclass_with_an_extra_parameter_is_refused() -> None:
    model = TinyLM()
    model.emb = AlphaEmbedding(V, D)
    assert_refused(model, "emb.alpha")


class BiasedLinear(nn.Linear):
    """An nn.Linear subclass keeping Linear's forward, with an extra (unused by forward) parameter."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(()))


class UsesGain(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = BiasedLinear(D, D)

    def block(self, h):
        return super().block(h) * self.fc1.gain


def test_linear_subclass_with_an_extra_parameter_is_refused() -> None:
    assert_refused(UsesGain(), "fc1.gain")


def test_frozen_extra_parameter_is_accepted_and_exact() -> None:
    """The remedy the refusal suggests (freeze it) gives exact gradients for the rest."""
    model = UsesGain()
    model.fc1.gain.requires_grad_(False)
    assert_exact(model, ids_batch())


class LinearWithOwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_linear_subclass_overriding_forward_is_refused() -> None:
    model = TinyLM()
    model.fc1 = LinearWithOwnForward(D, D)
    assert_refused(model, "fc1")


class CenteredLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 0.5


def test_layer_norm_subclass_overriding_forward_is_refused() -> None:
    model = TinyLM()
    model.norm = CenteredLayerNorm(D)
    assert_refused(model, "norm")


def test_batch_norm_is_refused() -> None:
    """BatchNorm mixes rows (and has no rule): refused by name."""

    class WithBatchNorm(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(D)

        def block(self, h):
            return super().block(self.bn(h.transpose(1, 2)).transpose(1, 2))

    assert_refused(WithBatchNorm(), "bn")


@pytest.mark.parametrize("option", ["max_norm", "scale_grad_by_freq", "sparse"])
def test_embedding_options_the_rule_does_not_reproduce_are_refused(option: str) -> None:
    model = TinyLM()
    kwargs = {"max_norm": 1.0} if option == "max_norm" else {option: True}
    model.emb = nn.Embedding(V, D, **kwargs)
    assert_refused(model, "emb")


def test_unfrozen_after_construction_is_not_silent() -> None:
    """A parameter frozen when the capture was built and unfrozen afterwards: either the capture refuses
    to run, or it computes that parameter's gradients correctly; it must never drop them silently."""
    model = TinyLM()
    model.fc1.weight.requires_grad_(False)
    cap = capture(model, verify=True)
    model.fc1.weight.requires_grad_(True)
    ids = ids_batch()
    with pytest.raises(RuntimeError, match=r"\['fc1.weight'\] were frozen or unfrozen after the capture was built"):
        one_pass(cap, model, ids, "shared")


# -- 3. attributes are not trusted; embeddings and norms measured per instance --------------------


class CallerScaledEmbedding(TinyLM):
    """A plain nn.Embedding carrying an ``embed_scale`` attribute that the CALLER applies."""

    def __init__(self) -> None:
        super().__init__()
        self.emb.embed_scale = 3.0

    def embed(self, ids):
        return self.emb(ids) * self.emb.embed_scale


def test_embed_scale_attribute_applied_by_the_caller_is_exact() -> None:
    assert_exact(CallerScaledEmbedding(), ids_batch())


class IgnoredScaleAttribute(TinyLM):
    """A plain nn.Embedding with an ``embed_scale`` attribute that nobody applies."""

    def __init__(self) -> None:
        super().__init__()
        self.emb.embed_scale = 5.0


def test_embed_scale_attribute_nobody_applies_is_exact() -> None:
    assert_exact(IgnoredScaleAttribute(), ids_batch())


def test_gemma3_scaled_embedding_is_exact() -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    model = TinyLM()
    model.emb = Gemma3TextScaledWordEmbedding(V, D, padding_idx=0, embed_scale=D**0.5)
    assert_exact(model, ids_batch())


class LyingScaleEmbedding(nn.Embedding):
    """Says ``embed_scale = 2`` but multiplies by 3."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale = 2.0

    def forward(self, ids):
        return super().forward(ids) * 3.0


def test_embedding_subclass_with_a_lying_scale_attribute_is_exact() -> None:
    model = TinyLM()
    model.emb = LyingScaleEmbedding(V, D)
    assert_exact(model, ids_batch())


class LengthScaledEmbedding(nn.Embedding):
    """A scale that depends on the input's length: a probe on a few ids measures the wrong constant."""

    def forward(self, ids):
        return super().forward(ids) * ids.shape[-1] ** 0.5


def test_embedding_scale_that_depends_on_the_input_is_not_silent() -> None:
    model = TinyLM()
    model.emb = LengthScaledEmbedding(V, D)
    assert outcome(model, ids_batch()) in ("refused", "caught")


class MutableScaleEmbedding(nn.Embedding):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.multiplier = 1.0

    def forward(self, ids):
        return super().forward(ids) * self.multiplier


def test_embedding_scale_changed_after_construction_is_caught() -> None:
    model = TinyLM()
    model.emb = MutableScaleEmbedding(V, D)
    cap = capture(model)  # measured: 1.0
    model.emb.multiplier = 4.0
    ids = ids_batch()
    err = errors(one_pass(cap, model, ids, "shared"), k_backwards(model, ids, "shared"))
    assert err["emb.weight"] > 1e-3
    assert "emb.weight" in {n for n, _ in check(cap, model, ids).mismatches}


class ModalRMSNorm(nn.Module):
    """An HF-style ``*RMSNorm`` class whose instances compute differently (by a constructor flag)."""

    def __init__(self, dim: int, mode: str = "llama") -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(dim))
        self.variance_epsilon = 1e-6
        self.mode = mode

    def forward(self, x):
        xf = x.float()
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.mode == "llama":
            return self.weight * xhat
        if self.mode == "gemma":
            return (1.0 + self.weight) * xhat
        if self.mode == "unnormalised":
            return self.weight * xf
        if self.mode == "squared":
            return self.weight.pow(2) * xhat
        if self.mode == "long_sequences_differ":  # the construction probe uses 3 tokens
            return self.weight * (xhat if x.shape[-2] <= 3 else xf)
        raise ValueError(self.mode)


class TwoNorms(TinyLM):
    def __init__(self, mode_a: str, mode_b: str) -> None:
        super().__init__()
        self.norm_a = ModalRMSNorm(D, mode_a)
        self.norm_b = ModalRMSNorm(D, mode_b)

    def block(self, h):
        return h + self.fc2(torch.tanh(self.fc1(self.norm_b(self.norm_a(h)))))


@pytest.mark.parametrize("mode", ["unnormalised", "squared"])
def test_second_rms_norm_instance_that_computes_differently_is_refused(mode: str) -> None:
    with pytest.raises(UnsupportedModuleError, match="norm_b") as info:
        capture(TwoNorms("llama", mode))
    assert "norm_a" not in str(info.value)


def test_rms_norm_instances_of_both_exact_formulas_are_exact() -> None:
    assert_exact(TwoNorms("llama", "gemma"), ids_batch())


def test_rms_norm_switched_after_construction_is_caught() -> None:
    model = TwoNorms("llama", "llama")
    cap = capture(model)
    model.norm_b.mode = "unnormalised"
    ids = ids_batch()
    assert errors(one_pass(cap, model, ids, "shared"), k_backwards(model, ids, "shared"))["norm_b.weight"] > 1e-3
    result = check(cap, model, ids)
    assert [n for n, _ in result.mismatches] == ["norm_b.weight"], result.describe()


def test_rms_norm_that_differs_only_on_long_inputs_is_not_silent() -> None:
    assert outcome(TwoNorms("llama", "long_sequences_differ"), ids_batch()) in ("refused", "caught")


class LayerNormNamedRMSNorm(ModalRMSNorm):
    def forward(self, x):
        return self.weight * F.layer_norm(x, (x.shape[-1],), eps=self.variance_epsilon)


def test_a_layer_norm_named_rms_norm_is_refused() -> None:
    model = TinyLM()
    model.norm = LayerNormNamedRMSNorm(D)
    assert_refused(model, "norm")


# -- 4. rows recognised by shape -----------------------------------------------------------------


class PositionTable(TinyLM):
    """Learned positions looked up with positions of shape ``layout`` and broadcast over the rows."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.pos = nn.Embedding(16, D)
        self.layout = layout

    def embed(self, ids):
        positions = torch.arange(ids.shape[1])
        if self.layout == "(1, T)":
            positions = positions.unsqueeze(0)
        return self.emb(ids) + self.pos(positions)


def test_position_table_with_as_many_positions_as_rows_is_caught() -> None:
    """A (T,) position lookup with T == R: its output (T, d) looks rows-first but is not."""
    assert_caught(PositionTable("(T,)"), ids_batch(rows=4, seq=4), "pos.weight")


def test_position_table_with_other_length_is_stopped() -> None:
    assert_stopped(PositionTable("(T,)"), ids_batch(rows=4, seq=6), r"module pos saw a tensor of shape \(6,\)")


@pytest.mark.parametrize("rows, seq", [(4, 6), (4, 4), (2, 2)])
def test_row_broadcast_position_table_is_exact(rows: int, seq: int) -> None:
    """GPT-2's layout (1, T), expanded to the rows, is exact even when R == T."""
    assert_exact(PositionTable("(1, T)"), ids_batch(rows=rows, seq=seq))


def test_single_row_batch_is_exact() -> None:
    """R = 1 (only per-objective rows can have one row): a (1, T) position table is not a broadcast."""
    assert_exact(PositionTable("(1, T)"), ids_batch(rows=1), shapes=("rows",))


class SeqFirst(TinyLM):
    """fc1 applied in a (T, R, d) layout (seq-first, like old fairseq/Megatron code)."""

    def block(self, h):
        x = self.fc1(self.norm(h).transpose(0, 1)).transpose(0, 1)
        return h + self.fc2(torch.tanh(x))


def test_seq_first_layout_with_as_many_tokens_as_rows_is_caught() -> None:
    assert_caught(SeqFirst(), ids_batch(rows=4, seq=4), "fc1.weight", "fc1.bias")


def test_seq_first_layout_with_other_length_is_stopped() -> None:
    assert_stopped(SeqFirst(), ids_batch(rows=4, seq=6), "module fc1 saw a tensor of shape")


class SeqFirstEmbedding(TinyLM):
    def embed(self, ids):
        return self.emb(ids.T).transpose(0, 1)


def test_seq_first_embedding_lookup_with_as_many_tokens_as_rows_is_caught() -> None:
    assert_caught(SeqFirstEmbedding(), ids_batch(rows=4, seq=4), "emb.weight")


class UnbatchedBias(TinyLM):
    """A Linear on a constant whose output is added to every row (a learned global bias)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.gate = nn.Linear(4, D)
        self.register_buffer("const", torch.linspace(-1, 1, 4).view(shape))

    def block(self, h):
        return super().block(h) + self.gate(self.const)


def _never_silent(model: nn.Module, ids: torch.Tensor) -> str:
    """The outcome, where an error raised by the capture pass counts as stopped."""
    try:
        return outcome(model, ids)
    except RuntimeError as exc:
        return f"stopped ({exc})"


@pytest.mark.parametrize("rows", [4, 6])
def test_linear_on_an_unbatched_vector_is_stopped(rows: int) -> None:
    """A (4,) input: its only dim equals R = 4 by coincidence, or not (R = 6); never taken as rows."""
    assert_stopped(UnbatchedBias((4,)), ids_batch(rows=rows), "module gate was called on an unbatched input")


@pytest.mark.parametrize("rows, seq", [(4, 6), (4, 4)])
def test_misaligned_row_broadcast_is_refused_clearly(rows: int, seq: int) -> None:
    """A (1, d) output broadcasts against (R, T, d) as (1, 1, d): its leading 1 is not a row dimension to
    expand (with T == R an expansion would even run, wrongly), so the rule refuses it by name."""
    model, ids = UnbatchedBias((1, 4)), ids_batch(rows=rows, seq=seq)
    with pytest.raises(RuntimeError, match="but the row coefficients have 4 rows"):
        one_pass(capture(model), model, ids, "shared")


@pytest.mark.parametrize("rows, seq", [(4, 6), (4, 4)])
def test_linear_on_a_row_broadcast_constant_is_exact(rows: int, seq: int) -> None:
    assert_exact(UnbatchedBias((1, 1, 4)), ids_batch(rows=rows, seq=seq))


class RowsPermuted(TinyLM):
    """Rows sorted (e.g. by length) before a block and restored after: the module sees rows out of order."""

    def block(self, h):
        perm = torch.tensor([2, 0, 3, 1])
        return super().block(h[perm])[torch.argsort(perm)]


def test_rows_permuted_inside_the_model_are_caught() -> None:
    assert_caught(RowsPermuted(), ids_batch(rows=4), "fc1.weight", "fc2.weight", "norm.weight")


class RowsMixed(TinyLM):
    """A batch statistic (mean over rows) subtracted from the activations: rows are not independent."""

    def block(self, h):
        return super().block(h - 0.5 * h.mean(0, keepdim=True))


def test_rows_mixed_by_a_batch_statistic_are_caught() -> None:
    assert_caught(RowsMixed(), ids_batch(rows=4), "emb.weight")


class FlattenedRows(TinyLM):
    """fc1 on (R*T, d): rows and tokens flattened, like an MoE expert."""

    def block(self, h):
        x = self.fc1(self.norm(h).reshape(-1, D)).reshape(h.shape)
        return h + self.fc2(torch.tanh(x))


def test_flattened_rows_are_stopped() -> None:
    assert_stopped(FlattenedRows(), ids_batch(rows=4), "module fc1 saw a tensor of shape")


class RowsByConcatenatedTokens(TinyLM):
    """A Linear over the concatenation of each row's tokens: (R, T*d), rows first."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(T * D, D)

    def block(self, h):
        return super().block(h) + self.mix(h.reshape(h.shape[0], -1)).unsqueeze(1)


def test_linear_over_concatenated_tokens_is_exact() -> None:
    assert_exact(RowsByConcatenatedTokens(), ids_batch())


# -- 5. things that are exact and must not be refused or flagged ----------------------------------


class CalledTwice(TinyLM):
    def block(self, h):
        return h + self.fc2(torch.tanh(self.fc1(torch.tanh(self.fc1(self.norm(h))))))


def test_module_called_twice_is_exact() -> None:
    assert_exact(CalledTwice(), ids_batch())


class SharedBetweenLinears(TinyLM):
    """fc2 shares fc1's weight (same orientation) but has its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2.weight = self.fc1.weight


def test_weight_shared_between_two_linears_is_exact() -> None:
    assert_exact(SharedBetweenLinears(), ids_batch())


class BufferOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.linspace(0.1, 1.0, D))

    def forward(self, x):
        return x * torch.cos(self.freq)


class WithBufferModule(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.rot = BufferOnly()

    def block(self, h):
        return super().block(self.rot(h))


def test_buffer_only_module_is_exact() -> None:
    assert_exact(WithBufferModule(), ids_batch())


class NoGradUse(TinyLM):
    """fc1 also runs under torch.no_grad (a detached gate); head used only under no_grad for a constant."""

    def block(self, h):
        with torch.no_grad():
            gate = torch.sigmoid(self.fc1(h)).mean()
        return super().block(h) * gate


def test_weight_used_under_no_grad_is_exact() -> None:
    assert_exact(NoGradUse(), ids_batch())


class OnlyUnderNoGrad(TinyLM):
    def block(self, h):
        with torch.no_grad():
            bias = self.fc2(h).mean()
        return h + torch.tanh(self.fc1(self.norm(h))) + bias


def test_module_used_only_under_no_grad_is_exact() -> None:
    """fc2 gets zero gradients from both sides."""
    assert_exact(OnlyUnderNoGrad(), ids_batch())


class Unused(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(D, D)


def test_unused_module_is_exact() -> None:
    assert_exact(Unused(), ids_batch())


def test_frozen_weight_trainable_bias_is_exact() -> None:
    model = TinyLM()
    model.fc1.weight.requires_grad_(False)
    model.emb.weight.requires_grad_(False)
    assert_exact(model, ids_batch())


def test_padding_idx_is_exact() -> None:
    model = TinyLM()
    model.emb = nn.Embedding(V, D, padding_idx=1)
    ids = ids_batch()
    ids[:, -2:] = 1
    assert_exact(model, ids)


class WithDropout(TinyLM):
    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)

    def block(self, h):
        return super().block(self.drop(h))

    def logits(self, h):
        return self.head(self.drop(h))


def test_dropout_is_exact_and_the_self_check_replays_it() -> None:
    model = WithDropout().train()
    assert_exact(model, ids_batch())
    # The check itself reseeds nothing: with a forward that draws fresh randomness each call, it must
    # still pass because it replays the RNG state between its two passes.
    cap = capture(model)
    ids = ids_batch()

    def fresh():
        logits = model(ids)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)

    state = torch.get_rng_state()
    assert cap.self_check(fresh).passed
    assert torch.equal(torch.get_rng_state(), state), "the self-check changed the caller's RNG state"


def test_hf_model_with_dropout_passes_the_self_check() -> None:
    """A transformers Llama with attention dropout 0.3 and activation checkpointing."""
    import onepass_zoo

    model = onepass_zoo.build("llama")
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    enable_activation_checkpointing(model)
    data = onepass_zoo.batch(onepass_zoo.VOCAB)
    cap = onepass_zoo.make_capture(model)
    result = cap.self_check(lambda: onepass_zoo.row_logps(model, data))
    assert result.passed, result.describe()


class KeywordCall(TinyLM):
    def block(self, h):
        return h + self.fc2(torch.tanh(self.fc1(input=self.norm(h))))


def test_module_called_with_a_keyword_input_is_stopped() -> None:
    """The forward hook sees no positional input: a clear error, not a silent zero."""
    cap = capture(KeywordCall())
    with pytest.raises(RuntimeError, match="fc1 was called without a positional tensor input"):
        one_pass(cap, cap.model, ids_batch(), "shared")


class InplaceOnOutput(TinyLM):
    """CTRL-style: the embedding output is scaled in place (``x *= sqrt(d)``)."""

    def embed(self, ids):
        h = self.emb(ids)
        h *= D**0.5
        return h


def test_in_place_op_on_a_module_output_is_exact() -> None:
    assert_exact(InplaceOnOutput(), ids_batch())


def test_in_place_op_on_a_module_output_is_never_silent() -> None:
    try:
        result = outcome(InplaceOnOutput(), ids_batch())
    except RuntimeError as exc:
        assert "view" in str(exc) and "inplace" in str(exc)
        return
    assert result in ("exact", "refused", "caught", "stopped")


@pytest.mark.parametrize("trap", [TiedByFLinear, DirectForward, SlicedLinear, RowsPermuted])
def test_traps_under_activation_checkpointing_are_caught(trap: type) -> None:
    """The same traps with the block under non-reentrant activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(trap):  # type: ignore[misc, valid-type]
        def block(self, h):
            return checkpoint(super().block, h, use_reentrant=False)

    assert outcome(Checkpointed(), ids_batch()) == "caught"


def test_checkpointed_base_model_is_exact() -> None:
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(TinyLM):
        def block(self, h):
            return checkpoint(super().block, h, use_reentrant=False)

    assert_exact(Checkpointed(), ids_batch())
