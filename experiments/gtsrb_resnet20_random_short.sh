#!/usr/bin/env bash
# Short real run on CPU (2 cores): GTSRB, ResNet-20, random drop rate, 4 epochs,
# from the local copy; then the defended evaluation under L-inf / L2 / L0 (paper
# budgets, 20 steps, EOT over 10 masks, 200 test images), a clean drop-rate
# sweep (Fig. 2) and an L-inf drop-rate sweep (Fig. 5/6), then the figures.
# Re-running resumes every step (training from its checkpoint, evaluation by chunk).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DROPJAX_DATA_DIR:=$PWD/.data}"; export DROPJAX_DATA_DIR
WD=${WD:-runs/gtsrb-resnet20-random-4ep}
python train.py --preset gtsrb-resnet20-random --epochs 4 --workdir "$WD" --no_progress
for norm in linf l2 l0; do
  python evaluate.py --workdir "$WD" --norm "$norm" --num_examples 200 --steps 20 --no_progress
done
python evaluate.py --workdir "$WD" --norm none --num_examples 1000 \
  --drop_rates 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --no_progress
python evaluate.py --workdir "$WD" --norm linf --num_examples 200 --steps 20 \
  --drop_rates 0 0.3 0.7 0.9 --no_progress
python -m dropjax.plots "$WD/eval" --out experiments/results/gtsrb_resnet20_random_short
python -m dropjax.explain --workdirs "$WD" --out experiments/results/gtsrb_resnet20_random_short \
  --num_examples 500
