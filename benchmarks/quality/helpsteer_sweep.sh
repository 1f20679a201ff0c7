#!/usr/bin/env bash
# HelpSteer helpfulness vs concise on the packaged SmolLM2-135M: RACO vs linear vs CAGrad,
# 5 weights x 2 seeds, then held-out pair metrics and judged generations with 95% intervals.
# Restartable: finished points are skipped, evaluations are cached (benchmarks/quality/README.md).
# Measured on the 2-core CPU VM (2026-12-05) with the CPU to itself: a point trains in 2-2.5 min and
# evaluates in ~45 s (30 points: ~1.5 h); other jobs on the machine slow it several-fold.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/quality/helpsteer}
TRAIN=(--data helpsteer --ds_config ds_configs/zero1.json --max-steps 12 --optimisation.micro_batch_size 8
       --optimisation.lr 1.5e-4 --model.trainable_last_blocks 4 --data.max_length 192 --data.max_prompt_length 64
       --data.num_eval_pairs 64 --data.num_train_pairs 96 --logging.progress_bar false --logging.tensorboard false)
python launchers/sweep.py --output-dir "$OUT" --objectives helpfulness,concise --aggregators linear,raco,cagrad \
  --grid-step 0.25 --seeds 0,1 --timeout-s 5400 --threads 2 --no-eval -- "${TRAIN[@]}"
python launchers/sweep.py --output-dir "$OUT" --objectives helpfulness,concise --aggregators linear,raco,cagrad \
  --grid-step 0.25 --seeds 0,1 --eval-only --threads 1 \
  --generate --num-prompts 64 --max-new-tokens 160 --gen-batch-size 8 --judges length_tokens,length_words \
  --metrics accuracy_disagree/helpfulness,-gen/length_tokens -- "${TRAIN[@]}"
