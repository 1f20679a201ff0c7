"""One training process per rank: torch.distributed, threads, logging and seeds."""

from __future__ import annotations

import importlib
import logging
import os
import random
import socket
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["seed_everything", "setup_distributed", "setup_logging"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed the way the ``deepspeed`` launcher expects; (rank, world, device).

    Plain ``python launchers/train.py`` has no launcher environment: it becomes
    a world of one. On CPU the backend is gloo (DeepSpeed's CPU accelerator
    would ask for oneCCL). Each rank gets an equal share of the cores, so
    ranks on one machine do not oversubscribe it.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, local_world)))
    if on_cpu:
        # DeepSpeed JIT-compiles a shared-memory op at start-up on CPU that only its *inference*
        # all-reduce uses (deepspeed/comm/torch.py); training collectives go through gloo. On a fresh
        # machine that build costs minutes of the main job's budget, so it is skipped here.
        # (importlib: the attribute deepspeed.comm.torch is shadowed by the real torch module.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not on_cpu:
        accelerator.set_device(local_rank)
    device = torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(local_rank))
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO, the others at WARNING; DeepSpeed's, torch's and transformers' chatter is quieted."""
    # torch's c10d wrapper warns on every ZeRO reduce-scatter; DeepSpeed, not the user, must move.
    warnings.filterwarnings(
        "ignore",
        message=r".*torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor). is deprecated",
        category=FutureWarning,
    )
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[%(asctime)s raco] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
