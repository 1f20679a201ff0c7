#!/usr/bin/env bash
# PKU-SafeRLHF helpful vs harmless on the packaged SmolLM2-135M (bundled 400-pair sample): RACO vs
# linear vs CAGrad, 5 weights x 2 seeds, then held-out pair metrics and generations judged by the
# judges feasible on a CPU (length, implicit reward), with 95% intervals.
# Restartable: finished points are skipped, evaluations are cached (benchmarks/quality/README.md).
# Measured on the 2-core CPU VM (2026-12-05): the first point also scores the reference (~3 min),
# then a point trains in ~2.7 min and evaluates in ~1.5 min (30 points: ~2 h).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/quality/pku}
TRAIN=(--data pku_saferlhf --ds_config ds_configs/zero1.json --max-steps 16 --optimisation.micro_batch_size 8
       --optimisation.lr 2e-4 --model.trainable_last_blocks 4 --data.max_length 192 --data.max_prompt_length 64
       --data.num_eval_pairs 120 --data.num_train_pairs 280 --logging.progress_bar false --logging.tensorboard false)
SWEEP=(--output-dir "$OUT" --objectives helpful,harmless --aggregators linear,raco,cagrad --grid-step 0.25)
# Seed 0 of every aggregator first, then seed 1.
python launchers/sweep.py "${SWEEP[@]}" --seeds 0 --timeout-s 5400 --threads 2 --no-eval -- "${TRAIN[@]}"
python launchers/sweep.py "${SWEEP[@]}" --seeds 0,1 --timeout-s 5400 --threads 2 --no-eval -- "${TRAIN[@]}"
python launchers/sweep.py "${SWEEP[@]}" --seeds 0,1 --eval-only --threads 1 \
  --generate --num-prompts 32 --max-new-tokens 128 --gen-batch-size 8 --judges length_tokens,length_words,implicit_reward \
  --metrics accuracy_disagree/helpful,-gen/length_tokens -- "${TRAIN[@]}"
