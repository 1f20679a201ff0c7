#!/bin/bash
# Per-task wrapper started by srun on every node: turns SLURM's task identity
# into the torch.distributed environment (what torchrun would set), then execs
# the trainer so signals from srun reach it directly.
#
#   RANK        = SLURM_PROCID   (global rank; srun's default block distribution
#                                 gives node i the ranks i*G .. i*G+G-1)
#   LOCAL_RANK  = SLURM_LOCALID  (rank on this node = the CUDA device index:
#                                 every task sees all GPUs of its node)
#   WORLD_SIZE  = SLURM_NTASKS   (tasks in this step)
#   NODE_RANK   = SLURM_NODEID
# MASTER_ADDR and MASTER_PORT come from the batch script through srun's --export=ALL.
set -euo pipefail
: "${SLURM_PROCID:?_task.sh runs under srun (SLURM_PROCID is unset)}"
: "${SLURM_LOCALID:?_task.sh runs under srun (SLURM_LOCALID is unset)}"
: "${SLURM_NTASKS:?_task.sh runs under srun (SLURM_NTASKS is unset)}"
: "${MASTER_ADDR:?MASTER_ADDR must be exported by the batch script}"
: "${MASTER_PORT:?MASTER_PORT must be exported by the batch script}"
export RANK="$SLURM_PROCID"
export LOCAL_RANK="$SLURM_LOCALID"
export WORLD_SIZE="$SLURM_NTASKS"
export NODE_RANK="${SLURM_NODEID:-0}"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${RACO_GPUS_PER_NODE:-8}}"
exec "$@"
