"""Preflight memory plan: will this raco_ds job fit, per GPU, at this world size?

    python launchers/plan.py --model llama3-70b --nodes 16
    python launchers/plan.py --model /path/to/hf/folder --nodes 4 --ds-config ds_configs/zero3_70b.json
    python launchers/plan.py --model llama3-70b --nodes 2 --offload optimizer --host-mem-gib 1900
    python launchers/plan.py ... --write-ds-config OUT.json   # the DeepSpeed config as planned

Prints the per-GPU (and per-node host) memory term by term and exits 0 when it
fits. When it does not, it exits 3 and says what to change (more nodes,
offload, a smaller micro-batch, checkpointing, ...). Bad arguments exit 2.
The formulas and their assumptions are in raco_ds/planning/memory.py.

``--write-ds-config`` writes ``--ds-config`` with the planned ZeRO stage and
offload applied, so the job launches exactly the configuration that was
checked (slurm/_launch.sh uses it; nothing is written when the job does not fit).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raco_ds.planning import GIB, PRESETS, JobShape, ModelShape, plan_memory, suggest_fixes  # noqa: E402

EXIT_DOES_NOT_FIT = 3
"""Exit status when the job does not fit (argparse uses 2 for bad arguments)."""

GPU_MEMORY_GIB = {"h100": 79.6, "h200": 140.4, "a100-80g": 79.3, "a100-40g": 39.4}
"""Usable GiB per GPU as torch.cuda reports it, by --gpu name."""

OFFLOAD_CHOICES = ("none", "optimizer", "param")


def resolve_model(spec: str) -> ModelShape:
    """A preset name (``llama3-70b``, ``llama3-8b``) or a path to an HF ``config.json`` / model folder."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.exists():
        return ModelShape.from_hf_config(path)
    raise ValueError(
        f"--model {spec!r}: not a preset ({', '.join(PRESETS)}) and no such file or folder; "
        "pass a preset or the path of a Hugging Face config.json (or the folder holding it)"
    )


