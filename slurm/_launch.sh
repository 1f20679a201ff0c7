# shellcheck shell=bash
# Shared body of slurm/raco_*.sh (sourced, never run on its own; see docs/cluster.md).
#
# The size scripts set their defaults and source this file, which:
#   1. reads the allocation from SLURM (nodes, tasks per node, node list),
#   2. writes the hostfile, picks MASTER_ADDR (first host) and MASTER_PORT,
#   3. refuses a second job on the same output directory (raco_ds.preemption lock),
#   4. DeepSpeed: runs the preflight memory plan (launchers/plan.py), which also
#      writes the DeepSpeed config actually launched (offload applied); Megatron
#      (RACO_BACKEND=megatron, slurm/raco_megatron.sh): no plan (it models ZeRO),
#   5. starts one trainer per GPU with srun (slurm/_task.sh sets RANK, LOCAL_RANK,
#      WORLD_SIZE), always with --resume,
#   6. on the time-limit warning (USR1, sent to this shell by --signal=B:USR1@300)
#      forwards it to the tasks; the trainer checkpoints and exits with
#      EXIT_REQUEUE (85), and this script then runs `scontrol requeue`.
#
# RACO_DRY_RUN=1 prints every command instead of running it (read-only queries
# such as `scontrol show hostnames` still run, to resolve the hosts).

set -euo pipefail

# --- settings shared by every size (each can be overridden from the environment) ---
: "${RACO_OBJECTIVES:=helpful,harmless}"   # objective names (K = their count)
: "${RACO_WEIGHTS:=0.5,0.5}"               # user weights, one per objective
: "${RACO_DATA:=pku_saferlhf}"             # trainer data preset or JSON-lines path
: "${RACO_OFFLOAD:=none}"                  # none | optimizer | param  (ZeRO-3 CPU offload)
: "${RACO_GPU_MEM_GIB:=79.6}"              # usable GiB per GPU (H100 80GB 79.6, H200 140.4)
: "${RACO_HOST_MEM_GIB:=}"                 # host GiB per node, checked when offloading (empty: unchecked)
: "${RACO_REFERENCE:=resident}"            # resident | cached  (how the plan counts the DPO reference)
: "${RACO_TRAIN_ARGS:=--model.dtype bfloat16 --model.gradient_checkpointing true --model.trainable_last_blocks -1}"
: "${RACO_MAX_REQUEUES:=20}"               # stop requeueing after this many restarts (a job that never progresses)
: "${RACO_PYTHON:=python3}"
: "${RACO_BACKEND:=deepspeed}"             # deepspeed (launchers/train.py) | megatron (launchers/train_megatron.py)
case "$RACO_BACKEND" in
    deepspeed) : "${RACO_TRAIN_ENTRY:=launchers/train.py}" ;;
    megatron) : "${RACO_TRAIN_ENTRY:=launchers/train_megatron.py}" ;;
    *) printf 'error: RACO_BACKEND=%s; use deepspeed or megatron\n' "$RACO_BACKEND" >&2; exit 1 ;;
esac
: "${RACO_DRY_RUN:=0}"
# NCCL / CUDA. Exported only when set, so the cluster's own defaults stay in force otherwise.
: "${NCCL_DEBUG:=WARN}"                    # INFO to debug hangs and topology
: "${NCCL_SOCKET_IFNAME:=}"                # e.g. ib0 or ^lo,docker0: the interface for NCCL's bootstrap
: "${NCCL_IB_HCA:=}"                       # e.g. mlx5: which InfiniBand adapters NCCL may use
: "${NCCL_IB_GID_INDEX:=}"                 # RoCE clusters usually need 3
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"  # abort on a failed/hung collective instead of hanging to the time limit
# DeepSpeed's op builder cannot parse "9.0a" (HOOKS.md): pin a plain arch so JIT ops (CPU Adam, ...) build.
: "${TORCH_CUDA_ARCH_LIST:=9.0}"

