#!/usr/bin/env bash
# The GPU checks of the performance issue, in one bounded run (about 7 minutes).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # on a machine with one NVIDIA GPU
#
# 1. EOT-PGD memory: L-inf attack, batch 128 x 10 masks x 20 steps (rolled loop,
#    the GPU default) with JAX's memory pool capped at 16 GB; it must run and
#    report its allocator peak (benchmarks/eot_memory.py --run).
# 2. JAX vs PyTorch side by side on the GPU, float32 (benchmarks/run.py).
# 3. The same with bfloat16 compute (JAX --half_precision, PyTorch autocast).
# 4. JAX scaling: train batch 128/512/2048 and EOT cost vs K masks.
#
# Every step is its own process with its own time limit and writes its JSON to
# OUT_DIR (logs: run.log, stderr.log), so a failing or slow step leaves the
# others' results.
set -u
OUT_DIR=${1:-${OUT:-/tmp/dropjax-gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# dropjax's XLA defaults are CPU flags; keep XLA_FLAGS clean on another jax version.
export DROPJAX_NO_XLA_DEFAULTS=1
step() { echo "== $(date +%T) $*"; }

step environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__); print(jax.devices())"
} 2>&1 | tee "$OUT_DIR/environment.txt"

step "1. EOT memory, batch 128 x 10 masks, pool capped at 16 GB"
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
frac=$($PY -c "print(f'{16e9 / 2**20 / $total_mib:.4f}')")
echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$frac of $total_mib MiB"
XLA_PYTHON_CLIENT_MEM_FRACTION=$frac timeout 120 \
  $PY benchmarks/eot_memory.py --batch 128 --masks 10 --steps 20 --run \
  > "$OUT_DIR/eot_memory.json" 2>> "$OUT_DIR/stderr.log"
rc=$?; echo "rc=$rc $(cat "$OUT_DIR/eot_memory.json")"
[ $rc = 0 ] || tail -n 15 "$OUT_DIR/stderr.log"

# PyTorch's eager forms only: torch.compile's compile (Triton) would spend the
# lease's minutes; the compiled form is compared on CPU (benchmarks/README.md).
step "2. side by side, float32"
timeout 150 $PY benchmarks/run.py --name gpu-f32 --out_dir "$OUT_DIR" --repeats 20 \
  --eot_forms vmap:1 batch:1 --torch_args="--device cuda --forms plain best" 2>&1 | tee -a "$OUT_DIR/run.log"

step "3. side by side, bfloat16"
timeout 120 $PY benchmarks/run.py --name gpu-bf16 --out_dir "$OUT_DIR" --repeats 20 \
  --eot_forms vmap:1 batch:1 --jax_args="--half_precision" --torch_args="--device cuda --amp --forms plain best" \
  2>&1 | tee -a "$OUT_DIR/run.log"

step "4. JAX scaling, float32"
timeout 100 $PY benchmarks/bench.py --workloads train --scaling --scaling_batches 128 512 2048 \
  --repeats 20 > "$OUT_DIR/jax-scaling.json" 2>> "$OUT_DIR/stderr.log"
rc=$?; echo "rc=$rc"
[ $rc = 0 ] || tail -n 15 "$OUT_DIR/stderr.log"
$PY - "$OUT_DIR/jax-scaling.json" <<'EOF' || true
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d["results"].items():
  print(k, {m: round(v[m], 4) for m in ("images_per_s", "median_s", "cost_vs_k_plain_grads",
                                        "compile_s") if m in v})
EOF
step done
