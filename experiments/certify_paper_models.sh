#!/usr/bin/env bash
# The certified L0 radius of the paper's random-r models (the reproduction issue's
# "certified L0 radius" column): Levine & Feizi's certificate under exact-k zero-fill
# ablation of the pixels (the paper-model variant: k = 75 of the 1,024 pixels, n0 = 1,000,
# n = 10,000, alpha = 0.05), on the first N test images of GTSRB and CIFAR-10 (DATASETS).
# Resumes by chunk; takes the committed rows (RES/rows) up instead of recomputing them
# (certify.py --rows_from), so a larger N computes only the new images; ~10-17 min per
# 100 images per model on 2 cores (11,000 forward passes per image).  Per model: the
# summary RES/certify_k75_summary.jsonl, rows RES/rows/, the figure
# RES/certified_accuracy_k75.{png,svg}.  STOP_AT: no chunk starts that would end after it.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
N=${N:-500}
DATASETS=${DATASETS:-"gtsrb cifar10"}
for ds in $DATASETS; do
  WD=pretrained/${ds}-resnet20-random
  RES=experiments/results/${ds}_resnet20_random_30ep
  OUT=runs/${ds}-resnet20-random-certify-k75
  mkdir -p "$RES/rows"
  python certify.py --workdir "$WD" --out "$OUT" --keep 75 --num_examples "$N" \
    --rows_from "$RES/rows" --no_progress "${stop_at_args[@]}"
  save_rows "$OUT" "$RES"
  if [ -f "$OUT/summary.jsonl" ]; then  # finished (certify.py drew the figure in OUT)
    save_summary "$OUT" "$RES/certify_k75_summary.jsonl"
    for ext in png svg; do cp "$OUT/certified_accuracy.$ext" "$RES/certified_accuracy_k75.$ext"; done
  fi
done
