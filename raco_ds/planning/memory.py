"""Per-GPU memory model of a raco_ds job: DeepSpeed's model states, RACO's K shards, activations.

One module, used by ``launchers/plan.py`` (the preflight check that refuses a
job that cannot fit) and by ``benchmarks/project.py`` (the 70B projection), so
the two never disagree.

What is counted, per GPU (bytes; P = parameters, N = world size, K = objectives,
b = rows per micro-batch, s = sequence length, h = hidden size, f = MLP size,
a = attention heads, kv = key/value width, V = vocabulary, L = layers):

Model states, exactly as DeepSpeed 0.19's own estimators count them
(``estimate_zero3_model_states_mem_needs`` and
``estimate_zero2_model_states_mem_needs``; a test keeps the two equal):

====================  =====================  ==========================  =========
term                  ZeRO-3                 ZeRO-2                      offloaded
====================  =====================  ==========================  =========
bf16 parameters       2P/N                   2P                          Z3 param offload: host
gathered params       4 x largest module     --                          stays on GPU
gradients             4P/N (fp32 accum)      (2 + 4)P/N (bf16 + fp32)    host
fp32 master weights   4P/N                   4P/N                        host
Adam m and v          8P/N                   8P/N                        host
====================  =====================  ==========================  =========

ZeRO-3's 18P/N is 2 + 4 + 4 + 8 with ``grad_accum_dtype`` fp32 (what the
raco_ds configs set); with bf16 accumulation the gradient partition is 2P/N.
ZeRO-1 under bf16 runs DeepSpeed's ``BF16_Optimizer``, which keeps the full
fp32 gradient on every rank (HOOKS.md): 2P + 4P + 12P/N; DeepSpeed has no
ZeRO-1 estimator to compare with.

Added by raco_ds and the run (not in DeepSpeed's estimator):

- RACO shards: K x P/N x (bytes of ``grad_accum_dtype``) -- one captured
  gradient partition per objective; on the host when the optimizer is offloaded
  (the engine's partition lives there, HOOKS.md).
- Frozen reference model for DPO, when resident: partitioned like the policy
  under ZeRO-3 (2P/N), replicated under ZeRO-1/2 (2P). 0 when log-probs of the
  reference are precomputed (``reference="cached"``) or with LoRA (the base
  with adapters disabled is the reference).
- LoRA (``lora_rank`` r > 0): gradients, fp32 master weights, Adam states, the
  RACO shards and the step workspace scale with the T adapter parameters
  (:meth:`ModelShape.lora_params`) instead of P; the bf16 parameters are P + T.
- ZeRO-3 optimizer-step workspace: ``step()`` flattens a sub-group's gradient
  into a fresh fp32 tensor (stage3.py:2686), min(sub_group_size, P/N) x 4.
- Activations, bf16, per decoder layer of a Llama-shaped model (HF
  implementation; :func:`activation_bytes_per_layer` derives it):
  ``s*b*(18h + 6kv + 8f)`` plus the attention core, ``4*a*s*b`` with
  flash-attention (fp32 log-sum-exp) or ``6*a*s^2*b`` with eager attention
  (fp32 softmax output + bf16 copy). With activation checkpointing only each
  layer's bf16 input stays (``2*s*b*h`` per layer) plus one layer recomputed
  in full during backward.
- Logits: ``s*b*V*14`` by default -- bf16 logits (2), their fp32 copy (4), the
  fp32 log-softmax output saved for backward (4), and its fp32 gradient (4).
  A trainer with chunked or fused log-prob kernels needs less: set
  ``logit_bytes_per_element``.
- A fixed reserve (default 3 GiB: CUDA context, NCCL buffers, cuBLAS
  workspaces -- memory torch's allocator never sees) and a fragmentation
  margin (default 10 % of everything else: the caching allocator's
  rounding and free-but-unusable blocks; 5-15 % is what large ZeRO-3 runs show).

Host memory per node (reported; checked when ``host_memory_gib`` is given):
offloaded model states are 16P/nodes (fp32 master, Adam m/v, fp32 gradient),
18P/nodes with parameter offload, times DeepSpeed's own
``additional_buffer_factor`` 1.5 (its estimator's margin for pinned buffers),
plus the K shards on the host.

Not modelled: pipeline/tensor parallelism, MoE, CPU-side data loading, and
transient peaks inside single kernels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "GIB",
    "PRESETS",
    "JobShape",
    "MemoryPlan",
    "ModelShape",
    "activation_bytes_per_layer",
    "activation_bytes",
    "logits_bytes",
    "plan_memory",
    "suggest_fixes",
]

GIB = 1 << 30
"""Bytes in a GiB (all memory in this module is reported in GiB)."""

# DeepSpeed's estimators multiply host memory by this "additional_buffer_factor" (its default).
_DS_HOST_BUFFER_FACTOR = 1.5

_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A decoder-only, Llama-shaped transformer (Llama 2/3, Mistral, Qwen2 style)."""

    name: str
    """Label used in reports."""
    hidden_size: int
    """h: model width."""
    num_layers: int
    """L: decoder layers."""
    num_heads: int
    """a: query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention); equals num_heads without GQA."""
    intermediate_size: int
    """f: SwiGLU MLP width (gate, up and down projections)."""
    vocab_size: int
    """V: vocabulary (embedding rows and LM-head outputs)."""
    tie_embeddings: bool = False
    """True when the LM head shares the embedding matrix (counted once)."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Llama ``attention_bias``; always on in Qwen2)."""
    o_bias: bool = False
    """Bias on the output projection (Llama ``attention_bias``; off in Qwen2)."""
    mlp_bias: bool = False
    """Biases on the gate/up/down projections (Llama ``mlp_bias``)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def dim_per_head(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_width(self) -> int:
        """Output width of the query projection (num_heads x head width)."""
        return self.num_heads * self.dim_per_head

    @property
    def kv_width(self) -> int:
        """Output width of the key (and of the value) projection."""
        return self.num_kv_heads * self.dim_per_head

    @property
    def params_per_layer(self) -> int:
        """Parameters of one decoder layer: attention, SwiGLU MLP and two RMSNorm weights."""
        h = self.hidden_size
        attention = h * self.q_width + 2 * h * self.kv_width + self.q_width * h
        attention += (self.q_width + 2 * self.kv_width if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        return attention + mlp + 2 * h

    @property
    def num_params(self) -> int:
        """Total parameters P (embedding, layers, final norm, LM head unless tied)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * self.params_per_layer + self.hidden_size

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of LoRA rank ``rank`` on every linear layer of the blocks (q, k, v, o, gate, up,
        down; raco_ds's default targets): r x (in + out) per layer.

        >>> ModelShape(name="8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        ...            intermediate_size=14336, vocab_size=128256).lora_params(16)  # peft prints 41,943,040
        41943040
        """
        h, q, kv, f = self.hidden_size, self.q_width, self.kv_width, self.intermediate_size
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h)
        return rank * per_layer * self.num_layers

    @property
    def largest_module_params(self) -> int:
        """Parameters owned directly by the largest module (DeepSpeed's ``largest_layer_params``)."""
        h = self.hidden_size
        q = h * self.q_width + (self.q_width if self.qkv_bias else 0)
        o = self.q_width * h + (h if self.o_bias else 0)
        mlp = h * self.intermediate_size + (self.intermediate_size if self.mlp_bias else 0)
        return max(self.vocab_size * h, mlp, q, o)

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelShape:
        """Read a Hugging Face ``config.json`` (a file, or a folder holding one) of a Llama-shaped model."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        config = config.get("text_config", config)  # multimodal wrappers nest the LM config
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(
                f"{path}: missing {', '.join(missing)}; the memory model needs a Llama-shaped config "
                "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)"
            )
        qwen2 = config.get("model_type") == "qwen2"  # q/k/v biases always, no o_proj bias
        return cls(
            name=name or config.get("_name_or_path") or path.parent.name or "hf-config",
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim"),
            qkv_bias=qwen2 or bool(config.get("attention_bias", False)),
            o_bias=not qwen2 and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )


PRESETS: dict[str, ModelShape] = {
    "llama3-70b": ModelShape(
        name="llama3-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28672, vocab_size=128256,
    ),
    "llama3-8b": ModelShape(
        name="llama3-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, vocab_size=128256,
    ),
}
"""Model shapes by name: Meta-Llama-3(.1) 70B and 8B (from their config.json files)."""


@dataclass(frozen=True, kw_only=True)
class JobShape:
    """How a raco_ds job is laid out and batched; everything the memory plan depends on besides the model."""

    nodes: int = 1
    """Nodes in the job."""
    gpus_per_node: int = 8
    """GPUs (ranks) per node."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage: 1, 2 or 3."""
    offload_optimizer: bool = False
    """ZeRO ``offload_optimizer.device == "cpu"``: fp32 master, Adam states and gradients on the host."""
    offload_param: bool = False
    """ZeRO-3 ``offload_param.device == "cpu"`` (needs offload_optimizer)."""
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    """DeepSpeed ``data_types.grad_accum_dtype``: dtype of the gradient partition and of RACO's shards."""
    num_objectives: int = 2
    """K: objectives, i.e. per-objective gradient shards held by each rank."""
    micro_batch: int = 2
    """Rows (sequences) per forward pass per GPU; one DPO pair is 2 rows."""
    seq_len: int = 4096
    """Tokens per row (prompt + response, padded)."""
    activation_checkpointing: bool = True
    """Recompute each decoder layer in backward (HF gradient checkpointing)."""
    flash_attention: bool = True
    """A flash/memory-efficient attention kernel (no s x s matrix kept)."""
    reference: Literal["resident", "cached"] = "resident"
    """DPO reference model: a frozen bf16 copy on the GPUs, or precomputed log-probs (no memory)."""
    sub_group_size: int = 1_000_000_000
    """DeepSpeed ``zero_optimization.sub_group_size`` (bounds the ZeRO-3 step workspace)."""
    gpu_memory_gib: float = 79.6
    """Usable memory of one GPU as torch reports it (H100 80GB: 79.6, H200: 140.4, A100 80GB: 79.3)."""
    host_memory_gib: float | None = None
    """Host memory per node to check offload against; None skips the host check."""
    fixed_reserve_gib: float = 3.0
    """Memory the allocator never sees: CUDA context, NCCL buffers, cuBLAS workspaces."""
    fragmentation: float = 0.10
    """Allocator fragmentation margin, as a fraction of all other terms."""
    logit_bytes_per_element: float = 14.0
    """Peak bytes per (token, vocabulary entry) for the logits and their log-softmax (see module docstring)."""
    lora_rank: int = 0
    """LoRA rank on every linear layer of the blocks (0: full fine-tuning). Only the adapters have
    gradients, fp32 master weights, Adam states and RACO shards; the frozen base keeps its bf16
    parameters, and the reference is the base with adapters disabled (no resident copy)."""

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"JobShape.lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        positive = ("nodes", "gpus_per_node", "num_objectives", "micro_batch", "seq_len", "sub_group_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"JobShape.{name} must be positive, got {getattr(self, name)}")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"JobShape.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.offload_param and not (self.zero_stage == 3 and self.offload_optimizer):
            raise ValueError(
                "JobShape.offload_param needs zero_stage 3 and offload_optimizer (DeepSpeed offloads "
                "parameters only under ZeRO-3); set offload_param=False or zero_stage=3, offload_optimizer=True"
            )
        if self.grad_accum_dtype not in _DTYPE_BYTES:
            raise ValueError(f"JobShape.grad_accum_dtype must be 'fp32' or 'bf16', got {self.grad_accum_dtype!r}")
        if self.reference not in ("resident", "cached"):
            raise ValueError(f"JobShape.reference must be 'resident' or 'cached', got {self.reference!r}")
        if not 0 <= self.fragmentation < 1:
            raise ValueError(f"JobShape.fragmentation must be in [0, 1), got {self.fragmentation}")
        if self.gpu_memory_gib <= 0:
            raise ValueError(f"JobShape.gpu_memory_gib must be positive, got {self.gpu_memory_gib}")

    @property
    def world_size(self) -> int:
        """N: data-parallel ranks (nodes x gpus_per_node)."""
        return self.nodes * self.gpus_per_node


def activation_bytes_per_layer(model: ModelShape, rows: int, seq_len: int, flash_attention: bool = True) -> int:
    """Bytes one decoder layer keeps for backward (bf16 activations), without checkpointing.

    Derived from what autograd saves in the HF Llama layer, per token:
    two RMSNorms, each 4h (fp32 upcast of the input) + 2h (bf16 normalised output,
    also the projections' input); q before and after RoPE 2h + 2h; k before and
    after RoPE 2kv + 2kv; v 2kv; attention output (o_proj input) 2h; MLP gate
    and up outputs, SiLU output and the product (down_proj input), 2f each.
    Total 18h + 6kv + 8f bytes per token, plus the attention core: 4 bytes per
    head and token with flash-attention (fp32 log-sum-exp), 6 bytes per head and
    token pair with eager attention (fp32 softmax output + its bf16 copy).
    """
    tokens = rows * seq_len
    per_token = 18 * model.hidden_size + 6 * model.kv_width + 8 * model.intermediate_size
    if flash_attention:
        core = 4 * model.num_heads * tokens
    else:
        core = 6 * model.num_heads * seq_len * tokens
    return tokens * per_token + core


def activation_bytes(model: ModelShape, job: JobShape) -> int:
    """Activation memory of one forward/backward on one GPU (layers plus the final norm).

    Without checkpointing every layer keeps :func:`activation_bytes_per_layer`.
    With checkpointing each layer keeps only its bf16 input (2*s*b*h) and one
    layer at a time is recomputed in full during backward.
    """
    full = activation_bytes_per_layer(model, job.micro_batch, job.seq_len, job.flash_attention)
    tokens = job.micro_batch * job.seq_len
    final_norm = 6 * tokens * model.hidden_size
    if job.activation_checkpointing:
        return model.num_layers * 2 * tokens * model.hidden_size + full + final_norm
    return model.num_layers * full + final_norm


def logits_bytes(model: ModelShape, job: JobShape) -> int:
    """Peak bytes of the logits and their log-softmax for one micro-batch (see ``logit_bytes_per_element``)."""
    return int(job.micro_batch * job.seq_len * model.vocab_size * job.logit_bytes_per_element)


@dataclass(frozen=True)
class MemoryPlan:
    """The outcome of :func:`plan_memory`: per-term bytes, totals and the verdict."""

    model: ModelShape
    """The model planned for."""
    job: JobShape
    """The layout and batch planned for."""
    gpu_terms: dict[str, int]
    """Bytes per GPU, term by term (insertion order is the report order)."""
    host_terms: dict[str, int]
    """Bytes per node on the host, term by term."""
    deepspeed_terms: tuple[str, ...] = field(default=())
    """Names of the gpu_terms that DeepSpeed's own estimator also counts."""

    @property
    def gpu_total(self) -> int:
        """Bytes per GPU, all terms."""
        return sum(self.gpu_terms.values())

    @property
    def deepspeed_model_states(self) -> int:
        """Bytes per GPU of the terms DeepSpeed's estimator counts (comparable with it)."""
        return sum(self.gpu_terms[name] for name in self.deepspeed_terms)

    @property
    def host_total(self) -> int:
        """Bytes per node on the host."""
        return sum(self.host_terms.values())

    @property
    def gpu_capacity(self) -> int:
        """Bytes of one GPU (``job.gpu_memory_gib``)."""
        return int(self.job.gpu_memory_gib * GIB)

    @property
    def fits_gpu(self) -> bool:
        """True when the per-GPU total is within the GPU's memory."""
        return self.gpu_total <= self.gpu_capacity

    @property
    def fits_host(self) -> bool:
        """True when the host total fits ``job.host_memory_gib`` (always True without one)."""
        return self.job.host_memory_gib is None or self.host_total <= self.job.host_memory_gib * GIB

    @property
    def fits(self) -> bool:
        """True when both the GPU and the host budget hold."""
        return self.fits_gpu and self.fits_host

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (bytes and GiB)."""
        return {
            "model": asdict(self.model) | {"num_params": self.model.num_params},
            "job": asdict(self.job) | {"world_size": self.job.world_size},
            "gpu_bytes": dict(self.gpu_terms),
            "gpu_total_bytes": self.gpu_total,
            "gpu_total_gib": self.gpu_total / GIB,
            "deepspeed_model_states_bytes": self.deepspeed_model_states,
            "host_bytes_per_node": dict(self.host_terms),
            "host_total_gib_per_node": self.host_total / GIB,
            "fits": self.fits,
        }

    def render(self) -> str:
        """A human-readable table of the plan."""
        job, model = self.job, self.model
        offload = "param+optimizer" if job.offload_param else ("optimizer" if job.offload_optimizer else "none")
        lines = [
            f"model {model.name}: {model.num_params / 1e9:.2f}B params, {model.num_layers} layers, h={model.hidden_size}",
            f"layout: {job.nodes} node(s) x {job.gpus_per_node} GPUs = {job.world_size} ranks, ZeRO-{job.zero_stage}, "
            f"offload {offload}, grad_accum {job.grad_accum_dtype}",
            f"batch: {job.micro_batch} rows x {job.seq_len} tokens per micro-batch, K={job.num_objectives} objectives, "
            f"checkpointing {'on' if job.activation_checkpointing else 'off'}, "
            f"{'flash' if job.flash_attention else 'eager'} attention, "
            + (f"LoRA r={job.lora_rank} ({model.lora_params(job.lora_rank) / 1e6:.1f}M trainable), reference: "
               "the base with adapters disabled" if job.lora_rank else f"reference {job.reference}"),
            "",
            f"{'per GPU':<34}{'GiB':>9}",
        ]
        for name, value in self.gpu_terms.items():
            mark = " *" if name in self.deepspeed_terms else ""
            lines.append(f"  {name + mark:<32}{value / GIB:>9.2f}")
        lines.append(f"  {'total':<32}{self.gpu_total / GIB:>9.2f}  of {job.gpu_memory_gib:.1f} GiB")
        lines.append(f"  (* = counted by DeepSpeed's estimator: {self.deepspeed_model_states / GIB:.2f} GiB)")
        lines.append(f"{'host, per node':<34}{'GiB':>9}")
        for name, value in self.host_terms.items():
            lines.append(f"  {name:<32}{value / GIB:>9.2f}")
        host_budget = "" if job.host_memory_gib is None else f"  of {job.host_memory_gib:.0f} GiB"
        lines.append(f"  {'total':<32}{self.host_total / GIB:>9.2f}{host_budget}")
        lines.append("verdict: " + ("FITS" if self.fits else "DOES NOT FIT"))
        return "\n".join(lines)


def plan_memory(model: ModelShape, job: JobShape) -> MemoryPlan:
    """Compute the per-GPU and per-node memory of ``job`` training ``model`` (see the module docstring)."""
    # t: trainable parameters (gradients, master weights, Adam, RACO shards); p: all parameters (bf16 copies).
    adapters = model.lora_params(job.lora_rank) if job.lora_rank else 0
    p, t, n = model.num_params + adapters, adapters or model.num_params, job.world_size
    accum = _DTYPE_BYTES[job.grad_accum_dtype]
    off_opt, off_param = job.offload_optimizer, job.offload_param
    gpu: dict[str, int] = {}

    # --- model states, term by term as DeepSpeed's estimators count them ---
    if job.zero_stage == 3:
        gpu["bf16 params (partition)"] = 0 if off_param else 2 * p // n
        gpu["gathered params (4 x largest)"] = 4 * model.largest_module_params
        gpu["gradient partition"] = 0 if off_opt else accum * t // n
        gpu["fp32 master (partition)"] = 0 if off_opt else 4 * t // n
        gpu["Adam m, v (partition)"] = 0 if off_opt else 8 * t // n
    elif job.zero_stage == 2 or off_opt:
        # ZeRO-1 with offload runs the same stage-1/2 optimizer as ZeRO-2.
        gpu["bf16 params (replicated)"] = 2 * p
        gpu["gradients bf16+fp32 (partition)"] = 0 if off_opt else 6 * t // n
        gpu["fp32 master (partition)"] = 0 if off_opt else 4 * t // n
        gpu["Adam m, v (partition)"] = 0 if off_opt else 8 * t // n
    else:
        # ZeRO-1 + bf16 = BF16_Optimizer: full fp32 gradient on every rank (HOOKS.md).
        gpu["bf16 params (replicated)"] = 2 * p
        gpu["fp32 gradients (replicated)"] = 4 * t
        gpu["fp32 master (partition)"] = 4 * t // n
        gpu["Adam m, v (partition)"] = 8 * t // n
    deepspeed_terms = tuple(gpu)
    if (job.zero_stage == 1 and not off_opt) or job.lora_rank:
        deepspeed_terms = ()  # DeepSpeed has no ZeRO-1 estimator, and its estimators train every parameter

    # --- what raco_ds and the run add ---
    shard_bytes = job.num_objectives * accum * t // n
    if job.zero_stage == 1 and not off_opt:
        shard_bytes = job.num_objectives * 4 * t // n  # BF16_Optimizer's partition is fp32
    gpu[f"RACO shards (K={job.num_objectives})"] = 0 if off_opt else shard_bytes
    if job.reference == "resident" and not job.lora_rank:  # LoRA: the base with adapters disabled
        gpu["reference model (bf16)"] = 2 * p // n if job.zero_stage == 3 else 2 * p
    if job.zero_stage == 3 and not off_opt:
        gpu["optimizer step workspace"] = 4 * min(job.sub_group_size, math.ceil(t / n))
    gpu["activations"] = activation_bytes(model, job)
    gpu["logits + log-softmax"] = logits_bytes(model, job)
    gpu["fragmentation margin"] = int(job.fragmentation * sum(gpu.values()))
    gpu["fixed reserve (CUDA/NCCL)"] = int(job.fixed_reserve_gib * GIB)

    # --- host, per node ---
    host: dict[str, int] = {}
    if off_opt:
        states = 16 * t + (2 * p if off_param else 0)  # fp32 master 4 + Adam 8 + fp32 grad 4 (+ bf16 params 2)
        host["offloaded model states x1.5"] = int(states / job.nodes * _DS_HOST_BUFFER_FACTOR)
        host[f"RACO shards (K={job.num_objectives})"] = shard_bytes * job.gpus_per_node
    elif job.zero_stage == 3:
        # zero.Init builds the model partitioned: the peak is one module in fp32 per rank.
        host["load peak (zero.Init) x1.5"] = int(
            4 * model.largest_module_params * job.gpus_per_node * _DS_HOST_BUFFER_FACTOR
        )
    else:
        host["load peak (fp32 copy per rank) x1.5"] = int(4 * p * job.gpus_per_node * _DS_HOST_BUFFER_FACTOR)
    return MemoryPlan(model=model, job=job, gpu_terms=gpu, host_terms=host, deepspeed_terms=deepspeed_terms)


def suggest_fixes(model: ModelShape, job: JobShape, max_nodes: int = 1024) -> list[str]:
    """Changes that would make a job that does not fit, fit; each line names the setting and the plan total.

    Tried one at a time from ``job``: more nodes (the fewest that fit, up to
    ``max_nodes``), ZeRO-3, optimizer offload, parameter offload, activation
    checkpointing, flash-attention, a cached reference, a smaller micro-batch.
    """
    fixes: list[str] = []

    def total(candidate: JobShape) -> str:
        plan = plan_memory(model, candidate)
        text = f"{plan.gpu_total / GIB:.1f} GiB/GPU"
        if candidate.offload_optimizer:  # offload moves the problem to the host: say how much it needs
            text += f", {plan.host_total / GIB:.0f} GiB host/node"
        return text

    def fits(candidate: JobShape) -> bool:
        return plan_memory(model, candidate).fits

    nodes = job.nodes
    while nodes < max_nodes and not fits(replace(job, nodes=nodes)):
        nodes *= 2
    if nodes != job.nodes and fits(replace(job, nodes=min(nodes, max_nodes))):
        low = nodes // 2  # bisect between the last failing and the first fitting count
        high = min(nodes, max_nodes)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(replace(job, nodes=mid)) else (mid, high)
        fixes.append(f"more nodes: --nodes {high} ({total(replace(job, nodes=high))})")
    candidates: list[tuple[str, JobShape]] = []
    if job.zero_stage != 3:
        candidates.append(("ZeRO-3: --zero-stage 3", replace(job, zero_stage=3)))
    if not job.offload_optimizer:
        candidates.append(("optimizer offload: --offload optimizer", replace(job, offload_optimizer=True)))
    if job.zero_stage == 3 and not job.offload_param:
        candidates.append(
            ("parameter + optimizer offload: --offload param", replace(job, offload_optimizer=True, offload_param=True))
        )
    if not job.activation_checkpointing:
        candidates.append(("activation checkpointing: drop --no-checkpointing",
                           replace(job, activation_checkpointing=True)))
    if not job.flash_attention:
        candidates.append(("flash-attention: drop --no-flash-attn", replace(job, flash_attention=True)))
    if job.reference == "resident":
        candidates.append(("precomputed reference log-probs: --reference cached", replace(job, reference="cached")))
    for label, candidate in candidates:
        if fits(candidate):
            fixes.append(f"{label} ({total(candidate)})")
    micro = job.micro_batch // 2
    while micro >= 1 and not fits(replace(job, micro_batch=micro)):
        micro //= 2
    if micro >= 1:
        fixes.append(
            f"smaller micro-batch: --micro-batch {micro} ({total(replace(job, micro_batch=micro))}); "
            "raise gradient accumulation to keep the global batch"
        )
    return fixes
