"""One-pass capture (plain PyTorch): K gradients from one backward equal K separate backwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raco_ds.losses import losses_from_margins, margin_jacobian
from raco_ds.models import enable_activation_checkpointing
from raco_ds.onepass import (
    FusedKernelError,
    OnePassCapture,
    RowCoefficients,
    UnsupportedModuleError,
    coefficients_from_losses,
    objective_row_coefficients,
    shared_pair_coefficients,
)


def tiny_model(kind: str, *, seed: int = 0, checkpointing: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny randomly initialised causal LM: llama (untied), llama_tied, qwen2 (q/k/v bias), gemma (tied,
    (1+w) RMSNorm), gpt2 (Conv1D, LayerNorm, tied), opt (Linear with bias, LayerNorm, learned positions)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif kind == "llama_tied":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True)
        cls = tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=False)
        cls = tf.Qwen2ForCausalLM
    elif kind == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=4, tie_word_embeddings=True)
        cls = tf.GemmaForCausalLM
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=4, n_positions=64)
        cls = tf.GPT2LMHeadModel
    elif kind == "opt":
        cfg = tf.OPTConfig(vocab_size=61, hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1)
        cls = tf.OPTForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    if hasattr(cfg, "attn_pdrop"):
        cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0
    if hasattr(cfg, "dropout"):
        cfg.dropout = 0.0
    if hasattr(cfg, "attention_dropout"):
        cfg.attention_dropout = 0.0
    model = cls(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norm weights so that their gradient rule is really tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    return model


def batch(num_pairs: int, seq: int = 12, vocab: int = 61, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """2B rows (A responses then B responses) with a prompt of 4 tokens and right padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * num_pairs
    ids = torch.randint(2, vocab, (rows, seq), generator=gen)
    lengths = torch.randint(seq - 4, seq + 1, (rows,), generator=gen)
    attention = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.where(attention.bool(), ids, torch.ones_like(ids))  # pad id 1
    response = attention.bool() & (torch.arange(seq).unsqueeze(0) >= 4)
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def row_logps(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs per row (R,)."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, data["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * data["response_mask"][:, 1:]).sum(-1)


BETA = 0.2
TOL = 1e-5


