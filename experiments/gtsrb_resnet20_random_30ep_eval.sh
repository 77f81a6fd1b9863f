#!/usr/bin/env bash
# The packaged 30-epoch GTSRB random-r model: the clean drop-rate sweep (Fig. 2) on the
# first 1,000 test images and the gradient-masking sanity checks (the evaluation
# protocol's defaults), then the figures.  Its robust accuracy under the paper's attacks
# (Figs. 5/6, r = 0, 0.5, 0.9) is experiments/gtsrb_resnet20_figs56.sh.  Re-running
# resumes by chunk.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DROPJAX_DATA_DIR:=$PWD/.data}"; export DROPJAX_DATA_DIR
WD=${WD:-pretrained/gtsrb-resnet20-random}
OUT=${OUT:-runs/gtsrb-resnet20-random-30ep-eval}
RES=experiments/results/gtsrb_resnet20_random_30ep
python evaluate.py --workdir "$WD" --out "$OUT" --norm none --num_examples 1000 \
  --drop_rates 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --no_progress
python evaluate.py --workdir "$WD" --out "$OUT" --norm linf --sanity --no_progress || true
mkdir -p "$RES"
cp "$OUT/summary.jsonl" "$RES/eval_summary.jsonl"
[ -f "$OUT/sanity/checks.jsonl" ] && cp "$OUT/sanity/checks.jsonl" "$RES/sanity_checks.jsonl"
[ -f "$OUT/sanity/loss_curve.jsonl" ] && cp "$OUT/sanity/loss_curve.jsonl" "$RES/sanity_loss_curve.jsonl"
python -m dropjax.plots "$OUT" --out "$RES"