readonly EXIT_REQUEUE=85   # = raco_ds.preemption.EXIT_REQUEUE (tests/test_slurm.py keeps them equal)

raco_log() { printf '[raco %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
raco_die() { raco_log "error: $*"; exit 1; }
is_dry_run() { [[ "$RACO_DRY_RUN" == "1" ]]; }
# Run a command, or print it (shell-quoted, copy-pastable) under RACO_DRY_RUN=1.
run() {
    if is_dry_run; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# --- 1. the allocation ---
cd "$RACO_ROOT"
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (or preview with RACO_DRY_RUN=1 and faked SLURM_* variables)}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is unset: submit with sbatch}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM_JOB_NUM_NODES is unset}}"
GPUS_PER_NODE="${SLURM_NTASKS_PER_NODE:-8}"   # one task (rank) per GPU: --ntasks-per-node = --gpus-per-node
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#HOSTS[@]} == NNODES)) ||
    raco_die "scontrol show hostnames gave ${#HOSTS[@]} hosts for $NNODES nodes (SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST)"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
raco_log "job $SLURM_JOB_ID (restart $RESTARTS): $NNODES nodes x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks"

# --- 2. rendezvous ---
export MASTER_ADDR="${HOSTS[0]}"
# Derived from the job id: stable across requeues (same id), different for jobs sharing a node.
export MASTER_PORT="${RACO_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export RACO_GPUS_PER_NODE="$GPUS_PER_NODE"
export NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_CUDA_ARCH_LIST
for var in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX; do
    if [[ -n "${!var}" ]]; then export "${var?}"; else unset "$var"; fi
done
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"
export PYTHONUNBUFFERED=1

HOSTFILE="$RACO_OUTPUT_DIR/hostfile"
HOSTFILE_TEXT="$(for host in "${HOSTS[@]}"; do printf '%s slots=%s\n' "$host" "$GPUS_PER_NODE"; done)"
run mkdir -p "$RACO_OUTPUT_DIR"
if is_dry_run; then
    printf '# hostfile %s (DeepSpeed format; srun does not need it, pdsh launches would):\n%s\n' \
        "$HOSTFILE" "$HOSTFILE_TEXT"
else
    printf '%s\n' "$HOSTFILE_TEXT" >"$HOSTFILE"
fi
printf '# MASTER_ADDR=%s MASTER_PORT=%s WORLD_SIZE=%s\n' "$MASTER_ADDR" "$MASTER_PORT" "$WORLD_SIZE"

# --- 3. one job per output directory (the trainer's rank 0 holds the lock for the whole run) ---
run "$RACO_PYTHON" -m raco_ds.preemption check-lock "$RACO_OUTPUT_DIR" ||
    raco_die "output directory $RACO_OUTPUT_DIR is locked by another job (message above)"

# --- 4. DeepSpeed: preflight memory plan, which writes the DeepSpeed config that is launched ---
if [[ "$RACO_BACKEND" == "deepspeed" ]]; then
    DS_CONFIG_RUN="$RACO_OUTPUT_DIR/ds_config.json"
    PLAN=("$RACO_PYTHON" launchers/plan.py --model "$RACO_PLAN_MODEL" --nodes "$NNODES"
        --gpus-per-node "$GPUS_PER_NODE" --ds-config "$RACO_DS_CONFIG" --offload "$RACO_OFFLOAD"
        --objectives "$RACO_OBJECTIVES" --micro-batch "$RACO_MICRO_BATCH" --seq-len "$RACO_SEQ_LEN"
        --gpu-mem-gib "$RACO_GPU_MEM_GIB" --reference "$RACO_REFERENCE" --write-ds-config "$DS_CONFIG_RUN")
    if [[ -n "$RACO_HOST_MEM_GIB" ]]; then PLAN+=(--host-mem-gib "$RACO_HOST_MEM_GIB"); fi
    run "${PLAN[@]}" || raco_die "the preflight plan refused this job (see above: change the layout, then resubmit)"
    ENGINE_ARGS=(--ds_config "$DS_CONFIG_RUN")
