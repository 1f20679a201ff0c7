"""Hugging Face <-> megatron-core GPTModel weights for Llama-architecture models (Llama, Qwen2, Mistral).

Start a Megatron run from a pretrained HF model and end it as one::

    spec = config_from_hf("path/to/hf_folder", tensor_parallel=2, pipeline_parallel=2)
    model = spec.build_model()                      # this rank's stage, TP shard (local layer spec)
    load_hf_into_megatron([model], "path/to/hf_folder")
    ...                                             # DDP, optimizer, training
    export_megatron_to_hf([ddp], "out/export", spec.hf_config, tokenizer="path/to/hf_folder")

Why not megatron-bridge (checked: 0.6.2 and 0.3.1 wheels, the only ones on the
index): 0.6.2 requires Python 3.12 and ``transformers<=5.12.1``, and pulls
``flashinfer-python``, ``nvidia-resiliency-ext`` and ``megatron-core[dev,mlm]``;
0.3.1 requires ``transformer-engine[core_cu13]`` and ``transformers<5``. Neither
installs beside this project (Python 3.11, transformers 5.x, CPU tests). The
layout rules below are the same ones megatron-bridge's ``merge_qkv_weights``
and gated-MLP mapping implement.

Layout rules. A Megatron tensor-parallel parameter is split into equal slices
along its ``partition_dim`` (0 for column-parallel, 1 for row-parallel); this
module builds the *full* tensor in the layout whose equal slices are the TP
shards, so loading is "convert, then take slice r" and export is "gather the
slices, then convert back", whatever the layout:

- ``linear_qkv`` (column-parallel) holds, per query group g, that group's query
  heads, then its key head, then its value head: rows ``[q_g0..q_g(h/G-1), k_g,
  v_g]`` for g = 0..G-1. TP rank r holds groups ``r*G/tp .. (r+1)*G/tp - 1``, so
  ``num_query_groups`` must be divisible by TP. Qwen2's q/k/v biases follow the
  same order.
- ``linear_fc1`` (SwiGLU) holds ``[gate; up]`` *per TP shard*: Megatron chunks a
  shard's output in two (first half through SiLU). The full tensor is
  ``[gate_0; up_0; gate_1; up_1; ...]`` with ``gate_r`` the r-th of tp row slices.
- ``linear_proj`` (o_proj) and ``linear_fc2`` (down_proj) are row-parallel and
  identical to HF (head order is the same: head j belongs to group j // (h/G)).
- Word embeddings and a separate output layer are vocab-parallel (dim 0). The
  vocabulary is padded with zero rows to a multiple of TP when needed (the
  model's own row count decides); export drops the rows again. A padded row's
  logit is 0, which enters the softmax: log-probs then differ from HF's unless
  the padded logits are masked, so prefer a TP that divides the vocabulary.
- Norm weights are copied as they are (replicated across TP). With tied
  embeddings the last pipeline stage's copy of the embedding (``output_layer``,
  marked ``shared``) is loaded from the same HF tensor and not exported twice.

Every Megatron parameter must match exactly one rule and every HF tensor must
be used, or loading/export raises: an unknown module never passes silently.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HFGPTSpec",
    "config_from_hf",
    "export_megatron_to_hf",
    "load_hf_into_megatron",
]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
"""HF ``model_type`` values whose decoder block is the Llama block (RMSNorm, RoPE, GQA, SwiGLU)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- config


def _load_hf_config(hf: str | Path | Any) -> Any:
    if isinstance(hf, (str, Path)):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(hf, local_files_only=True)
    return hf


