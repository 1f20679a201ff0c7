"""raco_ds.preemption: stop signals become a polled flag; the output-directory lock names its holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from raco_ds.preemption import (
    EXIT_REQUEUE,
    LOCK_FILE_NAME,
    OutputDirLock,
    OutputDirLockError,
    PreemptionHandler,
)

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    env.update(extra)
    return env


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_flag_and_nothing_else(sig: signal.Signals) -> None:
    with PreemptionHandler() as handler:
        assert not handler.requested and not handler.should_stop()
        os.kill(os.getpid(), sig)  # delivered before os.kill returns, to the main thread
        assert handler.requested and handler.should_stop()
        assert handler.signal_name == sig.name


def test_uninstall_restores_previous_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler().install()
    assert signal.getsignal(signal.SIGUSR1) != before
    handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_first_signal_is_kept() -> None:
    handler = PreemptionHandler()
    handler.request(signal.SIGUSR1)
    handler.request(signal.SIGTERM)
    assert handler.signal_name == "SIGUSR1"


def test_exit_uses_the_requeue_code() -> None:
    handler = PreemptionHandler()
    handler.request()
    with pytest.raises(SystemExit) as exit_info:
        handler.exit()
    assert exit_info.value.code == EXIT_REQUEUE == 85


def test_trainer_loop_exits_with_the_code_on_usr1(tmp_path: Path) -> None:
    """A process running the documented loop, signalled from outside, exits 85 after 'checkpointing'."""
    script = (
        "import sys, time\n"
        "from raco_ds.preemption import PreemptionHandler\n"
        "stop = PreemptionHandler().install()\n"
        "print('ready', flush=True)\n"
        "for step in range(10_000):\n"
        "    time.sleep(0.01)\n"
        "    if stop.should_stop():\n"
        f"        open({str(tmp_path / 'ckpt')!r}, 'w').write(str(step))\n"
        "        stop.exit()\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EXIT_REQUEUE
    assert (tmp_path / "ckpt").exists()


# --- the lock ----------------------------------------------------------------

_HOLD = (
    "import sys, time\n"
    "from raco_ds.preemption import OutputDirLock\n"
    "lock = OutputDirLock(sys.argv[1]).acquire()\n"
    "lock.holder()\n"  # reading the holder while holding must not drop the lock (POSIX close semantics)
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)


def _hold(directory: Path, job_id: str = "777") -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], env=_env(SLURM_JOB_ID=job_id),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_lock_conflict_names_the_holder(tmp_path: Path) -> None:
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(OutputDirLockError) as err:
            OutputDirLock(tmp_path / "run").acquire()
        message = str(err.value)
        assert "SLURM job 777" in message and f"pid {holder.pid}" in message and "scancel 777" in message
        assert "--output-dir" in message
        cli = subprocess.run([sys.executable, "-m", "raco_ds.preemption", "check-lock", str(tmp_path / "run")],
                             env=_env(), capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and "SLURM job 777" in cli.stderr
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_holder_is_not_stale(tmp_path: Path) -> None:
    holder = _hold(tmp_path / "run", job_id="778")
    holder.kill()  # SIGKILL: no cleanup ran; the kernel still drops the fcntl lock
    holder.wait()
    lock = OutputDirLock(tmp_path / "run", enabled=True).acquire()
    try:
        record = json.loads((tmp_path / "run" / LOCK_FILE_NAME).read_text())
        assert record["pid"] == os.getpid()  # the new holder overwrote the dead one's record
        assert lock.holder() is not None and lock.holder().pid == os.getpid()  # type: ignore[union-attr]
    finally:
        lock.release()


def test_lock_release_and_reacquire(tmp_path: Path) -> None:
    with OutputDirLock(tmp_path / "run") as lock:
        assert lock.held
    assert not lock.held
    lock.release()  # twice is fine
    cli = subprocess.run([sys.executable, "-m", "raco_ds.preemption", "check-lock", str(tmp_path / "run")],
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr


def test_lock_can_be_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RACO_OUTPUT_LOCK", "0")
    lock = OutputDirLock(tmp_path / "run").acquire()
    assert not lock.enabled and not lock.held
    assert not (tmp_path / "run" / LOCK_FILE_NAME).exists()