else
    raco_log "megatron: no preflight plan (launchers/plan.py models DeepSpeed ZeRO only)"
    ENGINE_ARGS=()
fi

# --- 5. one trainer per GPU on every node ---
read -r -a TRAIN_ARGS <<<"$RACO_TRAIN_ARGS"
SRUN=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --ntasks="$WORLD_SIZE"
    --kill-on-bad-exit=1 --export=ALL
    # srun stopped inheriting sbatch's --cpus-per-task in SLURM 22.05: without it each rank gets one core.
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
    bash slurm/_task.sh "$RACO_PYTHON" -u "$RACO_TRAIN_ENTRY"
    "${ENGINE_ARGS[@]}" --model "$RACO_MODEL" --data "$RACO_DATA"
    --objectives "$RACO_OBJECTIVES" --weights "$RACO_WEIGHTS" --output-dir "$RACO_OUTPUT_DIR"
    --optimisation.micro_batch_size "$RACO_MICRO_BATCH" --data.max_length "$RACO_SEQ_LEN"
    --resume "${TRAIN_ARGS[@]}")

if is_dry_run; then
    run "${SRUN[@]}"
    printf '# ranks (srun block distribution; slurm/_task.sh exports them per task):\n'
    for ((node = 0; node < NNODES; node++)); do
        for ((gpu = 0; gpu < GPUS_PER_NODE; gpu++)); do
            printf '#   RANK=%d LOCAL_RANK=%d NODE_RANK=%d host=%s\n' \
                $((node * GPUS_PER_NODE + gpu)) "$gpu" "$node" "${HOSTS[node]}"
        done
    done
    printf '# after the step: exit %d after USR1 -> scontrol requeue %s\n' "$EXIT_REQUEUE" "$SLURM_JOB_ID"
    exit 0
fi

# --- 6. run, forwarding the time-limit warning, then requeue ---
TIME_LIMIT_WARNED=0
INTERRUPTED=0
# shellcheck disable=SC2329  # invoked by the trap below
forward_usr1() {
    INTERRUPTED=1
    TIME_LIMIT_WARNED=1
    raco_log "USR1 (time limit near): forwarding to the trainers, which checkpoint and exit $EXIT_REQUEUE"
    # srun relays the signals it receives to every task of its step.
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
# shellcheck disable=SC2329  # invoked by the trap below
note_term() {
    INTERRUPTED=1
    # slurmd already sent SIGTERM to every task; do not requeue from here (see docs/cluster.md).
    raco_log "TERM (cancelled, preempted or out of time): the trainers were signalled by SLURM directly"
}
trap forward_usr1 USR1
trap note_term TERM

raco_log "starting: ${SRUN[*]}"
# In the background: bash runs traps only between commands, and `wait` is interruptible.
"${SRUN[@]}" &
SRUN_PID=$!
while :; do
    INTERRUPTED=0
    set +e
    wait "$SRUN_PID"
    rc=$?
    set -e
    # A trapped signal interrupts `wait` with a status above 128 before srun ends: wait again
    # (bash keeps srun's status until it is waited for).
    if ((rc > 128 && INTERRUPTED == 1)); then continue; fi
    break
done
trap - USR1 TERM
raco_log "srun exited with $rc"

if ((rc == EXIT_REQUEUE)); then
    if ((TIME_LIMIT_WARNED == 0)); then
        raco_log "trainers checkpointed after SIGTERM: not requeueing (SLURM requeues preempted jobs itself)"
        exit "$rc"
    fi
    if ((RESTARTS >= RACO_MAX_REQUEUES)); then
        raco_die "checkpointed, but this job already restarted $RESTARTS times (RACO_MAX_REQUEUES=$RACO_MAX_REQUEUES): not requeueing"
    fi
    raco_log "checkpointed before the time limit: requeueing job $SLURM_JOB_ID (it resumes with --resume)"
    run scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
