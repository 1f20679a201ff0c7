#!/bin/bash
# RACO on megatron-core: N nodes x 8 GPUs, tensor x pipeline x data parallel, bf16, requeue-safe.
#
#   mkdir -p logs && sbatch slurm/raco_megatron.sh       # from the repository root
#   sbatch --nodes=4 slurm/raco_megatron.sh
#   RACO_TRAIN_ARGS="--megatron.tensor_parallel 4 ..." sbatch slurm/raco_megatron.sh
#   RACO_DRY_RUN=1 ... bash slurm/raco_megatron.sh     # print the commands (docs/cluster.md)
#
# Same template as slurm/raco_8b.sh (slurm/_launch.sh): one task per GPU, --resume
# always, USR1 300 s before the limit -> checkpoint, exit 85, scontrol requeue.
# Megatron's data-parallel size is the world size / (tensor_parallel x pipeline_parallel).
#SBATCH --job-name=raco-megatron
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

# Run settings (override any of them from the environment).
: "${RACO_BACKEND:=megatron}"
# A random GPT of the megatron.* shape below. To start from a Hugging Face model, set RACO_MODEL to its
# folder and drop the megatron.num_layers/hidden_size/num_attention_heads/ffn_hidden_size options (its
# config gives the shape); add --checkpointing.export true for an HF export in $RACO_OUTPUT_DIR/export.
: "${RACO_MODEL:=random-gpt}"
: "${RACO_OUTPUT_DIR:=outputs/raco-megatron}"
: "${RACO_MICRO_BATCH:=1}"                 # pairs per micro-batch per data-parallel rank
: "${RACO_SEQ_LEN:=4096}"                  # tokens per row (data.max_length; pipeline shapes are fixed)
# Llama-3-8B's shape at TP 8 (one node); checkpoints every 100 steps besides the requeue ones.
: "${RACO_TRAIN_ARGS:=--model.dtype bf16 --megatron.tensor_parallel 8 --megatron.pipeline_parallel 1 --megatron.num_layers 32 --megatron.hidden_size 4096 --megatron.num_attention_heads 32 --megatron.ffn_hidden_size 14336 --data.max_prompt_length 1024 --checkpointing.save_every 100 --checkpointing.save_final true}"

RACO_ROOT="${RACO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
# shellcheck source=slurm/_launch.sh
source "$RACO_ROOT/slurm/_launch.sh"
