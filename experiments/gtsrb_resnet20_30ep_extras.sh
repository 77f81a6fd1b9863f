#!/usr/bin/env bash
# The cheap rows of the GTSRB reproduction from the three packaged 30-epoch models:
# clean accuracy vs test-time r (single mask and 10-mask average, Fig. 2) for the
# normal and fixed-r models on the first 1,000 test images (the random-r model's is in
# gtsrb_resnet20_random_30ep_eval.sh), and the interpretability figures (Figs. 3, 4)
# with the gradient-mass numbers over the whole test set.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
RATES="0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"
for name in normal fixed; do
  OUT=runs/gtsrb-resnet20-$name-30ep-eval
  RES=experiments/results/gtsrb_resnet20_${name}_30ep
  python evaluate.py --workdir pretrained/gtsrb-resnet20-$name --out "$OUT" --norm none \
    --num_examples 1000 --drop_rates $RATES --no_progress
  mkdir -p "$RES"
  cp "$OUT/summary.jsonl" "$RES/clean_summary.jsonl"
done
python -m dropjax.plots experiments/results/gtsrb_resnet20_{normal,fixed}_30ep/clean_summary.jsonl \
  experiments/results/gtsrb_resnet20_random_30ep/eval_summary.jsonl \
  --figures clean --out experiments/results/gtsrb_resnet20_30ep_models
python -m dropjax.explain --workdirs pretrained/gtsrb-resnet20-{normal,fixed,random} \
  --drop_rate 0.9 --num_examples 12630 --out experiments/results/gtsrb_resnet20_30ep_models