def _rope(hf_config: Any) -> tuple[float, float | None]:
    """(theta, llama3 scaling factor or None) from transformers 5's ``rope_parameters`` or 4.x's fields."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    # Megatron's llama3 scaling hard-codes these three; only the factor is a GPTModel argument.
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind == "llama3" and all(float(params.get(k, -1)) == v for k, v in fixed.items()):
        return theta, float(params["factor"])
    raise ValueError(
        f"rope scaling {params} is not supported: megatron-core's GPTModel implements only the default RoPE "
        f"and llama3 scaling with {fixed}; convert a model without it or extend raco_ds.megatron.hf._rope"
    )


def _check_architecture(c: Any, tensor_parallel: int) -> None:
    """Refuse what the Llama block of megatron-core would compute differently, naming the field."""
    problems = []
    if c.model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={c.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (the SwiGLU block needs silu)")
    if getattr(c, "mlp_bias", False):
        problems.append("mlp_bias=True (megatron's add_bias_linear would also add an o_proj bias)")
    if c.model_type != "qwen2" and getattr(c, "attention_bias", False):
        problems.append("attention_bias=True on a Llama/Mistral model (it biases o_proj too, unlike Qwen2)")
    if getattr(c, "use_sliding_window", False) or (c.model_type == "mistral" and getattr(c, "sliding_window", None)):
        problems.append("sliding-window attention (set use_sliding_window=False / sliding_window=None if unused)")
    heads, groups = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    if heads % tensor_parallel or groups % tensor_parallel:
        problems.append(
            f"num_attention_heads={heads} and num_key_value_heads={groups} must both be divisible by "
            f"tensor_parallel={tensor_parallel} (Megatron splits whole query groups across TP ranks); "
            f"use a TP in {[t for t in range(1, groups + 1) if heads % t == 0 and groups % t == 0]}"
        )
    if problems:
        raise ValueError("cannot convert this HF model to a megatron-core GPTModel: " + "; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class HFGPTSpec:
    """The megatron-core GPTModel that computes what an HF Llama-architecture model computes."""

    hf_config: Any
    """The HF config it came from (``transformers.PretrainedConfig``); export writes it back."""
    transformer_config: Any
    """``megatron.core.transformer.TransformerConfig`` (RMSNorm eps, SwiGLU, GQA groups, kv_channels, TP/PP)."""
    padded_vocab_size: int
    """HF vocabulary rounded up to a multiple of ``tensor_parallel`` (unchanged when TP divides it)."""
    rotary_base: float
    """RoPE theta."""
    rope_scaling_factor: float | None
    """llama3 RoPE scaling factor, or None for plain RoPE."""
    tie_embeddings: bool
    """HF ``tie_word_embeddings``: the output layer is the input embedding."""

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``GPTModel`` (besides ``pre_process``/``post_process``/``vp_stage``)."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return dict(
            config=self.transformer_config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=self.hf_config.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=self.rotary_base,
            rope_scaling=self.rope_scaling_factor is not None,
            rope_scaling_factor=self.rope_scaling_factor or 8.0,
            share_embeddings_and_output_weights=self.tie_embeddings,
        )

    def build_model(self, *, pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None) -> Any:
        """This rank's GPTModel (stage from ``parallel_state`` unless given), randomly initialised: load next."""
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel

        if pre_process is None:
            pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        if post_process is None:
            post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        model = GPTModel(**self.gpt_model_kwargs(), pre_process=pre_process, post_process=post_process,
                         vp_stage=vp_stage)
        return model.cuda() if torch.cuda.is_available() else model


