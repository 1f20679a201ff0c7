"""The one-pass zoo: every transformers causal-LM type built from a tiny config, classified.

A helper module (not collected as tests): ``tests/test_onepass_zoo.py`` asserts on it and
``benchmarks/onepass_zoo.py`` prints its table.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny config is made
generically (:func:`tiny_config`: every size-like argument its config class accepts is
set small, dropout 0, eager attention), the model is built, and one-pass capture is
classified (:func:`classify`) on one short batch of 3 DPO pairs (6 rows of 10 tokens,
right padded) with K = 2 objectives on shared pairs:

- ``exact``: construction succeeds, the one-pass gradients equal K = 2 separate
  backwards to a relative error <= :data:`EXACT_TOL` per parameter and objective, and
  :meth:`OnePassCapture.self_check` passes;
- ``refused``: :class:`UnsupportedModuleError` at construction;
- ``stopped``: the gradients differ and the self-check fails (or the capture pass raises
  a one-pass error: a clear stop before any optimizer step);
- ``SILENTLY WRONG``: the gradients differ and the self-check passes;
- ``FALSE ALARM``: the gradients are exact and the self-check fails;
- ``does not build``: the tiny config, the model, or its plain forward/backward fails
  (nothing to do with one-pass capture).

A refusal of an architecture in :data:`PINNED_EXACT` is a false alarm as well (the
tests check that separately: those must stay exact). For a refused model the zoo also
freezes the refused parameters (what the error message suggests) and classifies the
rest (``frozen_outcome``): a user who follows that advice must never get silently wrong
gradients either.
"""

from __future__ import annotations

import inspect
import re
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from raco_ds.losses import losses_from_margins, margin_jacobian
from raco_ds.onepass import OnePassCapture, UnsupportedModuleError, shared_pair_coefficients

EXACT = "exact"
REFUSED = "refused"
STOPPED = "stopped"
SILENT = "SILENTLY WRONG"
FALSE_ALARM = "FALSE ALARM"
NO_BUILD = "does not build"
OUTCOMES = (EXACT, REFUSED, STOPPED, SILENT, FALSE_ALARM, NO_BUILD)

EXACT_TOL = 1e-4
"""Largest relative error (per parameter and objective) against K separate backwards called exact."""

K = 2
PAIRS = 3  # R = 6 rows: no tiny size below equals 6, so nothing is "rows" by coincidence
SEQ = 10
VOCAB = 96
MAX_PARAMS = 4_000_000
BETA = 0.2

PINNED_EXACT = (
    "gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox",
    "stablelm", "olmo2",
)  # fmt: skip
"""Architectures named in issue 14 that must stay exact (tests add every other type exact today)."""

# Size-like config arguments and their tiny values (set only where the config class accepts them).
_TINY: dict[str, object] = {
    # widths
    "hidden_size": 32, "n_embd": 32, "d_model": 32, "n_embed": 32, "embed_dim": 32, "word_embed_proj_dim": 32,
    "embedding_size": 32, "hidden_dim": 32, "model_dim": 32, "d_embed": 32,
    # feed-forward
    "intermediate_size": 48, "ffn_dim": 48, "n_inner": 48, "decoder_ffn_dim": 48, "encoder_ffn_dim": 48,
    "d_ff": 48, "ffn_hidden_size": 48, "dim_ff": 48, "filter_size": 48, "inner_size": 48,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "expert_intermediate_size": 16,
    "mlp_hidden_size": 48, "ff_intermediate_size": 48,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "encoder_layers": 2, "num_decoder_layers": 2, "num_encoder_layers": 2,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2,
    "num_kv_heads": 2, "multi_query_group_num": 2, "head_dim": 8, "attention_head_dim": 8, "kv_channels": 8,
    "global_head_dim": 8, "local_head_dim": 8,
    # multi-head latent attention
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "qk_head_dim": 8,
    # vocab and positions
    "rotary_dim": 8, "emb_dim": 32, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_seq_len": 64,
    "max_sequence_length": 64, "seq_length": 64, "max_length": 64,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "n_shared_experts": 1, "num_shared_experts": 1, "first_k_dense_replace": 1,
    # state-space / recurrent blocks
    "state_size": 4, "ssm_state_size": 4, "mamba_d_state": 4, "time_step_rank": 4, "mamba_n_heads": 4,
    "mamba_d_head": 16, "mamba_n_groups": 1, "n_groups": 1, "mamba_expand": 2, "expand": 2,
    "mamba_dt_rank": 4, "lru_width": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    # token ids inside the tiny vocab
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "dropout": 0.0,
}  # fmt: skip
_NONE_IF_LIST = ("layer_types", "block_types", "layers_block_type", "mlp_layer_types", "attn_layer_indices",
                 "layers_block_types", "hybrid_override_pattern")  # derived from the depth when None
