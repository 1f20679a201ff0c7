"""Megatron checkpoints through raco_ds.trainer.checkpoint: atomic, manifest-verified, resumable.

raco_ds.trainer.checkpoint owns everything that makes a checkpoint safe (a
``.tmp-`` folder renamed into place once sealed, the sha256 manifest, the RNG
files, the trainer state, ``keep_last``, falling back to the newest intact
checkpoint, a full disk). It asks its engine for two calls only,
``save_checkpoint(dir, tag=...)`` and ``load_checkpoint(dir, tag=...)``, and
reads ``engine.module.parameters()`` to estimate a checkpoint's size.
:class:`MegatronCheckpointEngine` gives it those calls over megatron-core's
distributed checkpointing, so the Megatron launcher reuses that module whole.

What is written in the engine's folder (``step_<N>/ds/``, the tag the shared
layout uses): ``megatron.core.dist_checkpointing.save`` of the model's and the
optimizer's ``sharded_state_dict`` (torch_dist format: every rank writes its
own shards in parallel, no gather), plus ``megatron_layout.json``. The
distributed optimizer's state is saved as ``dp_reshardable`` (each rank's
buffer slices as they are: a parallel save and load, resharded only over data
parallelism), so a checkpoint loads only under the same tensor and pipeline
parallel sizes; the layout file lets a mismatch fail with an error that says
so before anything is read.

Safety note: the manifest catches any damaged or swapped file, ``common.pt``
passes the safe (weights_only) unpickler like every ``.pt`` file, and
torch.distributed.checkpoint's ``.metadata`` pickle is parsed first by an
unpickler that accepts only the checkpoint metadata classes
(:data:`raco_ds.trainer.integrity.DCP_METADATA_GLOBALS`), so even a file that
matches a rewritten manifest cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raco_ds.trainer.checkpoint import CheckpointError

__all__ = ["LAYOUT_FILE", "MegatronCheckpointEngine"]

LAYOUT_FILE = "megatron_layout.json"
"""Written beside the distributed checkpoint: the parallel layout it was saved under."""

_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _zero_padding(node: Any) -> None:
    """Zero the dp_reshardable buckets' padding slices in place, so that a checkpoint's bytes are reproducible.

    megatron-core fills the gaps between parameters in a bucket (each parameter starts 64-aligned)
    with ``torch.empty`` tensors marked ``padding``; saved as they are, two checkpoints of the same
    state differed in exactly those slices (uninitialised memory) and so in their manifest hashes.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor

    if isinstance(node, dict):
        padding = node.get("padding")
        if isinstance(padding, LocalNonpersistentObject) and padding.unwrap() is True:
            for value in node.values():
                if isinstance(value, ShardedTensor):
                    value.data.zero_()
            return
        children = node.values()
    elif isinstance(node, (list, tuple)):
        children = node
    else:
        return
    for child in children:
        _zero_padding(child)


class MegatronCheckpointEngine:
    """The two checkpoint calls of a DeepSpeed engine, for a megatron-core model and optimizer.

    ``model``: the unwrapped GPTModel (its ``sharded_state_dict`` keys carry no ``module.``
    prefix); ``optimizer``: what ``get_megatron_optimizer`` returned; ``layout``: the parallel
    sizes this run uses (``{"tensor_parallel": ..., "pipeline_parallel": ...}``).
    """

    def __init__(self, model: Any, optimizer: Any, layout: dict[str, int]) -> None:
        self.module = model
        self.optimizer = optimizer
        self.layout = dict(layout)

    def _sharded_state_dict(self, loading: bool) -> dict[str, Any]:
        model_state = self.module.sharded_state_dict()
        optimizer_state = self.optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=_OPTIMIZER_FORMAT)
        if not loading:
            _zero_padding(optimizer_state)
        return {"model": model_state, "optimizer": optimizer_state}

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """Write model and optimizer shards into ``save_dir/tag`` (collective; ``save_latest`` is unused)."""
        from megatron.core import dist_checkpointing

        folder = Path(save_dir) / tag
        if dist.get_rank() == 0:
            folder.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(loading=False), str(folder))
        if dist.get_rank() == 0:  # after the save, which wants an empty folder
            (folder / LAYOUT_FILE).write_text(json.dumps(self.layout))

    def load_checkpoint(
        self, load_dir: str, tag: str, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True
    ) -> tuple[str, dict[str, Any]]:
        """Restore model and optimizer from ``load_dir/tag`` (collective); (path, {}) as DeepSpeed returns."""
        from megatron.core import dist_checkpointing

        folder = Path(load_dir) / tag
        saved = json.loads((folder / LAYOUT_FILE).read_text())
        if saved != self.layout:
            raise CheckpointError(
                f"cannot resume from {load_dir}: it was saved with layout {saved} and this run has {self.layout}; "
                "the optimizer's shards reshard over data parallelism only. Relaunch with "
                + " ".join(f"--megatron.{key} {value}" for key, value in saved.items())
            )
        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if not inner.optimizer.state and hasattr(inner, "_init_optimizer_states_with_dummy_values"):
                # torch's Adam creates its state (and its step count) at the first step; Megatron's
                # loader copies into existing state tensors, so they are created first, as zeros.
                inner._init_optimizer_states_with_dummy_values()
        state = dist_checkpointing.load(self._sharded_state_dict(loading=True), str(folder))
        with torch.no_grad():  # the loaders copy into leaf parameters in place
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for group in inner.optimizer.param_groups:
                if group.get("step") is None:  # nothing saved to restore (no optimizer step yet)
                    continue
                for param in group["params"]:
                    param_state = inner.optimizer.state.get(param, {})
                    if isinstance(param_state.get("step"), torch.Tensor):
                        # megatron-core 0.16 with torch's Adam (no TE/Apex) restores the step count wrong:
                        # dp_reshardable keeps "step" as a LocalNonpersistentObject, so its loader copies
                        # the placeholder state's step (1, from the dummy step above) over the saved one,
                        # into ONE tensor shared by every parameter. The saved count is in the loaded
                        # param group ("step", as the optimizer's state_dict() writes it); each parameter
                        # gets its own tensor of it (Adam increments each in place; the bias correction
                        # reads it). Measured on 2 ranks: params, exp_avg, exp_avg_sq loaded exactly,
                        # step 1.0 instead of 2.0 after a step-2 checkpoint.
                        param_state["step"] = torch.tensor(float(group["step"]), dtype=param_state["step"].dtype,
                                                           device=param_state["step"].device)
        return str(folder), {}
