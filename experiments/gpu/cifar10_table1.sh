#!/usr/bin/env bash
# The CIFAR-10 Table-1 rows that need a GPU, run on a lent machine through the device
# tool (experiments/gpu/README.md says how the calls go).  Unpacks the carried data
# parts, then trains the presets in order, each resuming exactly from its workdir,
# until the time budget is spent; every run's workdir (latest checkpoint, config,
# metrics, final_eval.json once finished) comes back as $OUT/<preset>.tar.gz and the
# log as $OUT/train.log.  Re-running the same calls later resumes where it stopped.
# A preset whose recipe a model under pretrained/ followed already (e.g. the ResNet-56
# fixed-r row finished on the CPU) is not trained (train.py --skip_if_packaged).
#
# CPU rehearsal with a tiny config (what the README's "Rehearse" line runs):
#   PRESETS=cifar10-resnet20-fixed EXTRA="--depth 8 --epochs 1 --train_examples 512" \
#     OUT=/tmp/gpu-out BUDGET_S=300 bash experiments/gpu/cifar10_table1.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-480}          # seconds of training in this call (one call runs <= 600 s)
MIN_LEFT_S=${MIN_LEFT_S:-60}       # do not start a run with less than this left (compile time)
PRESETS=${PRESETS:-"cifar10-resnet56-fixed cifar10-resnet110-fixed cifar10-resnet110-random cifar10-resnet110-normal cifar10-resnet56-normal cifar10-resnet56-random"}
EXTRA=${EXTRA:-}
PACK=${PACK:-.gpu/pack}
DATA=${DATA:-.gpu/data}
RUNS=${RUNS:-.gpu/runs}
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT" "$RUNS"
start=$SECONDS

python experiments/gpu/cifar10_pack.py unpack --parts "$PACK" --dest "$DATA" --require_all \
  || exit 1
export DROPJAX_DATA_DIR=$(cd "$DATA" && pwd)  # DATA relative or absolute
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1;
  python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"; } > "$OUT/device.txt" 2>&1

for preset in $PRESETS; do
  left=$((BUDGET_S - (SECONDS - start)))
  if [ "$left" -lt "$MIN_LEFT_S" ]; then
    echo "budget spent: $preset and later presets not started" | tee -a "$OUT/train.log"
    break
  fi
  if [ -f "$RUNS/$preset/final_eval.json" ]; then
    echo "$preset: finished earlier" | tee -a "$OUT/train.log"
  else
    echo "== $preset ($left s left) $(date -u +%H:%M:%S)" | tee -a "$OUT/train.log"
    # At the deadline the run checkpoints the step it reached and stops (--stop_at); the
    # same call resumes it from there.  SIGINT a little later (also checkpointed) and a
    # kill 30 s after that are backstops for a step or a save that runs long.
    timeout -s INT -k 30 "$((left + 20))" python train.py --preset "$preset" \
      --workdir "$RUNS/$preset" --stop_at "$(date -d "+$left sec" -Iseconds)" \
      --keep_checkpoints 1 --no_progress --skip_if_packaged $EXTRA >> "$OUT/train.log" 2>&1
    echo "$preset: exit $? at $(date -u +%H:%M:%S)" | tee -a "$OUT/train.log"
  fi
  if [ -d "$RUNS/$preset" ]; then tar -czf "$OUT/$preset.tar.gz" -C "$RUNS" "$preset"; fi
done
ls -la "$OUT"