_DROPOUT = re.compile(r"(dropout|pdrop|drop_rate|dropout_rate|dropout_prob)")


def _arguments(config_cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(config_cls.__init__).parameters)


def tiny_kwargs(config_cls: type, depth: int = 0) -> dict[str, object]:
    """Keyword arguments that make ``config_cls`` tiny (sub-configs as dicts, recursively)."""
    args = _arguments(config_cls)
    kwargs: dict[str, object] = {}
    for name, param in args.items():
        if name in _TINY:
            kwargs[name] = _TINY[name]
        elif _DROPOUT.search(name) and isinstance(param.default, float):
            kwargs[name] = 0.0
        elif name in _NONE_IF_LIST:
            kwargs[name] = None
    if "qk_rope_head_dim" in args and "head_dim" in args:  # multi-head latent attention: rope width
        kwargs["head_dim"] = _TINY["qk_rope_head_dim"]
    if "attention_types" in args:  # GPT-Neo: one entry per layer
        kwargs["attention_types"] = [[["global", "local"], 1]]
    sub = getattr(config_cls, "sub_configs", None) or {}
    if depth < 3:
        for name, sub_cls in sub.items():
            if name in args and isinstance(sub_cls, type):
                kwargs[name] = tiny_kwargs(sub_cls, depth + 1)
    return kwargs


def _finish_config(config, seen: set[int] | None = None) -> None:
    """Eager attention, no cache, dropout 0 on the built config and its sub-configs."""
    from transformers import PretrainedConfig

    seen = seen if seen is not None else set()
    if id(config) in seen:
        return
    seen.add(id(config))
    config._attn_implementation = "eager"
    config.use_cache = False
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _finish_config(value, seen)
        elif isinstance(value, float) and _DROPOUT.search(key):
            setattr(config, key, 0.0)


def tiny_config(model_type: str):
    """The tiny config of ``model_type`` (raises when the config class refuses the tiny sizes)."""
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_cls(**tiny_kwargs(config_cls))
        _tiny_sub_configs(config)
    _finish_config(config)
    return config


def _tiny_sub_configs(config, depth: int = 0) -> None:
    """Rebuild tiny every sub-config that construction left at its default sizes (not declared in sub_configs)."""
    from transformers import PretrainedConfig

    for key, value in list(vars(config).items()):
        if not isinstance(value, PretrainedConfig) or depth > 2:
            continue
        big = any(isinstance(getattr(value, n, None), int) and isinstance(v, int) and getattr(value, n) > 4 * v
                  for n, v in _TINY.items() if n not in ("pad_token_id", "bos_token_id", "eos_token_id"))
        if big:
            try:
                value = type(value)(**tiny_kwargs(type(value)))
                setattr(config, key, value)
            except Exception:  # noqa: BLE001 - leave it; the size guard in build() decides
                pass
        _tiny_sub_configs(value, depth + 1)


