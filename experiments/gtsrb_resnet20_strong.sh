#!/usr/bin/env bash
# The "strong" column of the reproduction issue, which the paper lacks, on the packaged
# 30-epoch GTSRB random-r model at test-time r = 0.5 and 0.9 (RATES), first N test images:
#   * APGD-EOT (Croce & Hein's step-size schedule; CE and DLR x untargeted and
#     targeted) for L-inf and L2;
#   * the rejection-aware EOT-PGD (loss "rejection": cross-entropy of the mask-averaged
#     probabilities plus the entropy the detector thresholds), untargeted and targeted,
#     for L-inf, L2 and L0;
#   * Sparse-RS (black-box random search on the defended decision, margin and
#     rejection-aware losses, 1,000 queries) for L0; and Sparse-RS with the paired
#     comparison (current set and proposal under the same masks, 500 queries: the same
#     forward passes; untargeted), far stronger against the randomized defense
#     (experiments/sparse_rs_paired.sh).
# Paper budgets read literally, 20 iterations, EOT over 10 masks, 5 scoring draws,
# paper calibration.  Every setting gets its own id (attack variant) in one --out; at the
# end, eval_summary_worst.jsonl holds the worst case per example over all families.
# PARTS picks what runs ("gradient": APGD, ~12 min per setting, and rejection-aware PGD, ~6, at
# N = 500 on 2 cores; "sparse_rs": 4 configurations x 1,000 queries x 10 masks, ~40,000
# forward passes per image, ~1 h per 100 images per rate; "sparse_rs_paired": 2
# configurations x 500 paired queries, ~15-20 min per 100 images), so the cheap part can go first;
# a smaller N first (N=100) and a larger one later continue the same chunks.
# Re-running resumes by chunk; the results (summary, rows so far) are saved after every
# setting, so a run stopped part-way keeps what it computed, and ROWS_FROM (default: the
# committed rows) lets another machine or session take them up instead of recomputing.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
N=${N:-500}
RATES=${RATES:-"0.5 0.9"}
PARTS=${PARTS:-"gradient sparse_rs"}
WD=${WD:-pretrained/gtsrb-resnet20-random}
OUT=${OUT:-runs/gtsrb-resnet20-random-30ep-strong}
RES=${RES:-experiments/results/gtsrb_resnet20_random_30ep}
run() { evaluate_kept "$OUT" "$RES" eval_summary_strong.jsonl "${common[@]}" "$@"; }
for r in $RATES; do
  common=(--workdir "$WD" --num_examples "$N" --drop_rates "$r")
  for part in $PARTS; do
    case "$part" in
      gradient)
        for norm in linf l2; do run --norm "$norm" --attack apgd; done
        for norm in linf l2 l0; do run --norm "$norm" --losses rejection; done ;;
      sparse_rs)
        run --norm l0 --attack sparse_rs --losses margin rejection ;;
      sparse_rs_paired)
        run --norm l0 --attack sparse_rs --comparison paired --queries 500 \
          --losses margin rejection --modes untargeted ;;
      *) echo "unknown part $part (gradient, sparse_rs, sparse_rs_paired)" >&2; exit 2 ;;
    esac
  done
done
# The per-example worst case over every attack family of a setting (the paper's EOT-PGD
# of gtsrb_resnet20_figs56.sh included), each family beside it on the same examples; and,
# as Sparse-RS may cover fewer images than the rest, the worst case without it too.
# (--allow_empty: a model evaluated by one family only, e.g. WD=pretrained/...-normal with
# PARTS=sparse_rs, has nothing to combine without Sparse-RS.)
python -m dropjax.evaluation.combine "$RES"/eval_summary*.jsonl --allow_empty \
  --out "$RES/eval_summary_worst.jsonl"
python -m dropjax.evaluation.combine "$RES"/eval_summary*.jsonl --exclude sparse_rs \
  --allow_empty --out "$RES/eval_summary_worst.jsonl"
plot_summaries "$RES" "$RES"/eval_summary*.jsonl