def _labels(shape: str, k: int, b: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if shape == "shared":
        labels = torch.randint(-1, 2, (k, b), generator=gen)  # includes ties
        labels[:, 0] = 1  # every objective has a non-tie pair
        return labels
    owner = torch.arange(b) % k  # per-objective pairs: pair r belongs to objective owner[r] only
    labels = torch.zeros(k, b, dtype=torch.long)
    labels[owner, torch.arange(b)] = torch.where(torch.rand(b, generator=gen) < 0.5, 1, -1)
    return labels


def _margins(logps: torch.Tensor, b: int, seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ref = -30.0 + torch.randn(2 * b, generator=gen)
    return (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])


def reference_grads(model: nn.Module, data, labels, shape: str) -> dict[str, torch.Tensor]:
    """K separate backwards through ordinary autograd: {name: (K, *shape)}."""
    b = labels.shape[1]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses = losses_from_margins(_margins(row_logps(model, data), b), labels, beta=BETA)
    out = {n: [] for n, _ in params}
    for k in range(labels.shape[0]):
        grads = torch.autograd.grad(losses[k], [p for _, p in params], retain_graph=True, allow_unused=True)
        for (n, p), g in zip(params, grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def onepass_grads(model: nn.Module, data, labels, shape: str, *, cap: OnePassCapture | None = None,
                  wrong_rows: bool = False, general: bool = False, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One forward, one backward through OnePassCapture."""
    k, b = labels.shape
    cap = cap or OnePassCapture(model, k)
    with cap.record():
        logps = row_logps(model, data)
        margins = _margins(logps, b)
        if general:
            losses = losses_from_margins(margins, labels, beta=BETA)
            cap.backward(logps.sum(), coefficients_from_losses(logps, losses), scale)
        elif shape == "shared":
            coeffs = shared_pair_coefficients(margin_jacobian(margins, labels, beta=BETA))
            if wrong_rows:
                coeffs = coeffs.roll(1, dims=1)
            cap.backward(margins.sum(), coeffs, scale)
        else:
            losses = losses_from_margins(margins, labels, beta=BETA)
            owner = (labels != 0).long().argmax(0)
            owner_rows = torch.cat([owner, owner])
            if wrong_rows:
                owner_rows = (owner_rows + 1) % k
            cap.backward(losses.sum(), objective_row_coefficients(owner_rows, k), scale)
    return cap.gradients()


def max_rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Largest per-parameter, per-objective relative error (absolute where the reference is 0)."""
    worst = 0.0
    assert got.keys() == ref.keys()
    for name in ref:
        for k in range(ref[name].shape[0]):
            r, g = ref[name][k].double(), got[name][k].double()
            denom = r.norm().item()
            err = (g - r).norm().item() / (denom if denom > 1e-12 else 1.0)
            worst = max(worst, err)
    return worst


MODELS = ["llama", "llama_tied", "qwen2", "gemma", "gpt2"]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("shape", ["shared", "objective_rows"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_onepass_equals_k_backwards(kind: str, shape: str, k: int, checkpointing: bool) -> None:
    if checkpointing and kind in ("gpt2", "qwen2") and k == 4:
        pytest.skip("covered at K=2")
    model = tiny_model(kind, checkpointing=checkpointing)
    data = batch(4)
    labels = _labels(shape, k, 4)
    ref = reference_grads(model, data, labels, shape)
    got = onepass_grads(model, data, labels, shape)
    err = max_rel_err(got, ref)
    assert err <= TOL, f"{kind} {shape} K={k} ckpt={checkpointing}: max rel err {err:.2e}"
    # The capture left the model as it found it: parameters trainable, no .grad written.
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("shape", ["shared", "objective_rows"])
def test_reentrant_checkpointing(shape: str) -> None:
    """use_reentrant=True: the tapped modules run (and capture) in the backward's recomputation."""
    data, labels = batch(4), _labels(shape, 2, 4)
    ref = reference_grads(tiny_model("llama_tied"), data, labels, shape)  # reentrant forbids autograd.grad
    model = tiny_model("llama_tied")
    enable_activation_checkpointing(model, reentrant=True)
    assert max_rel_err(onepass_grads(model, data, labels, shape), ref) <= TOL


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_general_row_score_coefficients(kind: str) -> None:
    """C = dL/d(row scores) with seed = sum of row scores gives the same gradients."""
    model = tiny_model(kind)
    data, labels = batch(3), _labels("shared", 3, 3)
    err = max_rel_err(onepass_grads(model, data, labels, "shared", general=True), reference_grads(model, data, labels, "shared"))
    assert err <= TOL


@pytest.mark.parametrize("shape", ["shared", "objective_rows"])
def test_weighted_sum_is_weighted_loss_gradient(shape: str) -> None:
    model = tiny_model("llama_tied")
    data, labels = batch(4), _labels(shape, 3, 4)
    w = torch.tensor([0.2, 0.5, 0.3])
    got = onepass_grads(model, data, labels, shape)
    params = [(n, p) for n, p in model.named_parameters()]
    losses = losses_from_margins(_margins(row_logps(model, data), 4), labels, beta=BETA)
    grads = torch.autograd.grad((w * losses).sum(), [p for _, p in params])
    worst = max(
        ((torch.einsum("k,k...->...", w, got[n]) - g).norm() / g.norm().clamp_min(1e-12)).item()
        for (n, _), g in zip(params, grads)
    )
    assert worst <= TOL


@pytest.mark.parametrize("shape", ["shared", "objective_rows"])
def test_negative_control_wrong_rows_fails(shape: str) -> None:
    model = tiny_model("llama")
    data, labels = batch(4), _labels(shape, 2, 4)
    ref = reference_grads(model, data, labels, shape)
    err = max_rel_err(onepass_grads(model, data, labels, shape, wrong_rows=True), ref)
    assert err > 0.1, f"a wrong row assignment went unnoticed (err {err:.2e})"


def test_gradient_accumulation_over_micro_batches() -> None:
    """Two capture passes add up: the K buffers accumulate until zero()."""
    model = tiny_model("qwen2")
    labels = _labels("shared", 2, 4)
    d1, d2 = batch(4, seed=1), batch(4, seed=2)
    cap = OnePassCapture(model, 2)
    onepass_grads(model, d1, labels, "shared", cap=cap)
    got = onepass_grads(model, d2, labels, "shared", cap=cap)
    r1, r2 = reference_grads(model, d1, labels, "shared"), reference_grads(model, d2, labels, "shared")
    assert max_rel_err(got, {n: r1[n] + r2[n] for n in r1}) <= TOL
    cap.zero()
    assert all(float(v.abs().sum()) == 0 for v in cap.gradients().values())


def test_no_dense_parameter_gradients_are_computed() -> None:
    """Inside record() no parameter requires grad, so autograd never forms a dense weight gradient."""
    model = tiny_model("llama")
    cap = OnePassCapture(model, 2)
    data, labels = batch(2), _labels("shared", 2, 2)
    seen = []
    with cap.record():
        seen.extend(p.requires_grad for p in model.parameters())
        logps = row_logps(model, data)
        margins = _margins(logps, 2)
        cap.backward(margins.sum(), shared_pair_coefficients(margin_jacobian(margins, labels, beta=BETA)))
    assert not any(seen)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def _saved_bytes(model: nn.Module, data, labels, capture: bool) -> int:
    """Bytes of tensors autograd keeps outside checkpointed regions during forward+backward."""
    total = 0
    storages: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in storages:
            storages.add(key)
            total += t.untyped_storage().nbytes()
        return t

    # The pass's own memory: the one-time self-check's passes (measured elsewhere) would add theirs.
    cap = OnePassCapture(model, labels.shape[0], verify=False) if capture else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if capture:
            with cap.record():
                logps = row_logps(model, data)
                margins = _margins(logps, labels.shape[1])
                cap.backward(margins.sum(), shared_pair_coefficients(margin_jacobian(margins, labels, beta=BETA)))
        else:
            losses = losses_from_margins(_margins(row_logps(model, data), labels.shape[1]), labels, beta=BETA)
            losses.sum().backward()
    if cap:
        cap.remove()
    return total


def test_checkpointing_keeps_its_memory_savings() -> None:
    """Under checkpointing the capture's saved inputs are recomputed, not kept."""
    import transformers as tf

    def model(ckpt: bool) -> nn.Module:
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        m = tf.LlamaForCausalLM(cfg).train()
        if ckpt:
            enable_activation_checkpointing(m)
        return m

    data, labels = batch(4, seq=32), _labels("shared", 2, 4)
    plain_ckpt = _saved_bytes(model(True), data, labels, capture=False)
    onepass_ckpt = _saved_bytes(model(True), data, labels, capture=True)
    onepass_full = _saved_bytes(model(False), data, labels, capture=True)
    # One-pass under checkpointing keeps about what plain checkpointing keeps (plus the tiny
    # embedding input) and far less than one-pass without checkpointing.
    assert onepass_ckpt <= 1.1 * plain_ckpt, (onepass_ckpt, plain_ckpt)
    assert onepass_ckpt * 3 < onepass_full, (onepass_ckpt, onepass_full)


def test_capture_holds_no_tensors_between_forward_and_backward() -> None:
    model = tiny_model("llama")
    cap = OnePassCapture(model, 2)
    with cap.record():
        row_logps(model, batch(2))
        for site in cap.sites:
            assert not [v for v in vars(site).values() if isinstance(v, torch.Tensor)]


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def test_unsupported_module_raises_naming_it() -> None:
    model = nn.Sequential(nn.Linear(3, 3), _Odd())
    with pytest.raises(UnsupportedModuleError, match=r"module '1' of type .*_Odd"):
        OnePassCapture(model, 2)
    model[1].scale.requires_grad_(False)  # frozen parameters need no rule
    OnePassCapture(model, 2)


def test_hf_embedding_subclass_with_own_forward_raises() -> None:
    """OPT's learned positions embed the attention mask, not ids: no exact rule, so construction refuses."""
    with pytest.raises(UnsupportedModuleError, match="embed_positions.*OPTLearnedPositionalEmbedding"):
        OnePassCapture(tiny_model("opt"), 2)


def test_fake_rms_norm_is_rejected() -> None:
    class FakeRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight.pow(2)  # not w * x_hat

    with pytest.raises(UnsupportedModuleError, match="looks like an RMSNorm"):
        OnePassCapture(nn.Sequential(FakeRMSNorm()), 2)


def test_fused_output_kernel_raises() -> None:
    """A forward that uses lm_head.weight without calling lm_head (fused linear-CE) is caught."""
    model = tiny_model("llama")
    cap = OnePassCapture(model, 2)
    data = batch(2)
    with pytest.raises(FusedKernelError, match="lm_head"), cap.record():
        hidden = model.model(input_ids=data["input_ids"]).last_hidden_state
        logits = hidden @ model.lm_head.weight.T  # what a fused kernel does
        cap.backward(logits.sum(), torch.ones(2, 4, dtype=torch.float64))


def test_row_coefficients_grouping() -> None:
    c = torch.tensor([[0.1, -0.2, 0.1, -0.2], [0.3, 0.0, 0.3, 0.0]], dtype=torch.float64)
    rc = RowCoefficients.from_matrix(c)
    assert rc.num_groups == 2  # pairs (0, 2) and (1, 3)
    rebuilt = rc.directions[:, rc.row_group] * rc.row_scale
    assert torch.equal(rebuilt, c)
    membership = objective_row_coefficients(torch.tensor([0, 1, 0, 1]), 2) / torch.tensor([2.0, 2.0]).unsqueeze(1)
    assert RowCoefficients.from_matrix(membership).num_groups == 2
    # Rows of a pair under the general recipe have opposite columns (zeros included): one group.
    flipped = torch.tensor([[0.5, -0.5], [0.0, -0.0]], dtype=torch.float64)
    assert RowCoefficients.from_matrix(flipped).num_groups == 1
    with pytest.raises(ValueError, match="inf/NaN"):
        RowCoefficients.from_matrix(torch.tensor([[float("nan")]]))


def _linear_weight_cases() -> list[tuple[str, torch.Tensor]]:
    """(K, R) coefficient matrices covering every path of the Linear weight rule."""
    gen = torch.Generator().manual_seed(3)
    r = 12
    scattered = torch.zeros(2, r, dtype=torch.float64)
    scattered[0, ::2], scattered[1, 1::2] = 1.0, 1.0  # sole groups in 6 runs each: gathered rows
    scaled = scattered * torch.rand(2, r, generator=gen, dtype=torch.float64)  # ... with row scales
    blocks = torch.zeros(3, r, dtype=torch.float64)
    blocks[0, :4], blocks[1, 4:8], blocks[2, 8:] = 0.5, 1.0, 2.0  # contiguous runs: views
    pairs = torch.randn(3, r // 2, generator=gen, dtype=torch.float64)
    shared = torch.cat([pairs, pairs], 1)  # equal-size shared groups: batched products
    mixed = shared.clone()
    mixed[1:, 0] = mixed[1:, 6] = 0.0  # one pair scored by objective 0 only: a sole group next to shared ones
    mixed[:, 1] = 0.0  # a row no objective scores
    uneven = torch.randn(2, r, generator=gen, dtype=torch.float64)  # shared groups of one row: per-group loop
    uneven[:, 3] = uneven[:, 4] * 2.0  # ... and one of two rows
    return [("scattered", scattered), ("scaled", scaled), ("blocks", blocks), ("shared", shared),
            ("mixed", mixed), ("uneven", uneven)]


@pytest.mark.parametrize("name,c", _linear_weight_cases(), ids=[n for n, _ in _linear_weight_cases()])
def test_linear_weight_rule_matches_per_row_sum(name: str, c: torch.Tensor, monkeypatch) -> None:
    """G_k = sum_r C[k, r] g_r^T x_r on every path: views, gathers, scales, batched and per-group products."""
    from raco_ds.onepass import _rules

    monkeypatch.setattr(_rules, "_GROUP_CHUNK_BYTES", 2 * 5 * 7 * 4)  # two products per chunk: chunking too
    gen = torch.Generator().manual_seed(4)
    g, x = torch.randn(c.shape[1], 3, 5, generator=gen), torch.randn(c.shape[1], 3, 7, generator=gen)
    dc = _rules.DeviceCoefficients.build(RowCoefficients.from_matrix(c), torch.device("cpu"))
    got = _rules._outer_by_group(g, x, dc)
    expect = torch.einsum("kr,rto,rti->koi", c, g.double(), x.double())
    assert (got.double() - expect).abs().max().item() <= 1e-5 * expect.abs().max().item(), name


# ---------------------------------------------------------------------------------------------
# Streaming: each parameter handed to a sink as soon as complete in the backward.


class _RecordingSink:
    """Collects what a streaming capture hands over, and when (during the backward or at its end)."""

    def __init__(self, cap: OnePassCapture) -> None:
        self.cap = cap
        self.grads: dict[int, torch.Tensor] = {}
        self.order: list[int] = []
        self.in_backward: list[bool] = []
        self.ended = 0

    def on_final(self, param: nn.Parameter, index: int, grad: torch.Tensor | None) -> None:
        self.order.append(index)
        self.in_backward.append(self.cap._in_backward)
        g = torch.zeros(self.cap.num_objectives, self.cap.numel(param)) if grad is None else grad
        self.grads[index] = self.grads[index] + g if index in self.grads else g.clone()

    def end_backward(self) -> None:
        self.ended += 1

    def as_named(self) -> dict[str, torch.Tensor]:
        return {n: self.grads[i].view(self.cap.num_objectives, *self.cap.shape(p)) for i, (n, p) in enumerate(self.cap.parameters)}


@pytest.mark.parametrize("kind,ckpt", [("llama_tied", False), ("llama_tied", True), ("gpt2", False), ("qwen2", True),
                                       ("llama", "reentrant")])
def test_streaming_hands_each_parameter_over_once_during_the_backward(kind: str, ckpt) -> None:
    """Every parameter exactly once per backward, complete (equal to K backwards), in a deterministic order."""
    shape = "shared"
    data, labels = batch(4), _labels(shape, 2, 4)
    model = tiny_model(kind, checkpointing=ckpt is True)
    if ckpt == "reentrant":
        enable_activation_checkpointing(model, reentrant=True)
        ref = reference_grads(tiny_model(kind), data, labels, shape)
    else:
        ref = reference_grads(model, data, labels, shape)
    orders = []
    for _ in range(2):
        cap = OnePassCapture(model, 2)
        sink = _RecordingSink(cap)
        cap.stream_to(sink)
        onepass_grads(model, data, labels, shape, cap=cap)
        cap.remove()
        assert sorted(sink.order) == list(range(len(cap.parameters)))  # each once, tied ones once
        assert sink.ended == 1 and not cap._buffers and cap.live_buffer_bytes == 0
        assert all(sink.in_backward), "every used parameter is complete before the backward returns"
        assert max_rel_err(sink.as_named(), ref) <= TOL
        orders.append(sink.order)
    assert orders[0] == orders[1]


def test_streaming_flushes_unused_parameters_at_the_end_in_registration_order() -> None:
    model = tiny_model("llama")
    extra = nn.Linear(16, 3)  # registered, never called
    model.add_module("unused_head", extra)
    cap = OnePassCapture(model, 2)
    sink = _RecordingSink(cap)
    cap.stream_to(sink)
    onepass_grads(model, batch(2), _labels("shared", 2, 2), "shared", cap=cap)
    unused = [i for i, (n, _) in enumerate(cap.parameters) if n.startswith("unused_head")]
    assert sink.order[-len(unused):] == unused and not any(sink.in_backward[-len(unused):])
    assert all(float(sink.grads[i].abs().sum()) == 0 for i in unused)


def test_streaming_keeps_only_parameters_in_flight() -> None:
    """The capture's peak of held (K, numel) buffers is a small part of K full gradients (6 layers, untied)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).train()
    k = 4
    full = k * 4 * sum(p.numel() for p in model.parameters())
    data, labels = batch(2, vocab=64), _labels("shared", k, 2)
    held = {}
    for streaming in (False, True):
        cap = OnePassCapture(model, k)
        if streaming:
            cap.stream_to(_RecordingSink(cap))
        onepass_grads(model, data, labels, "shared", cap=cap)
        held[streaming] = cap.peak_buffer_bytes
        cap.remove()
    largest = k * 4 * max(p.numel() for p in model.parameters())
    assert held[False] == full  # the non-streaming capture holds K full gradients
    assert held[True] <= 2 * largest < full / 4, (held, full, largest)


def test_a_nan_row_makes_only_the_objectives_scoring_it_nan() -> None:
    """NaN logits in one row (objective 0's): objective 0's gradient is NaN (the hook skips the step and names
    it), objective 1's equals its own K-pass gradient, as when each objective runs its own forward."""
    model, data = tiny_model("llama"), batch(2)  # rows 0, 2: objective 0's pair; rows 1, 3: objective 1's
    owner = torch.tensor([0, 1, 0, 1])

    def poison_row_0(module, args, output):
        return output.index_fill(0, torch.tensor([0]), float("nan"))

    def losses_of(logps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([logps[rows == k].mean() for k in range(2)])

    own = {key: value[owner == 1] for key, value in data.items()}  # objective 1 alone: no NaN row
    params = [(n, p) for n, p in model.named_parameters()]
    clean = torch.autograd.grad(row_logps(model, own).mean(), [p for _, p in params])
    handle = model.get_input_embeddings().register_forward_hook(poison_row_0)
    cap = OnePassCapture(model, 2, verify=False)  # the check's own batch would be NaN too (inconclusive)
    with cap.record():
        logps = row_logps(model, data)
        cap.backward(logps.sum(), coefficients_from_losses(logps, losses_of(logps, owner)))
    handle.remove()
    assert cap.nonfinite_objectives == [0]
    got = cap.gradients()
    for (name, _), reference in zip(params, clean):
        assert torch.isnan(got[name][0]).all(), name
        assert torch.allclose(got[name][1], reference, rtol=1e-4, atol=1e-7), name