def config_from_hf(
    hf: str | Path | Any,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    dtype: Literal["fp32", "bf16"] = "fp32",
    **overrides: Any,
) -> HFGPTSpec:
    """The Megatron model spec matching an HF folder or config (``overrides`` go to ``TransformerConfig``).

    Raises ValueError, naming the field, for anything the Llama block would
    compute differently (activation, biases, sliding window, RoPE scaling) or a
    TP that does not divide the heads and query groups.
    """
    from megatron.core.transformer import TransformerConfig

    c = _load_hf_config(hf)
    _check_architecture(c, tensor_parallel)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    theta, scaling = _rope(c)
    heads = c.num_attention_heads
    fields = dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
        num_attention_heads=heads, num_query_groups=c.num_key_value_heads or heads,
        kv_channels=getattr(c, "head_dim", None) or c.hidden_size // heads,
        normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=c.model_type == "qwen2" and bool(getattr(c, "attention_bias", True)),
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=_DTYPES[dtype], pipeline_dtype=_DTYPES[dtype], bf16=dtype == "bf16",
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    # Fields the weights decide (and the parallel sizes, given above) cannot be overridden.
    fixed = sorted(set(overrides) & (set(fields) - {"hidden_dropout", "attention_dropout", "use_cpu_initialization"}))
    if fixed:
        raise ValueError(
            f"config_from_hf: {fixed} follow from the HF config or this function's arguments and cannot be "
            "overridden; pass tensor_parallel/pipeline_parallel/dtype, or edit the HF config"
        )
    fields.update(overrides)
    return HFGPTSpec(
        hf_config=c, transformer_config=TransformerConfig(**fields),
        padded_vocab_size=-(-c.vocab_size // tensor_parallel) * tensor_parallel,
        rotary_base=theta, rope_scaling_factor=scaling, tie_embeddings=bool(c.tie_word_embeddings),
    )


# ----------------------------------------------------------------------------- conversion rules


@dataclass(frozen=True)
class _Geometry:
    """The shapes a rule needs: heads, groups, head size, vocabulary (HF and padded), TP size."""

    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    tp: int

    @classmethod
    def of(cls, hf_config: Any, padded_vocab: int, tp: int) -> _Geometry:
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(heads, hf_config.num_key_value_heads or heads, head_dim, hf_config.vocab_size, padded_vocab, tp)


def _qkv_to_megatron(g: _Geometry, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    per_group = g.heads // g.groups
    rest = q.shape[1:]  # (hidden,) for weights, () for biases
    q = q.reshape(g.groups, per_group * g.head_dim, *rest)
    k = k.reshape(g.groups, g.head_dim, *rest)
    v = v.reshape(g.groups, g.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_to_hf(g: _Geometry, qkv: torch.Tensor) -> list[torch.Tensor]:
    per_group = g.heads // g.groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g.groups, (per_group + 2) * g.head_dim, *rest)
    q, k, v = grouped.split([per_group * g.head_dim, g.head_dim, g.head_dim], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def _fc1_to_megatron(g: _Geometry, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cat(pair) for pair in zip(gate.chunk(g.tp), up.chunk(g.tp))])


def _fc1_to_hf(g: _Geometry, fc1: torch.Tensor) -> list[torch.Tensor]:
    halves = [shard.chunk(2) for shard in fc1.chunk(g.tp)]
    return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


def _pad_vocab(g: _Geometry, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(weight, (0, 0, 0, g.padded_vocab - g.vocab))


def _same(g: _Geometry, t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class _Rule:
    """One Megatron parameter (a regex on its global name) <-> its HF tensors."""

    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[..., torch.Tensor]
    to_hf: Callable[[_Geometry, torch.Tensor], list[torch.Tensor]]


_L = r"decoder\.layers\.(\d+)\."
_HL = "model.layers.{}."
_RULES = (
    _Rule(r"embedding\.word_embeddings\.weight", ("model.embed_tokens.weight",), _pad_vocab,
          lambda g, t: [t[: g.vocab]]),
    _Rule(r"output_layer\.weight", ("lm_head.weight",), _pad_vocab, lambda g, t: [t[: g.vocab]]),
    _Rule(r"decoder\.final_layernorm\.weight", ("model.norm.weight",), _same, lambda g, t: [t]),
    _Rule(_L + r"input_layernorm\.weight", (_HL + "input_layernorm.weight",), _same, lambda g, t: [t]),
    _Rule(_L + r"pre_mlp_layernorm\.weight", (_HL + "post_attention_layernorm.weight",), _same, lambda g, t: [t]),
    _Rule(_L + r"self_attention\.linear_qkv\.weight",
          tuple(_HL + f"self_attn.{p}_proj.weight" for p in "qkv"), _qkv_to_megatron, _qkv_to_hf),
    _Rule(_L + r"self_attention\.linear_qkv\.bias",
          tuple(_HL + f"self_attn.{p}_proj.bias" for p in "qkv"), _qkv_to_megatron, _qkv_to_hf),
    _Rule(_L + r"self_attention\.linear_proj\.weight", (_HL + "self_attn.o_proj.weight",), _same, lambda g, t: [t]),
    _Rule(_L + r"mlp\.linear_fc1\.weight", (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"),
          _fc1_to_megatron, _fc1_to_hf),
    _Rule(_L + r"mlp\.linear_fc2\.weight", (_HL + "mlp.down_proj.weight",), _same, lambda g, t: [t]),
)


def _rule_for(name: str) -> tuple[_Rule, list[str]]:
    """The rule of a global Megatron parameter name and its HF tensor names."""
    for rule in _RULES:
        match = re.fullmatch(rule.megatron, name)
        if match:
            return rule, [h.format(*match.groups()) for h in rule.hf]
    raise ValueError(
        f"no HF mapping for the Megatron parameter {name!r}: raco_ds.megatron.hf converts the Llama block "
        "built by HFGPTSpec (local layer spec, RMSNorm, SwiGLU, no linear biases); build the model with "
        "config_from_hf(...).build_model() or add a rule to raco_ds.megatron.hf._RULES"
    )


def _expected_hf_names(hf_config: Any, qkv_bias: bool) -> set[str]:
    """Every HF tensor name the model must have (``lm_head.weight`` only when untied)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not hf_config.tie_word_embeddings:
        names.add("lm_head.weight")
    per_layer = [h for rule in _RULES if rule.megatron.startswith(_L) for h in rule.hf]
    if not qkv_bias:
        per_layer = [h for h in per_layer if not h.endswith("_proj.bias")]
    for i in range(hf_config.num_hidden_layers):
        names.update(h.format(i) for h in per_layer)
    return names


# ----------------------------------------------------------------------------- walking the model


def _unwrap(chunk: Any) -> Any:
    # DistributedDataParallel and Float16Module keep the GPTModel in ``.module``.
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _global_parameters(model_chunks: Sequence[Any]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of every chunk, layers numbered across pipeline stages from 0."""
    for chunk in model_chunks:
        model = _unwrap(chunk)
        for name, param in model.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                # Stages number their layers locally from 0; layer_number is global and 1-based.
                parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
            yield ".".join(parts), param


def _check_layer_count(model_chunks: Sequence[Any], hf_config: Any) -> None:
    """A model with fewer layers than the HF config would load (and export) part of it without an error."""
    for chunk in model_chunks:
        layers = _unwrap(chunk).config.num_layers
        if layers != hf_config.num_hidden_layers:
            raise ValueError(
                f"the Megatron model has num_layers={layers}, the HF config num_hidden_layers="
                f"{hf_config.num_hidden_layers}; build it with config_from_hf(...).build_model()"
            )


def _tp() -> tuple[int, int, Any]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _is_tp_split(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _padded_vocab(model_chunks: Sequence[Any], tp: int, fallback: int) -> int:
    """The vocabulary the model was built with: its (vocab-parallel) embedding or output rows times TP."""
    for name, param in _global_parameters(model_chunks):
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return param.shape[0] * tp
    return fallback  # a middle pipeline stage: no vocabulary-sized parameter here


# ----------------------------------------------------------------------------- HF -> Megatron


class _SafetensorsFolder:
    """Read tensors by name from an HF folder's ``model.safetensors`` or its sharded index.

    ``files`` maps a name to (file, name stored in that file): an alias reads another stored tensor.
    """

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: (folder / file, name) for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.files = {name: (folder / "model.safetensors", name) for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{folder} has no model.safetensors or model.safetensors.index.json; re-save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, stored = self.files[name]
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(stored)


def load_hf_into_megatron(model_chunks: Sequence[Any], hf_path: str | Path) -> None:
    """Copy an HF folder's weights into this rank's Megatron model chunks (its TP slice of its stages).

    Call it on every rank after building the chunks (``HFGPTSpec.build_model``)
    and before building the optimizer: a distributed optimizer copies the model
    parameters into its fp32 main parameters when it is built (otherwise call
    its ``reload_model_params()`` afterwards). Each rank reads only the tensors
    its parameters need, one at a time. Needs megatron's ``parallel_state``
    initialised with the chunks' TP size.
    """
    hf_path = Path(hf_path)
    hf_config = _load_hf_config(hf_path)
    # The weights alone cannot show an activation or bias the Llama block lacks; TP divisibility
    # shows as a shape mismatch below.
    _check_architecture(hf_config, tensor_parallel=1)
    folder = _SafetensorsFolder(hf_path)
    qkv_bias = any(name.endswith("self_attn.q_proj.bias") for name in folder.files)
    expected = _expected_hf_names(hf_config, qkv_bias)
    present = set(folder.files)
    if hf_config.tie_word_embeddings and "model.embed_tokens.weight" not in present and "lm_head.weight" in present:
        # safetensors' save_model keeps one name of a tied pair, sometimes lm_head's.
        folder.files["model.embed_tokens.weight"] = folder.files["lm_head.weight"]
        present = present - {"lm_head.weight"} | {"model.embed_tokens.weight"}
    if hf_config.tie_word_embeddings:
        present.discard("lm_head.weight")
    if present != expected:
        raise ValueError(
            f"{hf_path}: the weights do not match the Llama block of its config: missing "
            f"{sorted(expected - present)[:5]}, unused {sorted(present - expected)[:5]}"
        )
    _check_layer_count(model_chunks, hf_config)
    tp, tp_rank, _ = _tp()
    geometry = _Geometry.of(hf_config, _padded_vocab(model_chunks, tp, hf_config.vocab_size), tp)
    with torch.no_grad():
        for name, param in _global_parameters(model_chunks):
            rule, hf_names = _rule_for(name)
            if rule.megatron.startswith("output_layer") and hf_config.tie_word_embeddings:
                hf_names = ["model.embed_tokens.weight"]  # the last stage's copy of tied embeddings
            full = rule.to_megatron(geometry, *(folder.get(h) for h in hf_names))
            local = full.chunk(tp, dim=param.partition_dim)[tp_rank] if _is_tp_split(param) else full
            if local.shape != param.shape:
                raise ValueError(
                    f"{name}: the HF weights give shape {tuple(local.shape)} on TP rank {tp_rank}, the model has "
                    f"{tuple(param.shape)}; build the model with config_from_hf({str(hf_path)!r}, "
                    f"tensor_parallel={tp}).build_model()"
                )
            param.copy_(local)


# ----------------------------------------------------------------------------- Megatron -> HF


def _stage_hf_tensors(model_chunks: Sequence[Any], hf_config: Any) -> dict[str, torch.Tensor]:
    """This stage's parameters as HF tensors (on CPU) on TP rank 0; every TP rank takes part in the gathers."""
    tp, tp_rank, tp_group = _tp()
    geometry = _Geometry.of(hf_config, _padded_vocab(model_chunks, tp, hf_config.vocab_size), tp)
    out: dict[str, torch.Tensor] = {}
    for name, param in _global_parameters(model_chunks):
        rule, hf_names = _rule_for(name)
        if rule.megatron.startswith("output_layer") and hf_config.tie_word_embeddings:
            continue  # the tied copy: HF stores the embedding once
        data = param.detach()
        if _is_tp_split(param) and tp > 1:
            pieces = [torch.empty_like(data) for _ in range(tp)]
            dist.all_gather(pieces, data.contiguous(), group=tp_group)
            data = torch.cat(pieces, dim=param.partition_dim)
        if tp_rank == 0:
            out.update(zip(hf_names, (t.cpu().clone() for t in rule.to_hf(geometry, data))))
    return out


def _gather_on_rank0(mine: dict[str, torch.Tensor], listing: list[list[tuple]]) -> dict[str, torch.Tensor]:
    """All ranks' tensors on global rank 0 (point-to-point, one tensor at a time); {} elsewhere.

    ``listing[r]``: rank r's (name, shape, dtype) entries, in the order rank r holds them.
    """
    rank = dist.get_rank()
    # NCCL sends only device tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    full = dict(mine) if rank == 0 else {}
    for owner in range(1, len(listing)):
        for name, shape, dtype in listing[owner]:
            if rank == owner:
                dist.send(mine[name].to(device), dst=0)
            elif rank == 0:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buffer, src=owner)
                full[name] = buffer.cpu()
    return full


def export_megatron_to_hf(
    model_chunks: Sequence[Any],
    out_dir: str | Path,
    hf_config: str | Path | Any,
    *,
    tokenizer: str | Path | Any | None = None,
    max_shard_size: str = "5GB",
) -> Path | None:
    """Write the Megatron model as an HF folder (safetensors + config) on global rank 0; call on every rank.

    ``hf_config``: the HF config (or folder) the model was converted from; it
    is written with ``dtype`` set to the parameters' dtype. ``tokenizer``: a
    folder or tokenizer object saved beside the weights (``launchers/eval.py``
    and ``launchers/sweep.py`` load both from the folder); its generation
    config is copied when the folder has one. TP shards are gathered within
    each stage on data-parallel rank 0 and sent to global rank 0, which writes
    the folder atomically. Exports the model parameters (bf16 ones for a bf16
    run), not the optimizer's fp32 main parameters. Returns the folder on rank
    0, None elsewhere.
    """
    from huggingface_hub import save_torch_state_dict
    from megatron.core import parallel_state as ps

    from raco_ds.diskcache import atomic_directory

    config = _load_hf_config(hf_config)
    tp, _, _ = _tp()
    _check_architecture(config, tp)
    _check_layer_count(model_chunks, config)
    # Data-parallel replicas are identical; only replica 0 of each (TP, PP) position contributes.
    on_replica0 = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    mine = _stage_hf_tensors(model_chunks, config) if on_replica0 else {}
    listing: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(listing, [(n, tuple(t.shape), t.dtype) for n, t in mine.items()])
    # Checked on every rank, before any transfer, so that a bad model fails everywhere instead of hanging.
    names = [entry[0] for entries in listing for entry in entries]
    expected = _expected_hf_names(config, any(n.endswith("self_attn.q_proj.bias") for n in names))
    if sorted(names) != sorted(expected):
        raise RuntimeError(
            f"export collected the wrong tensors: missing {sorted(expected - set(names))[:5]}, extra or "
            f"repeated {sorted(n for n in set(names) if n not in expected or names.count(n) > 1)[:5]}"
        )
    state = _gather_on_rank0(mine, listing)
    written = None
    if dist.get_rank() == 0:
        written = Path(out_dir)
        if written.exists():
            raise FileExistsError(f"{written} exists; export into a new folder (or remove it first)")
        with atomic_directory(written) as tmp:
            save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
            config = copy.deepcopy(config)
            config.dtype = next(iter(state.values())).dtype
            config.save_pretrained(tmp)
            _save_tokenizer(tokenizer, tmp)
    dist.barrier()
    return written


def _save_tokenizer(tokenizer: str | Path | Any | None, folder: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        source = Path(tokenizer)
        if (source / "generation_config.json").is_file():
            shutil.copy(source / "generation_config.json", folder / "generation_config.json")
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.save_pretrained(folder)
