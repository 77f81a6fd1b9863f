#!/usr/bin/env bash
# The randomized-ablation model for the certification issue (Levine & Feizi 2020): a
# ResNet-20 (DATASET: gtsrb, the default, or cifar10) trained on exactly k = 75 of the
# 1,024 pixels per example per step (Levine & Feizi's CIFAR-10 setting), doubled
# encoding, EPOCHS epochs (default: the preset's 30 for GTSRB; cosine schedule over
# EPOCHS); then its certificate (n0 = 1,000, n = 10,000, alpha = 0.05) on the first N
# test images, and the figure.  Both steps resume exactly when re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
DATASET=${DATASET:-gtsrb}
N=${N:-200}
EPOCHS=${EPOCHS:-30}
WD=${WD:-runs/${DATASET}-resnet20-ablate75-${EPOCHS}ep}
RES=experiments/results/${DATASET}_resnet20_ablate75_${EPOCHS}ep
python train.py --preset "${DATASET}-resnet20-ablate75" --epochs "$EPOCHS" --workdir "$WD" \
  --keep_checkpoints 1 --no_progress
mkdir -p "$RES/rows"  # certificate rows kept there are taken up, not recomputed
python certify.py --workdir "$WD" --out "$WD/certify" --num_examples "$N" --no_progress \
  --rows_from "$RES/rows"
save_run "$WD" "$RES"
cp "$WD/certify/summary.jsonl" "$RES/certify_summary.jsonl"
save_rows "$WD/certify" "$RES"
python -m dropjax.plots "$WD/certify" --out "$RES"
