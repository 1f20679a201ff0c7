"""Export the trained model as a Hugging Face folder with safetensors (ZeRO-3 weights consolidated).

Under ZeRO-3 each rank holds a slice of every parameter. The export gathers
one parameter at a time with ``deepspeed.zero.GatheredParameters`` (so peak
memory is the full model on rank 0's host plus one parameter, never a second
full copy per rank), copies it to rank 0's CPU, and rank 0 writes the folder
with ``save_pretrained``. Under ZeRO 0-2 the gather is a no-op. The folder is
written under a temporary name and renamed, so a crash never leaves a
loadable-looking half export. Load it with ``AutoModelForCausalLM.from_pretrained``.

A LoRA run (a peft ``PeftModel``) is exported twice by :func:`export_lora`: its
adapter as a PEFT folder (``PeftModel.from_pretrained(base, folder)``), gathering
only the adapter parameters, and the base model with the adapter merged as a
plain HF folder like the one above.

A model with a NaN or infinite weight is refused (:class:`ExportError` naming
the tensors), on every rank: such an export would load and then produce NaN.
A disk that fills during the export raises an error naming the folder and the
space needed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from raco_ds.diskspace import disk_full_error, is_disk_full

__all__ = ["ExportError", "consolidated_state_dict", "export_hf", "export_lora", "nonfinite_tensors"]


class ExportError(RuntimeError):
    """The model cannot be exported; the message says which tensors and what to do."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def consolidated_state_dict(module: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (CPU tensors; tied weights once); an empty dict on other ranks.

    ``trainable_only``: the parameters that require grad and no buffers (a LoRA adapter).
    Collective under ZeRO-3: every rank must call it.
    """
    import deepspeed

    rank = _rank()
    persistent = set(module.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():  # named_parameters() yields a tied tensor once
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                out[name] = param.detach().to("cpu", copy=True)
    if rank == 0 and not trainable_only:
        for name, buffer in module.named_buffers():
            if name in persistent:  # non-persistent buffers (rotary tables) are rebuilt by the model
                out[name] = buffer.detach().to("cpu", copy=True)
    return out


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Name -> number of NaN/inf values, for every floating tensor that has any."""
    counts = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                counts[name] = bad
    return counts


def _refuse_nonfinite(state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Raise ExportError on every rank when rank 0's consolidated weights are not all finite."""
    bad = nonfinite_tensors(state_dict) if _rank() == 0 else {}
    if dist.is_initialized():
        shared = [bad]
        dist.broadcast_object_list(shared, src=0)
        bad = shared[0]
    if bad:
        listed = ", ".join(f"{name} ({count} values)" for name, count in list(bad.items())[:3])
        raise ExportError(
            f"refusing to write {out_dir}: {len(bad)} weight tensors hold NaN or inf, e.g. {listed}; training "
            "diverged. Resume from an earlier checkpoint (delete the newer ones, then --resume) with a lower "
            "--optimisation.lr or --optimisation.max_grad_norm"
        )


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _write_folder(out_dir: Path, write: Callable[[Path], None], needed: int) -> None:
    """``write(tmp)`` into a temporary sibling, then rename it to ``out_dir`` (a crash never leaves a half folder);
    a full disk (``needed`` bytes) raises an error naming the folder."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err, out_dir.parent, needed):
            what = f"the export {out_dir.name}"
            raise disk_full_error(out_dir.parent, needed, what, then="rerun with --resume") from err
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _save_pretrained(model, state_dict: dict[str, torch.Tensor] | None, tokenizer, folder: Path, **options) -> None:
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True, **options)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def export_hf(module: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path | None:
    """Write ``module`` (an HF ``PreTrainedModel``, possibly ZeRO-3 partitioned) and ``tokenizer``.

    Returns the folder on rank 0, None elsewhere. Collective: every rank must call it.
    Raises :class:`ExportError` when a weight is NaN or infinite.
    """
    out_dir = Path(out_dir)
    state_dict = consolidated_state_dict(module)
    _refuse_nonfinite(state_dict, out_dir)
    if _rank() == 0:
        _write_folder(out_dir, lambda tmp: _save_pretrained(module, state_dict, tokenizer, tmp),
                      _nbytes(state_dict.values()))  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
    return out_dir if _rank() == 0 else None


def export_lora(module: torch.nn.Module, tokenizer, adapter_dir: str | Path, merged_dir: str | Path,
                dtype: str = "fp32") -> tuple[Path, Path] | None:  # fmt: skip
    """Write a ``PeftModel``'s adapter as a PEFT folder and the merged model as an HF folder, with ``tokenizer``.

    Only the adapter parameters are gathered (under ZeRO-3 too); rank 0 then loads
    the base model the adapter config names (in ``dtype``), merges the adapter with
    peft's own merge, and writes it: rank 0's host holds one full model, as in
    :func:`export_hf`. Returns (adapter folder, merged folder) on rank 0, None
    elsewhere. Collective. Raises :class:`ExportError` when an adapter weight is NaN or infinite.
    """
    from raco_ds.lora import load_merged

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    adapter = consolidated_state_dict(module, trainable_only=True)
    _refuse_nonfinite(adapter, adapter_dir)
    if _rank() == 0:
        # Embeddings never carry adapters here; "auto" would look the base model up on the hub to decide.
        _write_folder(adapter_dir, lambda tmp: _save_pretrained(module, adapter, tokenizer, tmp,
                                                                save_embedding_layers=False),
                      _nbytes(adapter.values()))  # fmt: skip
        merged = load_merged(adapter_dir, dtype)
        _write_folder(merged_dir, lambda tmp: _save_pretrained(merged, None, tokenizer, tmp),
                      _nbytes(merged.state_dict().values()))  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
    return (adapter_dir, merged_dir) if _rank() == 0 else None
