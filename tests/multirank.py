"""Run a test body on N CPU ranks (gloo), nanotron-style.

A public test calls ``run_ranks(_body, world_size, *args)``; ``_body(rank,
world_size, *args)`` runs in a fresh spawned process with the torch.distributed
environment set and a gloo process group initialised, and whatever it returns
comes back as one entry of the result list (rank order). An exception in any
rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, out_dir: str, backend: str, body: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU per rank; NCCL collectives run on the current device
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    result = body(rank, world_size, *args)  # an exception here fails the test with this rank's traceback
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.barrier()
    # Leave without interpreter teardown: DeepSpeed's extra process groups and background
    # threads can abort in C++ static destructors ("terminate called without an active
    # exception", seen intermittently on 2-core CI), after the body has already passed.
    # os._exit also skips the shutdown of this rank's multiprocessing children (megatron's
    # async checkpoint writer starts a Manager process): end them here, or they outlive the test.
    for child in multiprocessing.active_children():
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(body: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """Run ``body(rank, world_size, *args)`` on ``world_size`` ranks; return each rank's result.

    ``backend`` is the process group's: "gloo" (CPU, the tests) or "nccl" (rank r on GPU r, benchmarks).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_entry, args=(world_size, free_port(), out_dir, backend, body, args), nprocs=world_size, join=True)
        return [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(world_size)]
