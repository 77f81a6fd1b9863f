#!/usr/bin/env bash
# The adversarial-training baseline of the reproduction issue: GTSRB ResNet-20 trained
# with PGD-7 adversarial examples at the paper's L-inf budget (32/255 in X units), on a
# shortened cosine schedule of EPOCHS epochs (default 10: ~80 min on 2 cores; the
# preset's 30 take ~4 h, 6.0x pixel-dropping training per step, benchmarks/README.md),
# then evaluated under the same attacks as the pixel-dropping models (the paper's
# budgets read literally, CE/CW x untargeted/targeted PGD, no masks: r = 0), first N test
# images.  Both steps resume exactly when re-run; the trained model is packaged as
# pretrained/gtsrb-resnet20-pgd-at-<EPOCHS>ep (then not retrained), the rows kept
# after every setting.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
EPOCHS=${EPOCHS:-10}
N=${N:-500}
name=gtsrb-resnet20-pgd-at-${EPOCHS}ep
WD=${WD:-runs/$name}
RES=experiments/results/gtsrb_resnet20_pgd_at_${EPOCHS}ep
HARDWARE=${HARDWARE:-"$(hardware_line)"}
cmd="python train.py --preset gtsrb-resnet20-pgd-at --epochs $EPOCHS --workdir $WD --keep_checkpoints 1 --no_progress"
train_packaged "$WD" "$RES" "pretrained/$name" "$HARDWARE" $cmd || exit 0
for norm in linf l2 l0; do
  evaluate_kept "runs/$name-eval" "$RES" eval_summary.jsonl --workdir "pretrained/$name" \
    --norm "$norm" --num_examples "$N"
done
plot_summaries "$RES" "$RES/eval_summary.jsonl"
