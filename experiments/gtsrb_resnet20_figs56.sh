#!/usr/bin/env bash
# Figs. 5/6 for GTSRB at test-time r = 0 and 0.9 (r = 0.5 is in
# gtsrb_resnet20_random_30ep_eval.sh): the evaluation protocol's defaults (paper
# budgets read literally, CE + CW x untargeted + targeted EOT-PGD, worst case per
# example, 5 draws of the defense, paper calibration rule) on the packaged 30-epoch
# random-r model, first N test images; then the normally trained model under the
# same attacks (no masks, r = 0).  Figures from every committed summary row.
# Re-running resumes by chunk.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
N=${N:-500}
RANDOM_WD=${RANDOM_WD:-pretrained/gtsrb-resnet20-random}
NORMAL_WD=${NORMAL_WD:-pretrained/gtsrb-resnet20-normal}
RES=experiments/results/gtsrb_resnet20_random_30ep
RES_NORMAL=experiments/results/gtsrb_resnet20_normal_30ep
OUT=runs/gtsrb-resnet20-random-30ep-figs56
OUT_NORMAL=runs/gtsrb-resnet20-normal-30ep-eval

for r in 0 0.9; do
  for norm in linf l2 l0; do
    python evaluate.py --workdir "$RANDOM_WD" --out "$OUT" --norm "$norm" --num_examples "$N" \
      --drop_rates "$r" --no_progress
  done
done
cp "$OUT/summary.jsonl" "$RES/eval_summary_figs56.jsonl"
save_rows "$OUT" "$RES"

if [ -d "$NORMAL_WD" ]; then
  for norm in linf l2 l0; do
    python evaluate.py --workdir "$NORMAL_WD" --out "$OUT_NORMAL" --norm "$norm" \
      --num_examples "$N" --no_progress
  done
  mkdir -p "$RES_NORMAL"
  cp "$OUT_NORMAL/summary.jsonl" "$RES_NORMAL/eval_summary.jsonl"
  save_rows "$OUT_NORMAL" "$RES_NORMAL"
  python -m dropjax.plots "$RES_NORMAL/eval_summary.jsonl" --out "$RES_NORMAL"
fi
python -m dropjax.plots "$RES/eval_summary.jsonl" "$RES/eval_summary_figs56.jsonl" --out "$RES"
