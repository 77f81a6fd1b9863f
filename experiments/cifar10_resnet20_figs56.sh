#!/usr/bin/env bash
# Figs. 5/6 for CIFAR-10: the packaged ResNet-20 random-r model (30-epoch CPU run,
# experiments/cifar10_resnet20_cpu.sh; another model through WD, OUT and RES, as the
# 180-epoch one in experiments/cpu_queue.sh step 17) under the paper's protocol (CIFAR-10 budgets read
# literally: L-inf 16/255, L2 1.0, L0 3% of the pixels; EOT-PGD 20 steps x 10 masks; CE and
# CW x untargeted and targeted, worst case per example; 5 draws; paper calibration rule)
# at the test-time drop rates RATES, first N test images; then the rows and the figures.
# Re-running resumes by chunk; each setting's summary and rows are saved as it ends; a
# larger N extends the same settings, taking the committed rows of RES/rows up instead of
# recomputing them (evaluate.py --rows_from).
# READING=doubled NORMS="linf l2" reads the L-inf/L2 budgets on the [0, 1] scale instead
# (twice as large in X units: L-inf 16/255 and L2 1.0 on the pixel scale; L0 has one
# reading), so the figures show both readings where they differ.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
N=${N:-500}
RATES=${RATES:-"0 0.5 0.9"}
NORMS=${NORMS:-"linf l2 l0"}
READING=${READING:-literal}
WD=${WD:-pretrained/cifar10-resnet20-random}
OUT=${OUT:-runs/cifar10-resnet20-random-30ep-figs56}
RES=${RES:-experiments/results/cifar10_resnet20_random_30ep}
for r in $RATES; do
  for norm in $NORMS; do
    evaluate_kept "$OUT" "$RES" eval_summary_figs56.jsonl --workdir "$WD" --norm "$norm" \
      --num_examples "$N" --drop_rates "$r" --budget_reading "$READING"
  done
done
# Figures and table from every committed summary (the strong column's rows too), as for
# GTSRB.
plot_summaries "$RES" "$RES"/eval_summary*.jsonl
