"""Per-objective preference losses: hand-computed values, gradients, ties, metrics, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raco_ds.losses import (
    LOSSES,
    PreferenceLosses,
    get_loss,
    losses_from_margins,
    margin_jacobian,
    pair_margins,
    preference_losses,
    register_loss,
)

# A hand example: 3 pairs, 3 objectives (the last one has no pair).
POLICY_A = [-3.0, -5.0, -2.0]
POLICY_B = [-4.0, -4.0, -6.0]
REF_A = [-3.5, -5.0, -1.0]
REF_B = [-4.0, -3.0, -7.0]
# m = (pa - ra) - (pb - rb) = [0.5 - 0, 0 - (-1), -1 - 1]
MARGINS = [0.5, 1.0, -2.0]
LABELS = [[1, -1, 1], [0, 1, -1], [0, 0, 0]]
# Signed margins z = s * m of each objective's non-tie pairs.
Z0 = [0.5, -1.0, -2.0]
Z1 = [1.0, 2.0]
# For simpo: lengths, and m = pa/la - pb/lb = [-3 - (-2), -2.5 - (-4), -0.5 - (-2)].
LEN_A = [1, 2, 4]
LEN_B = [2, 1, 3]
SIMPO_MARGINS = [-1.0, 1.5, 1.5]


def _t(values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def _softplus(x):
    return math.log1p(math.exp(x))


def _mean(values):
    return sum(values) / len(values)


def _call(loss="dpo", beta=0.5, labels=LABELS, **options):
    return preference_losses(
        _t(POLICY_A), _t(POLICY_B), torch.tensor(labels),
        reference_logps_a=_t(REF_A), reference_logps_b=_t(REF_B),
        lengths_a=torch.tensor(LEN_A), lengths_b=torch.tensor(LEN_B),
        loss=loss, beta=beta, **options,
    )


def test_registry_has_the_four_losses():
    assert {"dpo", "ipo", "hinge", "simpo"} <= set(LOSSES)
    assert get_loss("simpo").reference_free and get_loss("simpo").length_normalised
    assert not any(get_loss(n).reference_free for n in ("dpo", "ipo", "hinge"))


def test_pair_margins_by_hand():
    torch.testing.assert_close(
        pair_margins(_t(POLICY_A), _t(POLICY_B), reference_logps_a=_t(REF_A), reference_logps_b=_t(REF_B)),
        _t(MARGINS),
    )
    torch.testing.assert_close(
        pair_margins(_t(POLICY_A), _t(POLICY_B), loss="simpo",
                     lengths_a=torch.tensor(LEN_A), lengths_b=torch.tensor(LEN_B)),
        _t(SIMPO_MARGINS),
    )


# beta = 0.5 throughout; expected values written out from the formulas with math, not torch.
HAND_VALUES = {
    "dpo": ({}, [_mean([_softplus(-0.5 * z) for z in Z0]), _mean([_softplus(-0.5 * z) for z in Z1]), 0.0]),
    "dpo_smoothed": (
        {"label_smoothing": 0.1},
        [_mean([0.9 * _softplus(-0.5 * z) + 0.1 * _softplus(0.5 * z) for z in Z0]),
         _mean([0.9 * _softplus(-0.5 * z) + 0.1 * _softplus(0.5 * z) for z in Z1]), 0.0],
    ),
    # IPO target 1 / (2 beta) = 1
    "ipo": ({}, [(0.25 + 4.0 + 9.0) / 3, (0.0 + 1.0) / 2, 0.0]),
    # hinge relu(1 - beta z)
    "hinge": ({}, [(0.75 + 1.5 + 2.0) / 3, (0.5 + 0.0) / 2, 0.0]),
}


@pytest.mark.parametrize("case", sorted(HAND_VALUES))
def test_reference_losses_by_hand(case):
    options, expected = HAND_VALUES[case]
    out = _call(case.split("_")[0], beta=0.5, **options)
    torch.testing.assert_close(out.losses, _t(expected), rtol=1e-12, atol=1e-12)


def test_simpo_by_hand_and_reference_free():
    # beta 2, gamma 0.5: loss = softplus(gamma - beta z); z0 = [-1, -1.5, 1.5], z1 = [1.5, -1.5]
    expected = [
        _mean([_softplus(0.5 - 2 * z) for z in (-1.0, -1.5, 1.5)]),
        _mean([_softplus(0.5 - 2 * z) for z in (1.5, -1.5)]),
        0.0,
    ]
    out = _call("simpo", beta=2.0)
    torch.testing.assert_close(out.losses, _t(expected), rtol=1e-12, atol=1e-12)
    # The references are ignored (and may be omitted).
    no_ref = preference_losses(_t(POLICY_A), _t(POLICY_B), torch.tensor(LABELS), loss="simpo", beta=2.0,
                               lengths_a=torch.tensor(LEN_A), lengths_b=torch.tensor(LEN_B))
    torch.testing.assert_close(no_ref.losses, out.losses, rtol=0, atol=0)
    # gamma moves the target margin.
    gamma0 = _call("simpo", beta=2.0, gamma=0.0)
    torch.testing.assert_close(gamma0.losses[1], _t(_mean([_softplus(-3.0), _softplus(3.0)])))


def test_metrics_by_hand():
    out = _call("dpo", beta=0.5)
    # rewards 0.5 * (logp - ref): A = [0.25, 0, -0.5], B = [0, -0.5, 0.5]
    # objective 0 prefers A, B, A: chosen [0.25, -0.5, -0.5], rejected [0, 0, 0.5]
    # objective 1 prefers -, A, B: chosen [0, 0.5], rejected [-0.5, -0.5]
    nan = float("nan")
    torch.testing.assert_close(out.accuracy, _t([1 / 3, 1.0, nan]), equal_nan=True)
    torch.testing.assert_close(out.margin, _t([-1.25 / 3, 0.75, nan]), equal_nan=True)
    torch.testing.assert_close(out.chosen_reward, _t([-0.25, 0.25, nan]), equal_nan=True)
    torch.testing.assert_close(out.rejected_reward, _t([0.5 / 3, -0.5, nan]), equal_nan=True)
    assert out.num_pairs.tolist() == [3, 2, 0] and out.num_pairs.dtype == torch.long
    for field in ("accuracy", "margin", "chosen_reward", "rejected_reward", "num_pairs"):
        assert not getattr(out, field).requires_grad
    scalars = out.scalars(["helpful", "harmless", "honest"])
    assert scalars["num_pairs/harmless"] == 2.0 and math.isnan(scalars["accuracy/honest"])
    assert scalars["loss/honest"] == 0.0


def test_simpo_rewards_are_length_normalised():
    out = _call("simpo", beta=2.0)
    # rewards 2 * logp / len: A = [-6, -5, -1], B = [-4, -8, -4]
    # objective 0 prefers A, B, A: chosen [-6, -8, -1], rejected [-4, -5, -4]
    torch.testing.assert_close(out.chosen_reward[0], _t(-5.0))
    torch.testing.assert_close(out.rejected_reward[0], _t(-13 / 3))
    torch.testing.assert_close(out.margin[0], _t(-2 / 3))
    torch.testing.assert_close(out.accuracy[0], _t(1 / 3))


def test_accuracy_needs_a_strictly_higher_reward():
    out = preference_losses(_t([-1.0]), _t([-1.0]), torch.tensor([[1]]),
                            reference_logps_a=_t([-1.0]), reference_logps_b=_t([-1.0]))
    assert out.accuracy.item() == 0.0 and out.margin.item() == 0.0


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
def test_gradients_match_finite_differences(loss):
    torch.manual_seed(0)
    labels = torch.tensor([[1, -1, 0, 1, -1], [0, 1, 1, -1, 0]])
    pa, pb = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ra, rb = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    options = {"label_smoothing": 0.2} if loss == "dpo" else {}

    def fn(a, b):
        return preference_losses(a, b, labels, reference_logps_a=ra, reference_logps_b=rb,
                                 loss=loss, beta=0.7, **options).losses

    assert torch.autograd.gradcheck(fn, (pa, pb))
    assert torch.autograd.gradcheck(
        lambda m: losses_from_margins(m, labels, loss=loss, beta=0.7, **options), (pa,)
    )


def test_simpo_gradients_match_finite_differences():
    torch.manual_seed(1)
    labels = torch.tensor([[1, -1, 0, 1], [-1, 0, 1, 1]])
    pa, pb = (-10 * torch.rand(4, dtype=torch.float64) for _ in range(2))
    lengths_a, lengths_b = torch.tensor([3, 5, 1, 8]), torch.tensor([2, 2, 7, 4])

    def fn(a, b):
        return preference_losses(a, b, labels, loss="simpo", beta=2.0, gamma=0.3,
                                 lengths_a=lengths_a, lengths_b=lengths_b).losses

    assert torch.autograd.gradcheck(fn, (pa.requires_grad_(), pb.requires_grad_()))


def test_reference_gets_no_gradient():
    ra = _t(REF_A, grad=True)
    pa = _t(POLICY_A, grad=True)
    out = preference_losses(pa, _t(POLICY_B), torch.tensor(LABELS), reference_logps_a=ra, reference_logps_b=_t(REF_B))
    out.losses.sum().backward()
    assert ra.grad is None and pa.grad is not None


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_ties_give_no_gradient_and_stay_out(loss):
    # Pair 1 is a tie for every objective; pair 2 belongs to objective 1 only.
    labels = torch.tensor([[1, 0, 0, -1], [0, 0, 1, 1]])
    lengths = torch.tensor([2, 3, 4, 5])

    def run(pa_values):
        pa = _t(pa_values, grad=True)
        out = preference_losses(pa, _t([-2.0, -3.0, -1.0, -4.0]), labels, loss=loss, beta=0.3,
                                reference_logps_a=_t([-1.5, -2.0, -2.0, -3.0]),
                                reference_logps_b=_t([-2.5, -1.0, -2.0, -3.5]),
                                lengths_a=lengths, lengths_b=lengths)
        grads = [torch.autograd.grad(out.losses[k], pa, retain_graph=True)[0] for k in range(2)]
        return out, grads

    out, grads = run([-1.0, -2.0, -3.0, -5.0])
    assert grads[0][1] == 0 and grads[1][1] == 0  # the tie pair
    assert grads[0][2] == 0  # objective 0 ignores objective 1's pair
    assert grads[0][0] != 0 and grads[1][2] != 0
    # A non-finite log-prob on the tie pair changes nothing, gradients included.
    tie_nan, tie_nan_grads = run([-1.0, float("nan"), -3.0, -5.0])
    for k in range(2):
        torch.testing.assert_close(tie_nan.losses[k], out.losses[k], rtol=0, atol=0)
        torch.testing.assert_close(tie_nan_grads[k], grads[k], rtol=0, atol=0)
        torch.testing.assert_close(tie_nan.accuracy[k], out.accuracy[k], rtol=0, atol=0)
    # One on objective 1's pair makes objective 1's loss non-finite (for the
    # hook to see) and leaves objective 0's loss and metrics alone.
    poisoned, _ = run([-1.0, -2.0, float("nan"), -5.0])
    assert torch.isnan(poisoned.losses[1]) and torch.isnan(poisoned.margin[1])
    torch.testing.assert_close(poisoned.losses[0], out.losses[0], rtol=0, atol=0)
    torch.testing.assert_close(poisoned.margin[0], out.margin[0], rtol=0, atol=0)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_objective_without_pairs_is_exactly_zero_without_gradient(loss):
    pa = _t(POLICY_A, grad=True)
    out = preference_losses(pa, _t(POLICY_B), torch.tensor(LABELS), reference_logps_a=_t(REF_A),
                            reference_logps_b=_t(REF_B), lengths_a=torch.tensor(LEN_A),
                            lengths_b=torch.tensor(LEN_B), loss=loss)
    assert out.losses[2].item() == 0.0 and out.num_pairs[2].item() == 0
    (grad,) = torch.autograd.grad(out.losses[2], pa)
    assert torch.equal(grad, torch.zeros_like(grad))
    # An empty batch: every objective is empty, nothing is NaN.
    empty = preference_losses(_t([], grad=True), _t([]), torch.zeros(2, 0, dtype=torch.long),
                              reference_logps_a=_t([]), reference_logps_b=_t([]),
                              lengths_a=torch.zeros(0), lengths_b=torch.zeros(0), loss=loss)
    assert empty.losses.tolist() == [0.0, 0.0] and empty.num_pairs.tolist() == [0, 0]


def test_preference_losses_is_margins_then_losses():
    out = _call("ipo", beta=0.5)
    torch.testing.assert_close(out.losses, losses_from_margins(_t(MARGINS), torch.tensor(LABELS), loss="ipo", beta=0.5))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_margin_jacobian_matches_per_objective_autograd(loss):
    torch.manual_seed(2)
    labels = torch.tensor([[1, -1, 0, 1, 0], [0, 0, 0, 0, 0], [-1, 1, 1, 1, -1]])
    margins = torch.randn(5, dtype=torch.float64, requires_grad=True)
    jac = margin_jacobian(margins, labels, loss=loss, beta=0.4)
    lk = losses_from_margins(margins, labels, loss=loss, beta=0.4)
    rows = [torch.autograd.grad(lk[k], margins, retain_graph=True)[0] for k in range(3)]
    torch.testing.assert_close(jac, torch.stack(rows), rtol=1e-12, atol=0)
    assert not jac.requires_grad and torch.equal(jac[1], torch.zeros(5, dtype=torch.float64))


def test_margin_jacobian_dpo_closed_form():
    # DESIGN.md section 6: dL_k/dm_r = -beta s_kr sigmoid(-beta s_kr m_r) / n_k
    beta = 0.2
    labels = torch.tensor([[1, -1, 0], [1, 1, 1]])
    margins = _t([0.3, -2.0, 5.0])
    s = labels.to(torch.float64)
    expected = -beta * s * torch.sigmoid(-beta * s * margins) / (labels != 0).sum(1, keepdim=True)
    torch.testing.assert_close(margin_jacobian(margins, labels, beta=beta), expected, rtol=1e-12, atol=0)


def test_one_pass_identity():
    """Backprop of sum_r J_kr m_r gives objective k's gradient: what one-pass capture relies on."""
    pa = _t(POLICY_A, grad=True)
    kwargs = dict(reference_logps_a=_t(REF_A), reference_logps_b=_t(REF_B))
    margins = pair_margins(pa, _t(POLICY_B), **kwargs)
    jac = margin_jacobian(margins, torch.tensor(LABELS), beta=0.5)
    for k in range(2):
        full = preference_losses(pa, _t(POLICY_B), torch.tensor(LABELS), beta=0.5, **kwargs)
        (direct,) = torch.autograd.grad(full.losses[k], pa)
        (via_margins,) = torch.autograd.grad((jac[k] * margins).sum(), pa, retain_graph=True)
        torch.testing.assert_close(via_margins, direct, rtol=1e-12, atol=0)


