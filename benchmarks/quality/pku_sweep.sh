#!/usr/bin/env bash
# PKU-SafeRLHF helpful vs harmless on the packaged SmolLM2-135M (bundled 400-pair sample): RACO vs
# linear vs CAGrad, 5 weights x 2 seeds, scored on the held-out preference pairs (all 120, and the
# 26 where the objectives disagree) with 95% intervals. Generation judges are not used on CPU:
# responses run to the token cap whatever the weights (benchmarks/quality/README.md).
# Restartable: finished points are skipped, evaluations are cached.
# Measured on the 2-core CPU VM (2026-12-05): a point trains in ~3 min (the first one also scores
# the reference, ~3 min); the evaluation then takes seconds per point (30 points: ~1.5 h).
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
# The trade-off where the objectives conflict, then the fronts on all pairs (results.json, pareto.png).
python launchers/sweep.py "${SWEEP[@]}" --seeds 0,1 --eval-only --threads 2 \
  --metrics accuracy_disagree/helpful,accuracy_disagree/harmless -- "${TRAIN[@]}"
mkdir -p "$OUT/disagree" && cp "$OUT/results.json" "$OUT/results.csv" "$OUT/pareto.png" "$OUT/disagree/"
python launchers/sweep.py "${SWEEP[@]}" --seeds 0,1 --eval-only --threads 2 \
  --metrics accuracy/helpful,accuracy/harmless -- "${TRAIN[@]}"
