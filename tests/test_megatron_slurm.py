"""slurm/raco_megatron.sh on the simulated SLURM cluster of tests/test_slurm.py: dry run, ranks, requeue.

The Megatron script shares slurm/_launch.sh with the DeepSpeed sizes
(RACO_BACKEND=megatron): the same hostfile, rendezvous, lock, srun line and
USR1 -> exit 85 -> requeue contract, but no DeepSpeed preflight plan and no
``--ds_config``; the trainer is launchers/train_megatron.py.
"""

from __future__ import annotations

import json
import signal
import subprocess

from test_slurm import JOB_ID, ROOT, calls, cluster, run_script  # noqa: F401 - fixture

SCRIPT = "slurm/raco_megatron.sh"


def test_bash_syntax_and_requeue_header() -> None:
    result = subprocess.run(["bash", "-n", SCRIPT], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (ROOT / SCRIPT).read_text()
    assert 'source "$RACO_ROOT/slurm/_launch.sh"' in text
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append"):
        assert line in text, f"{SCRIPT} lacks {line}"


def test_dry_run_launches_the_megatron_trainer(cluster: dict[str, object]) -> None:  # noqa: F811
    env = dict(cluster["env"], RACO_DRY_RUN="1", SLURM_NTASKS_PER_NODE="8")  # type: ignore[arg-type]
    for key in ("RACO_PLAN_MODEL", "RACO_TRAIN_ENTRY", "RACO_OUTPUT_DIR"):
        del env[key]
    result = run_script(SCRIPT, env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    srun = next(line for line in out.splitlines() if line.startswith("+ srun"))
    assert "--nodes=3" in srun and "--ntasks-per-node=8" in srun and "--ntasks=24" in srun
    assert "launchers/train_megatron.py" in srun and "--resume" in srun and "--ds_config" not in srun
    assert "--megatron.tensor_parallel 8" in srun and "--output-dir outputs/raco-megatron" in srun
    assert not any("launchers/plan.py" in line for line in out.splitlines()), "no ZeRO plan for Megatron"
    assert "#   RANK=23 LOCAL_RANK=7 NODE_RANK=2 host=gpu-03" in out
    assert f"scontrol requeue {JOB_ID}" in out
    assert calls(cluster) == ""


def test_megatron_options_parse_as_launched(cluster: dict[str, object]) -> None:  # noqa: F811
    """The trainer arguments the script launches are a valid Megatron config (no start-up needed to find out)."""
    from raco_ds.megatron.config import parse_megatron_args

    env = dict(cluster["env"], RACO_DRY_RUN="1")  # type: ignore[arg-type]
    del env["RACO_SEQ_LEN"]  # the script's own: its data.max_prompt_length must fit in it
    srun = next(line for line in run_script(SCRIPT, env).stdout.splitlines() if line.startswith("+ srun"))
    argv = srun.split(" -u ", 1)[1].split()[1:]
    cfg = parse_megatron_args([arg.replace("\\", "") for arg in argv])
    assert cfg.megatron.tensor_parallel == 8 and cfg.checkpointing.resume is True and cfg.data.max_length == 4096


def test_usr1_checkpoints_and_requeues(cluster: dict[str, object]) -> None:  # noqa: F811
    env = dict(cluster["env"], FAKE_MODE="wait")  # type: ignore[arg-type]
    proc = subprocess.Popen(["bash", SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        _wait_ready(cluster, proc)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert f"scontrol requeue {JOB_ID}" in calls(cluster)
    record = json.loads((cluster["out"] / "rank0.json").read_text())  # type: ignore[operator]
    assert "--resume" in record["argv"] and "--ds_config" not in record["argv"]


def _wait_ready(cluster: dict[str, object], proc: subprocess.Popen[str]) -> None:
    import time

    deadline = time.time() + 90
    while sum(1 for _ in cluster["out"].glob("ready*")) < 6:  # type: ignore[union-attr]
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the fake trainers did not start"
        time.sleep(0.1)
