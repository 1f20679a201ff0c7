"""GPU check: RacoMegatron's full optimizer step on CUDA against a plain-PyTorch oracle.

One GPU, a tiny megatron-core GPTModel (2 layers, hidden 64, tied embeddings),
DistributedDataParallel + the distributed optimizer (Adam), K = 3 objectives,
one RACO step; then the same step in plain autograd (a copy of the model taken
before wrapping, per-objective full gradients, float64 Gram, the same
aggregator, torch AdamW). Runs twice: fp32, and bf16 with fp32 main params and
fp32 gradient reduction (Megatron's usual mixed precision). Prints the errors
and exits non-zero if one is out of tolerance.

    python scripts/gpu_check_megatron.py              # one GPU, about a minute with start-up
    torchrun --nproc_per_node 1 scripts/gpu_check_megatron.py

Errors printed: Gram (max abs / max |H|), coefficients (max abs), Megatron's
get_grad_norm_fp32 of the written-back gradient vs the oracle combination's
norm (relative), parameters after optimizer.step() (max abs / lr) and the
update they made (relative norm of the difference).
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch
import torch.distributed as dist

WEIGHTS = [0.5, 0.3, 0.2]
AGGREGATOR, C = "raco", 0.4
LR, ADAM_EPS = 1e-2, 1e-4  # a larger eps keeps the parameter check about gradients, not Adam's sign of ~0
VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES = 128, 32, 4, 2
# Tolerances per precision. bf16: parameters are stored in bf16 and Adam's first step
# is nearly sign(g), so a per-element bound is meaningless; the update's relative norm is not.
TOLERANCES = {
    "fp32": {"gram": 1e-5, "coefficients": 1e-5, "norm": 1e-5, "params_over_lr": 1e-3, "update_rel": 1e-3},
    "bf16": {"gram": 3e-2, "coefficients": 3e-2, "norm": 3e-2, "params_over_lr": float("inf"), "update_rel": 0.2},
}


def _setup() -> torch.device:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 check must not run its matmuls in TF32
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # only for a dry run of this script under tests/megatron_shim.py


def _micro_batch(k: int, m: int, device: torch.device):
    gen = torch.Generator().manual_seed(100 + m)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)
    return tokens.to(device), torch.arange(SEQ).expand(MICRO_BATCH, SEQ).to(device), ((tokens + k) % VOCAB).to(device)


def check(precision: str, device: torch.device) -> dict[str, float]:
    """One RACO step under ``precision`` vs the oracle; returns the measured errors."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from raco_ds.megatron import RacoMegatron
    from raco_ds.solver import aggregate

    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    ps.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    if device.type == "cuda":
        model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16, use_cpu_initialization=device.type == "cpu",
    )
    def gpt(cfg: TransformerConfig) -> GPTModel:
        return GPTModel(
            config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
            share_embeddings_and_output_weights=True,
        ).to(device)

    model = gpt(config)
    # The oracle: an fp32 model with the same weights, loaded before DDP re-maps the parameters.
    oracle = gpt(dataclasses.replace(config, params_dtype=torch.float32, pipeline_dtype=torch.float32, bf16=False))
    oracle.load_state_dict({k: v.float() if torch.is_tensor(v) else v for k, v in model.state_dict().items()})
    if bf16:
        model = Float16Module(config, model)  # casts inputs to bf16 and outputs to fp32, as Megatron's training does
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=1e6, bf16=bf16,
                        params_dtype=dtype, use_distributed_optimizer=True),
        [ddp],
    )
    raco = RacoMegatron(ddp, optimizer, WEIGHTS, aggregator=AGGREGATOR, c=C)
    schedule = get_forward_backward_func()
    for k in range(len(WEIGHTS)):
        batches = iter([_micro_batch(k, m, device) for m in range(MICRO_BATCHES)])

        def forward_step(data_iterator, chunk):
            tokens, positions, labels = next(data_iterator)
            return chunk(tokens, positions, None, labels=labels), lambda t: (t.float().mean(), {})

        with raco.objective(k):
            schedule(forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                     num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False)
    stats = raco.step()
    megatron_norm = float(optimizer.get_grad_norm())

    # Oracle: plain autograd on the fp32 copy.
    params = dict(oracle.named_parameters())
    names = sorted(params)
    grads = []
    for k in range(len(WEIGHTS)):
        oracle.zero_grad(set_to_none=True)
        loss = sum(oracle(*_micro_batch(k, m, device)[:2], None, labels=_micro_batch(k, m, device)[2]).float().mean()
                   for m in range(MICRO_BATCHES)) / MICRO_BATCHES
        loss.backward()
        grads.append(torch.cat([params[n].grad.reshape(-1).double() for n in names]))
    flat = torch.stack(grads)
    gram = (flat @ flat.T).cpu()
    a = aggregate(AGGREGATOR, gram, torch.tensor(WEIGHTS, dtype=torch.float64), C).coefficients
    combined = (a.to(flat.device) @ flat)
    offset = 0
    for n in names:
        params[n].grad = combined[offset : offset + params[n].numel()].view_as(params[n]).float()
        offset += params[n].numel()
    initial = {n: params[n].detach().clone() for n in names}
    torch.optim.AdamW([params[n] for n in names], lr=LR, eps=ADAM_EPS, weight_decay=0.0).step()
    update = torch.cat([(params[n] - initial[n]).reshape(-1) for n in names])
    stepped = {n.removeprefix("module."): p for n, p in model.named_parameters()}
    errors = {
        "gram": float((stats.gram - gram).abs().max() / gram.abs().max()),
        "coefficients": float((stats.coefficients - a).abs().max()),
        "norm": abs(megatron_norm - float(combined.norm())) / float(combined.norm()),
        "params_over_lr": max(float((stepped[n].float() - params[n]).abs().max()) for n in names) / LR,
        "update_rel": float(
            (torch.cat([(stepped[n].float() - initial[n]).reshape(-1) for n in names]) - update).norm() / update.norm()
        ),
        "update_successful": float(stats.update_successful),
    }
    ps.destroy_model_parallel()
    return errors


def main() -> int:
    """Run both precisions, print the errors, return non-zero when one is out of tolerance."""
    device = _setup()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'dry run'}), "
          f"torch {torch.__version__}, megatron-core {__import__('megatron.core').core.__version__}")
    failed = False
    for precision, tolerance in TOLERANCES.items():
        errors = check(precision, device)
        ok = all(errors[key] <= tol for key, tol in tolerance.items())
        ok = ok and errors["update_successful"] == 1.0
        failed |= not ok
        print(f"{precision}: {'PASS' if ok else 'FAIL'} " + " ".join(f"{k}={v:.2e}" for k, v in errors.items())
              + f" (tolerances {tolerance})", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
