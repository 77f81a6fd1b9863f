#!/usr/bin/env bash
# The evaluation protocol's defaults (paper budgets read literally, CE + CW x
# untargeted + targeted EOT-PGD, worst case per example, 5 draws of the defense,
# paper calibration rule) on the packaged 30-epoch GTSRB random-r model, test-time
# r = 0.5, first 500 test images; the clean drop-rate sweep (Fig. 2) on 1,000; the
# gradient-masking sanity checks; then the figures.  Re-running resumes by chunk.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DROPJAX_DATA_DIR:=$PWD/.data}"; export DROPJAX_DATA_DIR
WD=${WD:-pretrained/gtsrb-resnet20-random}
OUT=${OUT:-runs/gtsrb-resnet20-random-30ep-eval}
RES=experiments/results/gtsrb_resnet20_random_30ep
N=${N:-500}
for norm in linf l2 l0; do
  python evaluate.py --workdir "$WD" --out "$OUT" --norm "$norm" --num_examples "$N" --no_progress
done
python evaluate.py --workdir "$WD" --out "$OUT" --norm none --num_examples 1000 \
  --drop_rates 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --no_progress
python evaluate.py --workdir "$WD" --out "$OUT" --norm linf --sanity --no_progress || true
mkdir -p "$RES"
cp "$OUT/summary.jsonl" "$RES/eval_summary.jsonl"
[ -f "$OUT/sanity/checks.jsonl" ] && cp "$OUT/sanity/checks.jsonl" "$RES/sanity_checks.jsonl"
[ -f "$OUT/sanity/loss_curve.jsonl" ] && cp "$OUT/sanity/loss_curve.jsonl" "$RES/sanity_loss_curve.jsonl"
python -m dropjax.plots "$OUT" --out "$RES"