def test_low_precision_inputs_are_computed_in_float32():
    out = preference_losses(torch.tensor([-3.0], dtype=torch.bfloat16), torch.tensor([-4.0], dtype=torch.bfloat16),
                            torch.tensor([[1]]), reference_logps_a=torch.tensor([-3.0], dtype=torch.bfloat16),
                            reference_logps_b=torch.tensor([-4.0], dtype=torch.bfloat16))
    assert out.losses.dtype == torch.float32 and out.accuracy.dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    num_objectives=st.integers(1, 4),
    num_pairs=st.integers(1, 6),
    loss=st.sampled_from(sorted(LOSSES)),
    beta=st.floats(0.05, 3.0),
)
def test_each_objective_is_the_mean_over_its_own_pairs(data, num_objectives, num_pairs, loss, beta):
    margin_list = data.draw(st.lists(st.floats(-20, 20), min_size=num_pairs, max_size=num_pairs))
    label_list = data.draw(st.lists(st.lists(st.sampled_from([-1, 0, 1]), min_size=num_pairs, max_size=num_pairs),
                                    min_size=num_objectives, max_size=num_objectives))
    margins, labels = _t(margin_list), torch.tensor(label_list)
    got = losses_from_margins(margins, labels, loss=loss, beta=beta)
    pair_loss = get_loss(loss)
    for k, row in enumerate(label_list):
        used = [s * m for s, m in zip(row, margin_list) if s != 0]
        expected = pair_loss(_t(used), beta).mean().item() if used else 0.0
        assert got[k].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # Swapping A and B (labels and margins both flip) changes nothing.
    torch.testing.assert_close(losses_from_margins(-margins, -labels, loss=loss, beta=beta), got, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# Every bad input raises the ValueError we meant.

A, B = _t([-1.0, -2.0]), _t([-2.0, -1.0])
RA, RB = _t([-1.0, -1.0]), _t([-1.0, -1.0])
L2 = torch.tensor([[1, -1]])
BAD_CALLS = {
    "unknown loss": (dict(loss="dpoo"), r"unknown loss 'dpoo'; known losses: \[.*'dpo'.*'simpo'"),
    "no reference": (
        dict(reference_logps_a=None, reference_logps_b=None),
        r"loss 'dpo' needs reference_logps_a and reference_logps_b.*\['simpo'\]",
    ),
    "one reference": (dict(reference_logps_b=None), "needs reference_logps_a and reference_logps_b"),
    "reference shape": (dict(reference_logps_a=_t([1.0, 2, 3])), "reference_logps_a has 3 pairs but the batch has 2"),
    "reference int": (dict(reference_logps_b=torch.tensor([1, 2])), "reference_logps_b must be a floating-point"),
    "policy shape": (dict(policy_logps_b=_t([1.0])), "policy_logps_b has 1 pairs but the batch has 2"),
    "policy 2-D": (dict(policy_logps_a=_t([[1.0, 2.0]])), r"policy_logps_a must be 1-D .*got shape \(1, 2\)"),
    "policy int": (dict(policy_logps_a=torch.tensor([1, 2])), "policy_logps_a must be a floating-point tensor"),
    "policy list": (dict(policy_logps_a=[-1.0, -2.0]), "policy_logps_a must be a torch.Tensor"),
    "labels value": (dict(labels=torch.tensor([[1, 2]])), r"labels must be in \{-1, 0, 1\}.*found \[2\]"),
    "labels float": (dict(labels=torch.tensor([[1.0, -1.0]])), r"integer tensor.*float32; use labels.long\(\)"),
    "labels bool": (dict(labels=torch.tensor([[True, False]])), "labels must be an integer tensor"),
    "labels 1-D": (dict(labels=torch.tensor([1, -1])), r"labels must be 2-D of shape \(K, B\).*unsqueeze\(0\)"),
    "labels pairs": (dict(labels=torch.tensor([[1, -1, 0]])), r"labels has 3 pairs .* but the log-probs have 2"),
    "labels no objective": (dict(labels=torch.zeros(0, 2, dtype=torch.long)), "labels has no objectives"),
    "labels list": (dict(labels=[[1, -1]]), r"labels must be a torch.Tensor of shape \(K, B\)"),
    "beta zero": (dict(beta=0.0), "beta must be a positive finite number, got 0.0"),
    "beta negative": (dict(beta=-0.1), "beta must be a positive finite number"),
    "beta nan": (dict(beta=float("nan")), "beta must be a positive finite number"),
    "beta inf": (dict(beta=float("inf")), "beta must be a positive finite number"),
    "beta tensor": (dict(beta=torch.tensor(0.2)), "beta must be a positive finite number"),
    "unknown option": (dict(gamma=0.5), r"'dpo' got unknown option\(s\) \['gamma'\]; it accepts \['label_smoothing'\]"),
    "label smoothing": (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    "simpo no lengths": (dict(loss="simpo"), "loss 'simpo' is length-normalised and needs lengths_a and lengths_b"),
    "simpo one length": (dict(loss="simpo", lengths_a=torch.tensor([1, 2])), "needs lengths_a and lengths_b"),
    "simpo zero length": (
        dict(loss="simpo", lengths_a=torch.tensor([1, 2]), lengths_b=torch.tensor([0, 2])),
        "lengths_b must be positive token counts",
    ),
    "simpo length shape": (
        dict(loss="simpo", lengths_a=torch.tensor([1]), lengths_b=torch.tensor([1, 2])),
        "lengths_a has 1 pairs but the batch has 2",
    ),
    "simpo gamma": (
        dict(loss="simpo", lengths_a=torch.tensor([1, 2]), lengths_b=torch.tensor([1, 2]), gamma=float("nan")),
        "gamma .* must be finite",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_rejects_bad_input(case):
    changes, message = BAD_CALLS[case]
    kwargs = dict(policy_logps_a=A, policy_logps_b=B, labels=L2, reference_logps_a=RA, reference_logps_b=RB)
    kwargs.update(changes)
    with pytest.raises(ValueError, match=message):
        preference_losses(**kwargs)


def test_rejects_bad_margins_and_registrations():
    with pytest.raises(ValueError, match=r"margins must be 1-D"):
        losses_from_margins(_t([[1.0]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"labels has 2 pairs"):
        margin_jacobian(_t([1.0]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="loss 'dpo' is already registered"):
        register_loss("dpo")(lambda z, beta: z)
    with pytest.raises(ValueError, match=r"must take \(z, beta"):
        register_loss("bad_signature")(lambda margin, temperature: margin)
    with pytest.raises(ValueError, match="must be keyword-only"):
        register_loss("bad_option")(lambda z, beta, gamma=0.5: z)
    assert "bad_signature" not in LOSSES and "bad_option" not in LOSSES
    out = PreferenceLosses(*([torch.zeros(2)] * 6))
    with pytest.raises(ValueError, match="got 1 objective names for 2 objectives"):
        out.scalars(["only_one"])
