"""Stop cleanly before SLURM's time limit, and keep two jobs out of one output directory.

Two small objects the trainer uses (slurm/_launch.sh is the other half of the contract):

:class:`PreemptionHandler` -- installs handlers for SIGUSR1 (SLURM's warning
before the time limit, ``#SBATCH --signal=B:USR1@300`` forwarded by the batch
script) and SIGTERM (``scancel``, preemption, the time limit itself). A handler
only sets a flag; the trainer polls it once per optimizer step, checkpoints,
and exits with :data:`EXIT_REQUEUE`. The batch script requeues the job only
when it sees that status *after* it forwarded USR1, and the requeued job
resumes with ``--resume``::

    from raco_ds.preemption import OutputDirLock, PreemptionHandler

    lock = OutputDirLock(cfg.output_dir).acquire() if rank == 0 else None   # raises if another job holds it
    stop = PreemptionHandler().install()            # every rank, main thread, before the loop
    for step in range(start, max_steps):
        train_step()
        if stop.should_stop():                       # collective: every rank calls it at every step
            save_checkpoint()                        # all ranks (ZeRO-3 checkpoints are sharded)
            stop.exit()                              # barrier, then sys.exit(EXIT_REQUEUE)

:class:`OutputDirLock` -- an ``fcntl`` lock on ``<output_dir>/.raco.lock``
holding the holder's host, pid, SLURM job id and start time as JSON, so a
second job fails at once with an error that names the first.

Stale locks: an ``fcntl`` lock belongs to the process. When the holder exits or
is killed (even SIGKILL) the kernel drops it, so a crashed job never leaves
a lock behind; the file and its JSON stay, describing the *last* holder, and
the next job takes the lock and overwrites them. The lock is only as good as
the file system's locking: local disks and NFSv4 honour it across nodes;
Lustre needs the ``flock`` mount option (``localflock`` is node-local only: it
does not stop a job on another node); a file system without locking makes
:meth:`OutputDirLock.acquire` fail with a message saying so, and
``RACO_OUTPUT_LOCK=0`` (or ``enabled=False``) skips the lock at your own risk.
If an NFS server keeps the lock of a node that died, it drops it when the
client's lease expires (about 90 s on NFSv4).

``python -m raco_ds.preemption check-lock DIR`` exits 0 when DIR is free and 1
(naming the holder) when another process holds it: the batch script runs it
before starting thousands of ranks.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

__all__ = [
    "EXIT_REQUEUE",
    "LOCK_FILE_NAME",
    "LockHolder",
    "OutputDirLock",
    "OutputDirLockError",
    "PreemptionHandler",
]

EXIT_REQUEUE = 85
"""Exit status meaning "checkpointed on a stop signal; requeue me". slurm/_launch.sh checks for it.

Chosen outside the shell's reserved ranges (1-2, 126-165: signals) and away
from Python's 1 (uncaught exception) so a crash is never mistaken for it.
"""

LOCK_FILE_NAME = ".raco.lock"
"""Name of the lock file inside the output directory."""


class PreemptionHandler:
    """Turns stop signals into a flag the training loop polls once per step.

    ``signals``: the signals to catch (default SIGUSR1 and SIGTERM).
    ``exit_code``: the status :meth:`exit` ends the process with.
    """

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM),
        exit_code: int = EXIT_REQUEUE,
    ) -> None:
        self.signals = tuple(signals)
        self.exit_code = exit_code
        self._received: signal.Signals | None = None
        self._received_at: float | None = None
        self._previous: dict[signal.Signals, Any] = {}

    # --- installation -------------------------------------------------------
    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only, as Python requires) and return ``self``."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: checkpointing from inside a signal handler would run
        # in the middle of a collective on some ranks and not others.
        if self._received is None:
            self._received = signal.Signals(signum)
            self._received_at = time.monotonic()
        print(f"[raco] received {signal.Signals(signum).name}: will checkpoint and exit at the end of this step",
              file=sys.stderr, flush=True)

    # --- polling ------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """True once this process received one of the signals (local; see :meth:`should_stop`)."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received ("SIGUSR1", "SIGTERM"), or None."""
        return None if self._received is None else self._received.name

    def request(self, signum: signal.Signals = signal.SIGUSR1) -> None:
        """Set the flag as if ``signum`` had arrived (tests, or a trainer's own stop condition)."""
        self._on_signal(int(signum), None)

    def should_stop(self, group: Any = None) -> bool:
        """True on every rank when any rank received a signal (call it on every rank, every step).

        Signals reach ranks at slightly different moments; a checkpoint is a
        collective, so all ranks must decide at the same step. When
        torch.distributed is initialised this is one all-reduce (MAX) of one
        number over ``group``; otherwise the local flag.
        """
        flag = self.requested
        dist = sys.modules.get("torch.distributed")  # never imported: cannot be initialised (and no import cost)
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return flag
        import torch
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":  # NCCL reduces CUDA tensors only
            device = torch.device("cuda", torch.cuda.current_device())
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item() > 0)

    def exit(self, group: Any = None) -> NoReturn:
        """Wait for every rank (so no rank is killed mid-write), then exit with :attr:`exit_code`."""
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.barrier(group=group)
        print(f"[raco] checkpointed after {self.signal_name or 'a stop request'}; exiting with {self.exit_code} "
              "(the batch script requeues the job, which resumes from the checkpoint)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.exit(self.exit_code)


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) an output directory's lock, as written into the lock file."""

    host: str
    """Host name of the holding process."""
    pid: int
    """Process id on that host."""
    job_id: str | None
    """SLURM_JOB_ID of the holder (None outside SLURM)."""
    started: str
    """UTC time the lock was taken, ISO 8601."""

    def describe(self) -> str:
        """One line for error messages."""
        job = f"SLURM job {self.job_id}" if self.job_id else "a process outside SLURM"
        return f"{job} (pid {self.pid} on {self.host}, since {self.started})"