def model_class(model_type: str) -> type:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build(model_type: str, *, checkpointing: bool = False, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model of ``model_type`` in train mode (fp32), 1-D parameters perturbed.

    Raises whatever the config or the model raises; with ``checkpointing``, a model that
    does not support (non-reentrant) activation checkpointing raises ``ValueError``.
    """
    from raco_ds.models import enable_activation_checkpointing

    config = tiny_config(model_type)
    cls = model_class(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(config).parameters())
        if size > MAX_PARAMS:
            raise ValueError(f"{size / 1e6:.1f}M parameters from the tiny config: not tiny")
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32)
    with torch.no_grad():  # non-trivial norm weights and biases, so that their rules are really tested
        gen = torch.Generator().manual_seed(seed + 1)
        for _, p in model.named_parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.train()
    if checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{model_type} does not support activation checkpointing")
        enable_activation_checkpointing(model)
    return model


def batch(vocab: int, *, pairs: int = PAIRS, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """2 * ``pairs`` rows (A responses then B responses), a 4-token prompt, right padding with id 0."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    ids = torch.randint(3, vocab, (rows, seq), generator=gen)
    lengths = torch.randint(seq - 3, seq + 1, (rows,), generator=gen)
    lengths[0] = seq
    attention = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.where(attention.bool(), ids, torch.zeros_like(ids))
    response = attention.bool() & (torch.arange(seq).unsqueeze(0) >= 4)
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def row_logps(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs per row (R,); the RNG is reseeded first, so every pass draws the same
    randomness (PhiMoE's router samples in training mode)."""
    ids = data["input_ids"]
    torch.manual_seed(0)
    out = model(input_ids=ids, attention_mask=data["attention_mask"], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} for input ids {tuple(ids.shape)}")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * data["response_mask"][:, 1:]).sum(-1)


def labels(k: int = K, pairs: int = PAIRS, seed: int = 3) -> torch.Tensor:
    """(K, B) preference labels in {-1, 0, 1}, every objective with a non-tie pair."""
    gen = torch.Generator().manual_seed(seed)
    lab = torch.randint(-1, 2, (k, pairs), generator=gen)
    lab[:, 0] = 1
    lab[1, 1] = -1
    return lab


def margins(logps: torch.Tensor, pairs: int, seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ref = -30.0 + torch.randn(2 * pairs, generator=gen)
    return (logps[:pairs] - ref[:pairs]) - (logps[pairs:] - ref[pairs:])


def reference_grads(model: nn.Module, data, lab: torch.Tensor) -> dict[str, torch.Tensor]:
    """K separate backwards through plain autograd: {name: (K, *shape)} (zeros where unused)."""
    pairs = lab.shape[1]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses = losses_from_margins(margins(row_logps(model, data), pairs), lab, beta=BETA)
    out: dict[str, list[torch.Tensor]] = {n: [] for n, _ in params}
    for k in range(lab.shape[0]):
        grads = torch.autograd.grad(losses[k], [p for _, p in params], retain_graph=k + 1 < lab.shape[0],
                                    allow_unused=True)  # fmt: skip
        for (n, p), g in zip(params, grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def onepass_grads(cap: OnePassCapture, model: nn.Module, data, lab: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward and one backward through ``cap`` (shared pairs): {name: (K, *shape)}."""
    pairs = lab.shape[1]
    cap.zero()
    with cap.record():
        m = margins(row_logps(model, data), pairs)
        cap.backward(m.sum(), shared_pair_coefficients(margin_jacobian(m, lab, beta=BETA)))
    return cap.gradients()


def max_rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest per-parameter, per-objective relative error, and where.

    Relative to the parameter's own reference gradient, floored at 1e-4 of objective k's whole
    gradient norm: a gradient that is zero in exact arithmetic (an attention key bias, which
    softmax ignores) or ~1e-8 of the total (a gated-delta-net gate projection) is fp32 noise on
    both sides, not a mismatch. With the 1e-4 tolerance, exact therefore means: every
    parameter within 1e-4 of its own gradient or within 1e-8 of the whole gradient.
    """
    worst, where = 0.0, ""
    missing = sorted(set(ref) ^ set(got))
    if missing:
        return float("inf"), f"parameter sets differ: {missing[:3]}"
    num_k = next(iter(ref.values())).shape[0]
    totals = [sum(float(r[k].double().pow(2).sum()) for r in ref.values()) ** 0.5 for k in range(num_k)]
    for name in ref:
        for k in range(num_k):
            r, g = ref[name][k].double(), got[name][k].double()
            denom = max(r.norm().item(), 1e-4 * totals[k], 1e-30)
            err = (g - r).norm().item() / denom
            if not err <= worst:
                worst, where = err, f"{name}[k={k}]"
    return worst, where


@dataclass
class ZooResult:
    """One model type's outcome."""

    arch: str
    outcome: str
    detail: str = ""
    error: float | None = None
    """Largest relative error of the one-pass gradients against K separate backwards."""
    check_error: float | None = None
    """Largest relative error the self-check saw."""
    frozen_outcome: str | None = None
    """For a refused model: the outcome with the refused parameters frozen."""
    frozen_detail: str = ""
    seconds: float = 0.0


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_onepass_error(exc: BaseException) -> bool:
    """An error the capture raises on purpose (a clear stop), not an incidental crash."""
    from raco_ds.onepass import FusedKernelError, OnePassMismatchError

    if isinstance(exc, (FusedKernelError, OnePassMismatchError, UnsupportedModuleError)):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("one-pass capture")


_REFUSED_PARAM = re.compile(r"module '([^']*)'")


def _freeze_refused(model: nn.Module, limit: int = 64) -> tuple[OnePassCapture | None, list[str], str]:
    """Freeze the parameters of each module construction refuses until it accepts: (capture, frozen, last error)."""
    modules = dict(model.named_modules())
    frozen: list[str] = []
    for _ in range(limit):
        try:
            return make_capture(model), frozen, ""
        except UnsupportedModuleError as exc:
            match = _REFUSED_PARAM.search(str(exc))
            name = match.group(1) if match else None
            if name is None:
                for mname, mod in modules.items():  # messages naming the module without quotes
                    if mname and f"module {mname} " in str(exc):
                        name = mname
                        break
            if name is None or name not in modules and name != type(model).__name__:
                return None, frozen, _short(exc)
            mod = modules.get(name, model)
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(f"{name}.{pname}" if name else pname)
    return None, frozen, "too many refused modules"


def _compare(model: nn.Module, cap: OnePassCapture, data, lab, ref=None) -> tuple[str, str, float | None, float | None]:
    """(outcome, detail, error vs K backwards, self-check error) of a constructed capture."""
    if ref is None:
        ref = reference_grads(model, data, lab)
    try:
        got = onepass_grads(cap, model, data, lab)
    except Exception as exc:  # noqa: BLE001 - classified
        if _is_onepass_error(exc):
            return STOPPED, "capture pass: " + _short(exc), None, None
        return STOPPED, "capture pass crashed (not a one-pass error): " + _short(exc), None, None
    err, where = max_rel_err(got, ref)
    try:
        check = cap.self_check(lambda: row_logps(model, data))
    except Exception as exc:  # noqa: BLE001 - classified
        if err <= EXACT_TOL:
            return FALSE_ALARM, f"exact (err {err:.1e}) but the self-check raised: " + _short(exc), err, None
        return STOPPED, f"err {err:.1e} at {where}; self-check raised " + _short(exc), err, None
    check_err = float(check.errors.max()) if check.errors.numel() else 0.0
    if err <= EXACT_TOL:
        if check.passed:
            return EXACT, "", err, check_err
        return FALSE_ALARM, f"exact (err {err:.1e}) but self-check failed: {check.describe(3)}", err, check_err
    if check.passed:
        return SILENT, f"err {err:.2e} at {where}, self-check passed (largest {check_err:.1e})", err, check_err
    return STOPPED, f"err {err:.1e} at {where}; self-check: {check.describe(2)[:200]}", err, check_err


def classify(model_type: str, *, checkpointing: bool = False, thorough: bool = True) -> ZooResult:
    """Build ``model_type`` tiny and classify one-pass capture on it (see the module docstring).

    ``thorough=False`` (the tests): a refused model is not run at all (a model whose plain
    forward fails then counts as refused, not as "does not build"), and its refused
    parameters are not frozen and retried.
    """
    started = time.perf_counter()
    result = _classify(model_type, checkpointing, thorough)
    result.seconds = time.perf_counter() - started
    return result


def make_capture(model: nn.Module, k: int = K) -> OnePassCapture:
    """A capture without its automatic first-pass check where it has one (the zoo calls self_check itself)."""
    if "verify" in inspect.signature(OnePassCapture.__init__).parameters:
        return OnePassCapture(model, k, verify=False)
    return OnePassCapture(model, k)


def _classify(model_type: str, checkpointing: bool, thorough: bool) -> ZooResult:
    try:
        model = build(model_type, checkpointing=checkpointing)
        vocab = model.get_input_embeddings().weight.shape[0]
        data = batch(min(vocab, VOCAB))
        lab = labels()
    except Exception as exc:  # noqa: BLE001 - classified
        return ZooResult(model_type, NO_BUILD, _short(exc))

    reference: dict[str, torch.Tensor] = {}

    def runs() -> str | None:
        """None when the plain model runs forward and backward (its K gradients kept), else why not."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference.update(reference_grads(model, data, lab))
            return None
        except Exception as exc:  # noqa: BLE001 - classified
            return _short(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cap = make_capture(model)
        except UnsupportedModuleError as exc:
            result = ZooResult(model_type, REFUSED, _short(exc, 220))
            if model_type in PINNED_EXACT:
                result.outcome = FALSE_ALARM
                result.detail = "pinned exact but refused: " + result.detail
            if not thorough:
                return result
            why = runs()
            if why is not None and result.outcome == REFUSED:
                return ZooResult(model_type, NO_BUILD, why)
            cap, frozen, why = _freeze_refused(model)
            if cap is None:
                result.frozen_outcome, result.frozen_detail = NO_BUILD, f"could not freeze: {why}"
            else:
                outcome, detail, _, _ = _compare(model, cap, data, lab)
                result.frozen_outcome = outcome
                result.frozen_detail = f"froze {len(frozen)} ({', '.join(frozen[:3])}...)" + (
                    f"; {detail}" if detail else "")  # fmt: skip
                cap.remove()
            return result
        except Exception as exc:  # noqa: BLE001 - construction crashed without a one-pass error
            why = runs()
            if why is not None:
                return ZooResult(model_type, NO_BUILD, why)
            return ZooResult(model_type, STOPPED, "construction crashed: " + _short(exc))
        why = runs()
        if why is not None:
            cap.remove()
            return ZooResult(model_type, NO_BUILD, why)
        outcome, detail, err, check_err = _compare(model, cap, data, lab, reference)
        cap.remove()
    return ZooResult(model_type, outcome, detail, err, check_err)


def run_zoo(types: list[str] | None = None, *, checkpointing: bool = False, thorough: bool = True,
            progress=None) -> list[ZooResult]:  # fmt: skip
    """Classify every model type (or ``types``); ``progress(result)`` is called after each.

    Runs single-threaded (restored after): tiny models gain nothing from intra-op threads, and on a
    small shared CPU the threads' contention costs several times the work.
    """
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model_type in types if types is not None else all_model_types():
            result = classify(model_type, checkpointing=checkpointing, thorough=thorough)
            if progress is not None:
                progress(result)
            results.append(result)
    finally:
        torch.set_num_threads(threads)
    return results


def counts(results: list[ZooResult]) -> dict[str, int]:
    return {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
