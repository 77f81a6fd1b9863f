"""Where the time goes in a ResNet-20 train step and in an EOT-PGD step.

    python benchmarks/profile_steps.py --name MACHINE
    # -> benchmarks/results/<date>-MACHINE-profile.json (and a summary on stdout)

Three views, all with compile time excluded:

1. ``jax.profiler`` trace of the jitted train step (batch 128), of one EOT
   gradient (100 images x 10 masks) and of an inference forward (batch 512, the
   ``infer`` workload of ``run.py``), aggregated per XLA op kind (transposes,
   reductions, elementwise fusions, copies, the native kernels' FFI calls, ...).
   On XLA:CPU its own convolutions run asynchronously on the intra-op pool, so
   their trace events only show the dispatch; their cost is the step time minus
   everything else, and view 3 measures it directly.  The native kernels run
   synchronously: their events hold their time.
2. A decomposition: forward, forward + backward, full step; forward, input
   gradient, EOT gradient in three forms; EOT-PGD steps rolled vs unrolled.
3. Each convolution shape of ResNet-20 alone (forward, input gradient,
   weight gradient) with its GFLOP/s, to compare with the machine's peak.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import backend as backend_lib  # noqa: E402

if __name__ == "__main__":
  backend_lib.configure_process()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import bench  # noqa: E402
from benchmarks.common import (RESNET20_CONV_SHAPES, conv_shape_row, machine,  # noqa: E402
                               measure, time_conv)
from dropjax.attacks.losses import attack_objective  # noqa: E402
from dropjax.attacks.pgd import eot_gradient  # noqa: E402
from dropjax.objectives import cross_entropy  # noqa: E402
from dropjax.training import step as step_lib  # noqa: E402

sync = jax.block_until_ready
HERE = os.path.dirname(os.path.abspath(__file__))

# Op-kind groups for the trace view: (label, regex on the XLA op name).
KINDS = (
    ("transposes (layouts for conv weight gradients)", r"^transpose"),
    ("reductions (batch-norm statistics, sums)", r"reduce"),
    ("convolution dispatch (async; cost is in 'unattributed')", r"^conv"),
    ("native kernels (dropjax.xla_cpu.native: convolutions, BN moments)", r"^ffi_call"),
    ("copies", r"^copy"),
    ("control flow (while / conditional)", r"^(while|conditional|cond)"),
    ("elementwise fusions (BN apply, ReLU, adds, masks, SGD)", r"fusion|^wrapped|^multiply|^add"),
)
SKIP = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "ParseArguments", "end:")


def trace_ops(fn, args, steps: int = 3) -> dict:
  """Runs ``fn(*args)`` ``steps`` times under the profiler; per-step ms by op kind."""
  sync(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(steps):
        sync(fn(*args))
      wall = (time.perf_counter() - t0) / steps
    path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(SKIP):
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / steps  # us -> ms per step
  kinds = collections.Counter()
  for name, ms in per_op.items():
    base = re.sub(r"\.\d+$", "", name)
    label = next((k for k, rx in KINDS if re.search(rx, base)), "other")
    kinds[label] += ms
  wall_ms = 1e3 * wall
  kinds["unattributed (convolutions, threads idle, dispatch)"] = wall_ms - sum(kinds.values())
  return {"wall_ms_under_profiler": wall_ms,
          "by_kind_ms": {k: round(v, 2) for k, v in kinds.most_common()},
          "top_ops_ms": {k: round(v, 2)
                         for k, v in per_op.most_common(int(os.environ.get("TOP_OPS", 12)))}}


def conv_shapes(batch: int, repeats: int) -> list[dict]:
  """Forward / input-gradient / weight-gradient time of each ResNet-20 conv shape,
  XLA's and dropjax's (the resolved backend's inference convolution:
  ``dropjax.xla_cpu.conv`` with the native kernels where they run)."""
  backend = backend_lib.resolve()
  conv_fn = getattr(backend.layers(train=False).conv, "keywords", {}).get(
      "conv_general_dilated", lax.conv_general_dilated)
  choices = backend.describe()
  dn = ("NHWC", "HWIO", "NHWC")
  pads = ((1, 1), (1, 1))
  rows = []
  for h, c, o, s in RESNET20_CONV_SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, h, h, c))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o))
    g = jax.random.normal(jax.random.PRNGKey(2), (batch, h // s, h // s, o))
    xla = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=dn)
    ours = lambda x, w: conv_fn(x, w, (s, s), pads, dimension_numbers=dn)
    fns = {}
    for tag, conv in (("", xla), ("_dropjax", ours)):
      fns["forward" + tag] = (jax.jit(conv), (x, w))
      fns["input_grad" + tag] = (
          jax.jit(lambda g, w, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]), (g, w))
      fns["weight_grad" + tag] = (
          jax.jit(lambda g, x, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]), (g, x))
    row = {**conv_shape_row(h, c, o, s, batch),
           "native_forward": bool(choices.get("native_forward")),
           "native_weight_grad": bool(choices.get("native_weight_grad")) and o % 8 == 0}
    for name, (f, a) in fns.items():
      time_conv(row, name, lambda f=f, a=a: f(*a), sync, repeats)
    rows.append(row)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", default="local", help="machine name for the output file")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
  p.add_argument("--infer_batch", type=int, default=512,
                 help="images per inference forward of the trace view (run.py's infer: 512)")
  p.add_argument("--only_conv_shapes", action="store_true",
                 help="print view 3 (per-shape convolution speed) as JSON and stop")
  p.add_argument("--out", default=None,
                 help="output JSON (default results/<date>-NAME-profile.json)")
  args = p.parse_args(argv)
  repeats = args.repeats
  if args.only_conv_shapes:
    print(json.dumps(conv_shapes(128, repeats), indent=1))
    return
  out = {"machine_before": machine(), "jax": jax.__version__,
         "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}

  cfg, model, tx, state, logits_fn = bench.setup(20)  # the benchmarked workload
  b = 128
  batch = jax.tree.map(jnp.asarray, bench.synthetic_batch(b))
  key = jax.random.PRNGKey(1)
  train_step = jax.jit(step_lib.make_train_step(cfg, model, tx))
  out["train_trace"] = trace_ops(train_step, (state, batch, key))

  x_in = jax.jit(lambda s, bt, k: step_lib.prepare_inputs(cfg, k, s.step, bt)[1])(state, batch, key)

  def fwd(params, stats, x, y):
    logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.mean(cross_entropy(logits, y))

  args_fb = (state.params, state.batch_stats, x_in, batch["label"])
  stages = {
      "input_prep (uint8 -> [-1,1], crop, flip, mask)": (
          jax.jit(lambda s, bt, k: step_lib.prepare_inputs(cfg, k, s.step, bt)[1]),
          (state, batch, key)),
      "forward (train mode, BN batch stats)": (jax.jit(fwd), args_fb),
      "forward + backward": (jax.jit(jax.grad(fwd)), args_fb),
      "full train step": (train_step, (state, batch, key)),
  }
  out["train_ms"] = {n: round(1e3 * measure(lambda: f(*a), sync, repeats)["median_s"], 1)
                     for n, (f, a) in stages.items()}

  v = state.variables
  n, k = 100, 10
  x = bench.images(n)
  y = jnp.zeros((n,), jnp.int32)
  obj = attack_objective("ce", False)

  def eot(impl):
    return bench.eot_grad_fn(logits_fn, k, impl, key)

  out["eot_trace"] = trace_ops(eot("vmap"), (v, x, y))
  x_infer = bench.images(args.infer_batch)
  out["infer_trace"] = trace_ops(jax.jit(logits_fn), (v, x_infer))
  eot_stages = {
      "forward (inference), 100 images": jax.jit(lambda v, x, y: logits_fn(v, x)),
      "input gradient, 100 images": jax.jit(
          lambda v, x, y: jax.grad(lambda xx: jnp.sum(obj(logits_fn(v, xx), y)))(x)),
      "EOT gradient K=10 (vmap of grad)": eot("vmap"),
      "EOT gradient K=10 (folded batch of 1000)": eot("batch"),
      "EOT gradient K=10 (scan over masks)": eot("scan"),
  }
  out["eot_ms"] = {nm: round(1e3 * measure(lambda: f(v, x, y), sync, repeats)["median_s"], 1)
                   for nm, f in eot_stages.items()}

  def pgd(unroll, steps=4):
    def run(v, x, y):
      objective = lambda xx, yy: obj(logits_fn(v, xx), yy)

      def body(i, xx):
        g = eot_gradient(jax.random.fold_in(key, i), objective, xx, y, bench.DROP, k,
                        impl="vmap")
        return jnp.clip(x + jnp.clip(xx + 0.01 * jnp.sign(g) - x, -0.1, 0.1), -1, 1)

      return lax.fori_loop(0, steps, body, x, unroll=unroll)
    return jax.jit(run)

  for unroll in (1, True):
    r = measure(lambda f=pgd(unroll): f(v, x, y), sync, 1)
    out["eot_ms"][f"4 EOT-PGD steps, fori_loop unroll={unroll}"] = round(1e3 * r["median_s"], 1)
    out["eot_ms"][f"compile s, unroll={unroll}"] = round(r["compile_s"], 1)

  out["conv_shapes_train_batch"] = conv_shapes(b, repeats)
  out["machine_after"] = machine()
  path = args.out or os.path.join(
      HERE, "results", f"{datetime.date.today().isoformat()}-{args.name}-profile.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  json.dump({kk: out[kk] for kk in ("train_trace", "train_ms", "eot_trace", "eot_ms",
                                     "infer_trace")},
            sys.stdout, indent=1)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
