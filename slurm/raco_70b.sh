#!/bin/bash
# RACO on a Llama-3-70B-shaped model: N nodes x 8 GPUs, ZeRO-3, bf16, requeue-safe.
#
#   mkdir -p logs && sbatch slurm/raco_70b.sh           # from the repository root
#   sbatch --nodes=32 --time=12:00:00 slurm/raco_70b.sh  # any #SBATCH line can be overridden
#   RACO_OFFLOAD=optimizer sbatch --nodes=4 slurm/raco_70b.sh
#   RACO_DRY_RUN=1 ... bash slurm/raco_70b.sh           # print the commands (docs/cluster.md)
#
# SLURM resources: edit them here, in one place. sbatch parses these lines before
# bash runs, so they cannot hold variables; the script reads the allocation back
# from SLURM_* at run time, so nothing below repeats them.
#SBATCH --job-name=raco-70b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --partition=gpu
##SBATCH --account=CHANGE_ME
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

# Run settings for this size (override any of them from the environment).
: "${RACO_MODEL:=meta-llama/Meta-Llama-3-70B-Instruct}"  # trainer --model: a local HF folder is best
: "${RACO_PLAN_MODEL:=llama3-70b}"          # preflight shape: a preset, or $RACO_MODEL/config.json
: "${RACO_DS_CONFIG:=ds_configs/zero3_70b.json}"
: "${RACO_OUTPUT_DIR:=outputs/raco-70b}"
: "${RACO_MICRO_BATCH:=1}"                 # pairs per micro-batch per GPU
: "${RACO_SEQ_LEN:=4096}"                  # tokens per row

# sbatch runs a copy of this file from a spool directory: find the checkout from
# the submit directory (submit from the repository root) or RACO_ROOT.
RACO_ROOT="${RACO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
# shellcheck source=slurm/_launch.sh
source "$RACO_ROOT/slurm/_launch.sh"
