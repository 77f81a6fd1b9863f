#!/usr/bin/env bash
# The "strong" column of the reproduction issue, which the paper lacks, on the packaged
# 30-epoch GTSRB random-r model at test-time r = 0.5 and 0.9, first N test images:
#   * APGD-EOT (Croce & Hein's step-size schedule; CE and DLR x untargeted and
#     targeted) for L-inf and L2;
#   * the rejection-aware EOT-PGD (loss "rejection": cross-entropy of the mask-averaged
#     probabilities plus the entropy the detector thresholds), untargeted and targeted,
#     for L-inf, L2 and L0;
#   * Sparse-RS (black-box random search on the defended decision, margin and
#     rejection-aware losses, 1,000 queries) for L0.
# Paper budgets read literally, 20 iterations, EOT over 10 masks, 5 scoring draws,
# paper calibration.  Every setting gets its own id (attack variant) in one --out.
# Re-running resumes by chunk.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
N=${N:-500}
RATES=${RATES:-"0.5 0.9"}
WD=${WD:-pretrained/gtsrb-resnet20-random}
OUT=${OUT:-runs/gtsrb-resnet20-random-30ep-strong}
RES=experiments/results/gtsrb_resnet20_random_30ep
for r in $RATES; do
  common=(--workdir "$WD" --out "$OUT" --num_examples "$N" --drop_rates "$r" --no_progress)
  for norm in linf l2; do
    python evaluate.py "${common[@]}" --norm "$norm" --attack apgd
  done
  for norm in linf l2 l0; do
    python evaluate.py "${common[@]}" --norm "$norm" --losses rejection
  done
  python evaluate.py "${common[@]}" --norm l0 --attack sparse_rs --losses margin rejection
done
cp "$OUT/summary.jsonl" "$RES/eval_summary_strong.jsonl"
save_rows "$OUT" "$RES"
python -m dropjax.plots "$RES"/eval_summary*.jsonl --out "$RES"