def ds_config_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The JobShape fields a DeepSpeed config fixes (stage, offload, grad-accum dtype, sub-group size)."""
    zero = config.get("zero_optimization", {})
    settings: dict[str, Any] = {}
    if "stage" in zero:
        settings["zero_stage"] = int(zero["stage"])
    settings["offload_optimizer"] = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    settings["offload_param"] = zero.get("offload_param", {}).get("device", "none") == "cpu"
    accum = config.get("data_types", {}).get("grad_accum_dtype")
    if accum is not None:
        settings["grad_accum_dtype"] = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}.get(
            str(accum), str(accum)
        )
    if isinstance(zero.get("sub_group_size"), int):
        settings["sub_group_size"] = zero["sub_group_size"]
    return settings


def apply_to_ds_config(config: dict[str, Any], job: JobShape) -> dict[str, Any]:
    """``config`` with the job's ZeRO stage and offload written in (a copy; other keys untouched)."""
    out = copy.deepcopy(config)
    zero = out.setdefault("zero_optimization", {})
    zero["stage"] = job.zero_stage
    zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True} if job.offload_optimizer else {"device": "none"}
    if job.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True} if job.offload_param else {"device": "none"}
    else:
        zero.pop("offload_param", None)
    if job.offload_optimizer:
        # DeepSpeed's CPU Adam steps the offloaded states; torch_adam would run torch's Adam on the host.
        out.get("optimizer", {}).get("params", {}).pop("torch_adam", None)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option's help says its unit and default)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama3-70b", help="preset (llama3-70b, llama3-8b) or HF config.json/folder")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    p.add_argument("--ds-config", help="DeepSpeed JSON: ZeRO stage, offload and grad_accum_dtype are read from it")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), help="overrides the DeepSpeed config (default 3)")
    p.add_argument("--offload", choices=OFFLOAD_CHOICES,
                   help="none | optimizer | param (param = parameters and optimizer); overrides the config")
    p.add_argument("--grad-accum-dtype", choices=("fp32", "bf16"), help="overrides the config (default fp32)")
    p.add_argument("--objectives", default="2",
                   help="K as a number, or the objective names comma-separated (default 2)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="pairs per micro-batch per GPU (the trainer's optimisation.micro_batch_size; default 1)")
    p.add_argument("--capture", choices=("perobjective", "onepass"), default="perobjective",
                   help="onepass puts all K objectives' rows in one forward (K x the rows; conservative for shared pairs)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="LoRA rank on every linear layer of the blocks (default 0: full fine-tuning)")
    p.add_argument("--no-checkpointing", action="store_true", help="plan without activation checkpointing")
    p.add_argument("--no-flash-attn", action="store_true", help="plan for eager attention (s x s scores kept)")
    p.add_argument("--reference", choices=("resident", "cached"), default="resident",
                   help="DPO reference model on the GPUs, or precomputed log-probs (default resident)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", choices=sorted(GPU_MEMORY_GIB), help="GPU model (sets --gpu-mem-gib)")
    gpu.add_argument("--gpu-mem-gib", type=float, help="usable GiB per GPU (default: h100, 79.6)")
    p.add_argument("--host-mem-gib", type=float, help="host GiB per node to check offload against")
    p.add_argument("--fragmentation", type=float, default=0.10, help="allocator margin fraction (default 0.10)")
    p.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context/NCCL reserve GiB (default 3)")
    p.add_argument("--logit-bytes", type=float, default=14.0,
                   help="peak bytes per token per vocabulary entry for logits + log-softmax (default 14)")
    p.add_argument("--json", type=Path, help="also write the plan as JSON here")
    p.add_argument("--write-ds-config", type=Path, help="when the job fits, write the planned DeepSpeed config here")
    p.add_argument("--quiet", action="store_true", help="print only the verdict line (and the fixes)")
    return p


def job_from_args(args: argparse.Namespace, ds_config: dict[str, Any] | None) -> JobShape:
    """Merge the DeepSpeed config's settings and the command line (the command line wins)."""
    settings: dict[str, Any] = ds_config_settings(ds_config) if ds_config is not None else {}
    if args.zero_stage is not None:
        settings["zero_stage"] = args.zero_stage
    if args.offload is not None:
        settings["offload_optimizer"] = args.offload in ("optimizer", "param")
        settings["offload_param"] = args.offload == "param"
    if args.grad_accum_dtype is not None:
        settings["grad_accum_dtype"] = args.grad_accum_dtype
    if settings.get("zero_stage", 3) != 3:
        settings["offload_param"] = False  # DeepSpeed ignores offload_param below ZeRO-3
    num_objectives = int(args.objectives) if args.objectives.isdigit() else len(args.objectives.split(","))
    rows = 2 * args.micro_batch * (num_objectives if args.capture == "onepass" else 1)
    gpu_mem = GPU_MEMORY_GIB[args.gpu] if args.gpu else (args.gpu_mem_gib or GPU_MEMORY_GIB["h100"])
    return JobShape(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        num_objectives=num_objectives,
        micro_batch=rows,
        seq_len=args.seq_len,
        activation_checkpointing=not args.no_checkpointing,
        flash_attention=not args.no_flash_attn,
        reference=args.reference,
        gpu_memory_gib=gpu_mem,
        host_memory_gib=args.host_mem_gib,
        fragmentation=args.fragmentation,
        fixed_reserve_gib=args.reserve_gib,
        logit_bytes_per_element=args.logit_bytes,
        lora_rank=args.lora_r,
        **settings,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the plan; return 0 (fits), 2 (bad arguments) or :data:`EXIT_DOES_NOT_FIT`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = resolve_model(args.model)
        ds_config = None
        if args.ds_config:
            ds_config = json.loads(Path(args.ds_config).read_text(encoding="utf-8"))
        job = job_from_args(args, ds_config)
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        parser.error(str(err))  # exits 2 with the usage line
    plan = plan_memory(model, job)
    if args.json:
        args.json.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        print(plan.render())
    if plan.fits:
        print(f"plan: fits, {plan.gpu_total / GIB:.1f} of {job.gpu_memory_gib:.1f} GiB per GPU "
              f"at {job.world_size} ranks")
        if args.write_ds_config:
            if ds_config is None:
                parser.error("--write-ds-config needs --ds-config (the config to apply the plan to)")
            args.write_ds_config.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(apply_to_ds_config(ds_config, job), indent=2) + "\n"
            args.write_ds_config.write_text(text, encoding="utf-8")
        return 0
    reasons = []
    if not plan.fits_gpu:
        reasons.append(f"needs {plan.gpu_total / GIB:.1f} GiB per GPU, the GPU has {job.gpu_memory_gib:.1f} GiB "
                       f"(--gpu-mem-gib)")
    if not plan.fits_host:
        reasons.append(f"needs {plan.host_total / GIB:.0f} GiB of host memory per node, the node has "
                       f"{job.host_memory_gib:.0f} GiB (--host-mem-gib)")
    fixes = suggest_fixes(model, job)
    message = [f"plan: DOES NOT FIT: {model.name} on {job.nodes} node(s) x {job.gpus_per_node} GPUs "
               f"{'; '.join(reasons)}."]
    if fixes:
        message.append("Change one of these (each fits on its own):")
        message += [f"  - {fix}" for fix in fixes]
    else:
        message.append("No single change fits; combine more nodes with offload and a smaller micro-batch.")
    print("\n".join(message), file=sys.stderr)
    return EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
