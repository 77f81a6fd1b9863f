#!/usr/bin/env bash
# Sparse-RS against the randomized defense: the authors' comparison of a proposal
# ("fresh": its loss under new masks against the best loss seen) beside "paired"
# (current set and proposal under the same masks at every query), at equal cost
# (1,000 fresh queries = 500 paired ones = 10,000 forward passes per image), one
# loss (LOSS: margin, or rejection -- the rejection-aware loss, which also aims
# under the entropy threshold), untargeted, on the GTSRB random-r model at RATES,
# first N test images, L0 at the paper's 3% of the pixels; then how noisy the loss is
# that the search compares (experiments/sparse_rs_noise.py).  The entropy thresholds
# are the kept ones, so the rows combine with the strong column's.  Summary rows go to
# $RES/sparse_rs_comparison.jsonl (not eval_summary*.jsonl: they are a study of the
# attack on N images, not a family of the 500-image strong column), rows to $RES/rows.
# FRESH=0 runs the paired attack only.  QUERIES (default 500) and DRAWS (default 1:
# evaluations of the defense averaged into each loss, --query_draws) spend more on the
# paired search -- is what it leaves robust a limit of its budget?  Each is printed
# beside the 500-query, one-draw paired setting on the same images.
#   N=100 RATES="0.9 0.5" bash experiments/sparse_rs_paired.sh   # ~10 min per run here
#   FRESH=0 LOSS=rejection N=100 RATES="0.5 0.9" bash experiments/sparse_rs_paired.sh
#   FRESH=0 QUERIES=2000 N=100 RATES=0.9 bash experiments/sparse_rs_paired.sh  # 4x: ~40 min
#   FRESH=0 DRAWS=4 N=100 RATES=0.9 bash experiments/sparse_rs_paired.sh       # 4x: ~40 min
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
N=${N:-100}
RATES=${RATES:-"0.9 0.5"}
LOSS=${LOSS:-margin}
FRESH=${FRESH:-1}
QUERIES=${QUERIES:-500}
DRAWS=${DRAWS:-1}
WD=${WD:-pretrained/gtsrb-resnet20-random}
OUT=${OUT:-runs/gtsrb-resnet20-random-30ep-paired}
RES=${RES:-experiments/results/gtsrb_resnet20_random_30ep}
for r in $RATES; do
  common=(--workdir "$WD" --out "$OUT" --num_examples "$N" --drop_rates "$r" --norm l0
          --attack sparse_rs --losses "$LOSS" --modes untargeted --no_progress
          --rows_from "$RES/rows" "${stop_at_args[@]}")
  # Setting ids: the default loss (margin) is not named in them.
  tag=$([ "$LOSS" = margin ] && echo untargeted || echo "${LOSS}_untargeted")
  paired="l0_eps0.03_r${r}_sparse_rs_q${QUERIES}_paired$([ "$DRAWS" = 1 ] || echo "_draws$DRAWS")_$tag"
  settings=("$paired")
  [ "$QUERIES.$DRAWS" = 500.1 ] || settings=("l0_eps0.03_r${r}_sparse_rs_q500_paired_$tag" "$paired")
  if [ "$FRESH" = 1 ]; then
    python evaluate.py "${common[@]}" --queries 1000
    settings=("l0_eps0.03_r${r}_sparse_rs_q1000_$tag" "${settings[@]}")
  fi
  python evaluate.py "${common[@]}" --queries "$QUERIES" --query_draws "$DRAWS" \
    --comparison paired
  save_summary "$OUT" "$RES/sparse_rs_comparison.jsonl"
  save_rows "$OUT" "$RES"
  if [ -e "$OUT/$paired/chunk_00000.jsonl" ] || [ -e "$RES/rows/$paired.rows.jsonl.gz" ]; then
    python -m dropjax.evaluation.interim --rows "$RES/rows" "$OUT" \
      $([ ${#settings[@]} -gt 1 ] && echo --worst) -- "${settings[@]}"
  else  # STOP_AT left no time for its first chunk
    echo "no rows of $paired yet: not compared" >&2
  fi
done
if [ "$FRESH" = 1 ]; then
  python experiments/sparse_rs_noise.py --workdir "$WD" --num_examples "$N" --rates $RATES \
    --out "$RES/sparse_rs_noise.jsonl"
fi
