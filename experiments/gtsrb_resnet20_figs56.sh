#!/usr/bin/env bash
# Figs. 5/6 for GTSRB at test-time r in RATES (default 0, 0.5, 0.9): the evaluation
# protocol's defaults (paper budgets read literally, CE + CW x untargeted + targeted
# EOT-PGD, worst case per example, 5 draws of the defense, paper calibration rule) on the
# packaged 30-epoch random-r model, first N test images; then the normally trained model
# under the same attacks (no masks, r = 0).  Figures from every committed summary row.
# Re-running resumes by chunk; each setting's summary and rows are saved as it ends; a larger N extends the same settings, taking the committed
# rows of RES/rows up instead of recomputing them (evaluate.py --rows_from).
# READING=doubled NORMS="linf l2" NORMAL_TOO=0 reads the L-inf/L2 budgets on the [0, 1]
# scale instead (twice as large in X units; L0 has one reading), for the random-r model.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
N=${N:-1000}
RATES=${RATES:-"0 0.5 0.9"}
NORMS=${NORMS:-"linf l2 l0"}
READING=${READING:-literal}
NORMAL_TOO=${NORMAL_TOO:-1}
RANDOM_WD=${RANDOM_WD:-pretrained/gtsrb-resnet20-random}
NORMAL_WD=${NORMAL_WD:-pretrained/gtsrb-resnet20-normal}
# Another random-r model (RANDOM_WD) needs its own RES and OUT: the rows kept in RES/rows
# are taken up by setting name, and those of another model are refused (their
# setting.json records the model's digest).
RES=${RES:-experiments/results/gtsrb_resnet20_random_30ep}
RES_NORMAL=experiments/results/gtsrb_resnet20_normal_30ep
OUT=${OUT:-runs/gtsrb-resnet20-random-30ep-figs56}
OUT_NORMAL=runs/gtsrb-resnet20-normal-30ep-eval

for r in $RATES; do
  for norm in $NORMS; do
    evaluate_kept "$OUT" "$RES" eval_summary_figs56.jsonl --workdir "$RANDOM_WD" \
      --norm "$norm" --num_examples "$N" --drop_rates "$r" --budget_reading "$READING"
  done
done

if [ "$NORMAL_TOO" = 1 ] && [ -d "$NORMAL_WD" ]; then
  for norm in linf l2 l0; do
    evaluate_kept "$OUT_NORMAL" "$RES_NORMAL" eval_summary.jsonl --workdir "$NORMAL_WD" \
      --norm "$norm" --num_examples "$N"
  done
  plot_summaries "$RES_NORMAL" "$RES_NORMAL"/eval_summary*.jsonl
fi
plot_summaries "$RES" "$RES"/eval_summary*.jsonl
