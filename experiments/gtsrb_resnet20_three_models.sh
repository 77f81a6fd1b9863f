#!/usr/bin/env bash
# The three models of the paper's Figs. 3/4 (normal, fixed r = 0.9, random r), GTSRB
# ResNet-20, short CPU runs (4 epochs; the random-r run is gtsrb_resnet20_random_short.sh),
# then the gradient maps, filters and gradient-mass rows for all three.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DROPJAX_DATA_DIR:=$PWD/.data}"; export DROPJAX_DATA_DIR
python train.py --preset gtsrb-resnet20-normal --epochs 4 --workdir runs/gtsrb-resnet20-normal-4ep --no_progress
python train.py --preset gtsrb-resnet20-fixed --epochs 4 --workdir runs/gtsrb-resnet20-fixed-4ep --no_progress
python -m dropjax.explain --workdirs runs/gtsrb-resnet20-normal-4ep runs/gtsrb-resnet20-fixed-4ep \
  runs/gtsrb-resnet20-random-4ep --drop_rate 0.9 --num_examples 12630 \
  --out experiments/results/gtsrb_resnet20_three_models
