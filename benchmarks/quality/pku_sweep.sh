#!/usr/bin/env bash
# PKU-SafeRLHF helpful vs harmless on the packaged SmolLM2-135M (bundled 400-pair sample): RACO vs
# linear vs CAGrad, 5 weights x 2 seeds, with the judges feasible on a CPU (length, implicit reward).
# Not recorded: at this scale the held-out margins did not move beyond noise (README.md, main job).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/quality/pku}
TRAIN=(--data pku_saferlhf --ds_config ds_configs/zero1.json --max-steps 24
       --optimisation.micro_batch_size 8 --optimisation.lr 2e-4 --model.trainable_last_blocks 4
       --data.max_length 192 --data.max_prompt_length 64 --data.num_eval_pairs 80 --data.num_train_pairs 192
       --logging.progress_bar false --logging.tensorboard false)
python launchers/sweep.py --output-dir "$OUT" --objectives helpful,harmless --aggregators linear,raco,cagrad \
  --grid-step 0.25 --seeds 0,1 --timeout-s 5400 --threads 2 --no-eval -- "${TRAIN[@]}"
python launchers/sweep.py --output-dir "$OUT" --objectives helpful,harmless --aggregators linear,raco,cagrad \
  --grid-step 0.25 --seeds 0,1 --eval-only --threads 1 \
  --generate --num-prompts 64 --max-new-tokens 160 --gen-batch-size 8 --judges length_tokens,implicit_reward \
  --metrics accuracy/helpful,accuracy/harmless -- "${TRAIN[@]}"