class OutputDirLockError(RuntimeError):
    """The output directory is locked by another process, or the file system cannot lock."""


class OutputDirLock:
    """An exclusive, process-owned lock on an output directory (see the module docstring).

    ``output_dir``: the run folder (created if missing). ``enabled``: False makes
    acquire/release no-ops; None reads ``RACO_OUTPUT_LOCK`` (default on).
    """

    def __init__(self, output_dir: str | os.PathLike[str], enabled: bool | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE_NAME
        if enabled is None:
            enabled = os.environ.get("RACO_OUTPUT_LOCK", "1").lower() not in ("0", "false", "no", "off")
        self.enabled = enabled
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def holder(self) -> LockHolder | None:
        """The holder recorded in the lock file (the current one if locked, else the last one), or None."""
        try:
            if self._fd is not None:
                # Never open/close the file while holding it: closing ANY descriptor of
                # a file drops this process's fcntl locks on it (POSIX semantics).
                raw = os.pread(self._fd, 4096, 0)
            else:
                raw = self.path.read_bytes()
            return LockHolder(**json.loads(raw.decode("utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self) -> OutputDirLock:
        """Take the lock without waiting; raise :class:`OutputDirLockError` naming the holder if taken."""
        if not self.enabled or self._fd is not None:
            return self
        import fcntl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                holder = self.holder()
                who = holder.describe() if holder else "another process (its lock file is empty or unreadable)"
                raise OutputDirLockError(
                    f"output directory {self.output_dir} is in use by {who}. Two jobs writing one output "
                    f"directory corrupt its checkpoints. Wait for that job to end, cancel it"
                    f"{f' (scancel {holder.job_id})' if holder and holder.job_id else ''}, or use another "
                    "--output-dir."
                ) from None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OutputDirLockError(
                    f"the file system of {self.output_dir} does not support fcntl locks ({err.strerror}); "
                    "on Lustre mount with -o flock, or put the output directory on NFS/local disk, or set "
                    "RACO_OUTPUT_LOCK=0 to run without the lock (then make sure only one job uses the directory)"
                ) from None
            raise
        holder = LockHolder(
            host=socket.gethostname(),
            pid=os.getpid(),
            job_id=os.environ.get("SLURM_JOB_ID"),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays, naming the last holder). Safe to call twice."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _main(argv: list[str]) -> int:
    """``check-lock DIR``: 0 when DIR's lock is free (taken and released at once), 1 naming the holder."""
    if len(argv) != 2 or argv[0] != "check-lock":
        print("usage: python -m raco_ds.preemption check-lock OUTPUT_DIR", file=sys.stderr)
        return 2
    lock = OutputDirLock(argv[1])
    if not lock.enabled:
        print(f"output lock disabled (RACO_OUTPUT_LOCK=0): not checking {argv[1]}")
        return 0
    try:
        lock.acquire()
    except OutputDirLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    lock.release()
    print(f"output directory {argv[1]} is free")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
