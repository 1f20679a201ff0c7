#!/bin/bash
# RACO on a Llama-3-8B-shaped model: N nodes x 8 GPUs, ZeRO-3, bf16, requeue-safe.
#
#   mkdir -p logs && sbatch slurm/raco_8b.sh             # from the repository root
#   sbatch --nodes=2 slurm/raco_8b.sh
#   RACO_DRY_RUN=1 ... bash slurm/raco_8b.sh            # print the commands (docs/cluster.md)
#
# SLURM resources: edit them here, in one place (see slurm/raco_70b.sh for why
# they are not variables).
#SBATCH --job-name=raco-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
#SBATCH --partition=gpu
##SBATCH --account=CHANGE_ME
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

# Run settings for this size (override any of them from the environment).
: "${RACO_MODEL:=meta-llama/Meta-Llama-3-8B-Instruct}"
: "${RACO_PLAN_MODEL:=llama3-8b}"
: "${RACO_DS_CONFIG:=ds_configs/zero3_8b.json}"
: "${RACO_OUTPUT_DIR:=outputs/raco-8b}"
: "${RACO_MICRO_BATCH:=1}"                 # pairs per micro-batch per GPU (2 nearly fills 80 GB: logits)
: "${RACO_SEQ_LEN:=4096}"

RACO_ROOT="${RACO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
# shellcheck source=slurm/_launch.sh
source "$RACO_ROOT/slurm/_launch.sh"
