#!/usr/bin/env bash
# The CIFAR-10 ResNet-20 Table-1 models on the 2-core CPU: normal (the sanity model,
# He et al.'s range ~91%), fixed r = 0.9 (the paper's Table-1 row) and random r, each on a
# shortened 30-epoch cosine schedule (the preset says 180 epochs, ~4 h each here), then
# packaged under pretrained/ and swept over the test-time drop rate (Fig. 2, 1,000 test
# images).  Every step resumes exactly when re-run; a finished step is skipped.
# MODES picks the models: also "fixed-uniform_original fixed-uniform_noisy", the paper's
# objectives (b) and (c) at r = 0.9 (two passes per step: ~1.7x the epoch time).
# EPOCHS other than 30 (e.g. EPOCHS=180 MODES="fixed random", the presets' schedule,
# ~5 h per model here) package as pretrained/<name>-<EPOCHS>ep (the 30-epoch models keep
# their names), as experiments/cifar10_resnet20_normal_180ep.sh did for the normal model.
# DEPTH=56 or 110 trains Table 1's deeper rows the same way (presets
# cifar10-resnet<DEPTH>-<mode>; about 3x and 6x ResNet-20's epoch time, so on 2 cores
# the 30-epoch schedule: DEPTH=56 MODES=fixed ~2.3 h, DEPTH=110 ~4.5 h per model; the
# presets' 180 epochs are experiments/gpu/'s).
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
EPOCHS=${EPOCHS:-30}
DEPTH=${DEPTH:-20}
MODES=${MODES:-"normal fixed random"}
HARDWARE=${HARDWARE:-"$(hardware_line)"}
RATES="0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"
SUFFIX=""; [ "$EPOCHS" = 30 ] || SUFFIX="-${EPOCHS}ep"  # of the packaged models' names
for mode in $MODES; do
  name=cifar10-resnet$DEPTH-$mode
  WD=runs/$name-${EPOCHS}ep
  RES=experiments/results/cifar10_resnet${DEPTH}_${mode//-/_}_${EPOCHS}ep
  cmd="python train.py --preset $name --epochs $EPOCHS --workdir $WD --keep_checkpoints 1 --no_progress"
  PKG=pretrained/$name$SUFFIX
  train_packaged "$WD" "$RES" "$PKG" "$HARDWARE" $cmd || exit 0
  # The Fig. 2 sweep, one summary row per rate, under STOP_AT: a sweep it stops keeps
  # the rates it finished in $RES and resumes from its rows in runs/; a complete one is
  # not redone.
  swept=0; [ -f "$RES/clean_summary.jsonl" ] && swept=$(wc -l < "$RES/clean_summary.jsonl")
  if [ "$swept" -lt "$(wc -w <<< "$RATES")" ]; then
    python evaluate.py --workdir "$PKG" --out "runs/$name-${EPOCHS}ep-eval" --norm none \
      --num_examples 1000 --drop_rates $RATES --no_progress "${stop_at_args[@]}"
    save_summary "runs/$name-${EPOCHS}ep-eval" "$RES/clean_summary.jsonl"
  fi
done

# Fig. 2 of the three models together, and the interpretability figures (Figs. 3/4) with
# the gradient mass over the whole test set (2 min here).
MODELS=experiments/results/cifar10_resnet${DEPTH}_${EPOCHS}ep_models
if [[ " $MODES " =~ \ (normal|fixed|random)\  ]] && \
   [ -f "pretrained/cifar10-resnet$DEPTH-normal$SUFFIX/MANIFEST.json" ] && \
   [ -f "pretrained/cifar10-resnet$DEPTH-fixed$SUFFIX/MANIFEST.json" ] && \
   [ -f "pretrained/cifar10-resnet$DEPTH-random$SUFFIX/MANIFEST.json" ]; then
  python -m dropjax.plots \
    experiments/results/cifar10_resnet${DEPTH}_{normal,fixed,random}_${EPOCHS}ep/clean_summary.jsonl \
    --figures clean --out "$MODELS"
  python -m dropjax.explain --workdirs pretrained/cifar10-resnet$DEPTH-{normal,fixed,random}$SUFFIX \
    --drop_rate 0.9 --num_examples 10000 --out "$MODELS"
fi
