"""JAX benchmarks of the four workloads (ResNet-20, 32x32x3, float32).

    python benchmarks/bench.py [--quick] [--scaling] > jax.json
    python benchmarks/bench.py --half_precision --eot_forms vmap:1 batch:1 \
        --scaling --scaling_batches 128 512 2048 > jax-gpu-bf16.json   # GPU/TPU

Workloads: train step (batch 128, pixel dropping + crop/flip on device),
inference (batch 512), 10-mask averaged prediction (batch 100 x 10 masks) and
EOT-PGD L-inf (100 images x 10 masks x 10 steps) in several forms (EOT as
vmap-of-grad or folded into the batch; attack loop rolled or unrolled); on
request (``--workloads train adv_train``) the PGD adversarial-training step
(Madry et al., ``--adv_steps`` steps, batch 128) beside the pixel-dropping one.
Warm-up (compile) is excluded and reported separately; times are medians.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import backend as backend_lib  # noqa: E402

if __name__ == "__main__":
  backend_lib.configure_process()  # before JAX creates its CPU client
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import models as bench_models  # noqa: E402
from benchmarks.common import TRAIN_WARMUP, machine, measure  # noqa: E402
from dropjax import defense  # noqa: E402
from dropjax.masks import DropSpec  # noqa: E402
from dropjax.attacks import AttackConfig, make_pgd  # noqa: E402
from dropjax.attacks.pgd import eot_gradient  # noqa: E402
from dropjax.attacks.losses import attack_objective  # noqa: E402
from dropjax.config import TrainConfig  # noqa: E402
from dropjax.training import parallel, step as step_lib  # noqa: E402

sync = jax.block_until_ready


DROP = DropSpec.fixed(0.9)  # the benchmarked defense's masks


def setup(depth: int, half_precision: bool = False):
  """``(cfg, train model, tx, state, inference logits_fn)`` built from the
  resolved backend's layers, as ``train.py`` / ``evaluate.py`` build them."""
  cfg = TrainConfig(depth=depth, drop="fixed", drop_rate=0.9, crop_pad=4, hflip=True,
                    half_precision=half_precision)
  model, tx, state = bench_models.initial_state(cfg, train=True)
  logits_fn, _ = bench_models.inference_model(cfg)
  return cfg, model, tx, state, logits_fn


def synthetic_batch(batch: int) -> dict:
  """A host batch like the input pipeline's: uint8 images, int32 labels and indices."""
  rng = np.random.RandomState(0)
  return {"image": rng.randint(0, 256, (batch, 32, 32, 3)).astype(np.uint8),
          "label": rng.randint(0, 10, batch).astype(np.int32),
          "index": np.arange(batch, dtype=np.int32)}


def bench_train(cfg, model, tx, state, batch: int, repeats: int) -> dict:
  unroll = backend_lib.resolve().loop_unroll(cfg.adv_steps)
  runner = parallel.JitRunner(step_lib.make_train_step(cfg, model, tx, unroll=unroll), batch)
  b = runner.put_batch(synthetic_batch(batch))
  box = {"s": runner.put_state(state)}
  key = jax.random.PRNGKey(1)

  def run():
    box["s"], m = runner.step(box["s"], b, key)
    return m["loss"]

  r = measure(run, sync, repeats, warmup=TRAIN_WARMUP)
  r["images_per_s"] = batch / r["median_s"]
  return r


def images(n):
  return jax.random.uniform(jax.random.PRNGKey(2), (n, 32, 32, 3), minval=-1, maxval=1)


def bench_infer(logits_fn, variables, batch, repeats):
  f = jax.jit(logits_fn)
  x = images(batch)
  r = measure(lambda: f(variables, x), sync, repeats)
  r["images_per_s"] = batch / r["median_s"]
  return r


def bench_avg(logits_fn, variables, batch, masks_, repeats):
  f = jax.jit(lambda k, v, x: defense.mask_average_probs(k, logits_fn, v, x, DROP, masks_))
  x, key = images(batch), jax.random.PRNGKey(3)
  r = measure(lambda: f(key, variables, x), sync, repeats)
  r["images_per_s"] = batch / r["median_s"]
  return r


def bench_eot_pgd(logits_fn, variables, n, k, steps, impl, unroll, repeats):
  cfg = AttackConfig(norm="linf", eps=16 / 255, step_size=2 / 255, num_steps=steps,
                     eot_samples=k, drop=DROP, eot_impl=impl)
  attack = jax.jit(make_pgd(logits_fn, cfg, unroll=unroll))
  x, y, key = images(n), jnp.zeros((n,), jnp.int32), jax.random.PRNGKey(4)
  r = measure(lambda: attack(key, variables, x, y), sync, repeats)
  r["image_steps_per_s"] = n * steps / r["median_s"]
  r.update(impl=impl, unroll=str(unroll), images=n, masks=k, steps=steps)
  return r


def eot_grad_fn(logits_fn, k: int, impl: str, key):
  """A fresh jitted ``f(variables, x, y)``: one EOT gradient (cross-entropy,
  drop rate 0.9, ``k`` masks, EOT form ``impl``), as inside an EOT-PGD step."""
  obj = attack_objective("ce", False)
  return jax.jit(lambda v, x, y: eot_gradient(
      key, lambda xx, yy: obj(logits_fn(v, xx), yy), x, y, DROP, k, impl=impl))


def bench_eot_grad(logits_fn, variables, n, k, impl, repeats):
  """One EOT gradient with K masks vs K plain input gradients (scaling)."""
  x, y = images(n), jnp.zeros((n,), jnp.int32)
  if k == 0:
    obj = attack_objective("ce", False)
    f = jax.jit(lambda x: jax.grad(lambda xx: jnp.sum(obj(logits_fn(variables, xx), y)))(x))
    return measure(lambda: f(x), sync, repeats)
  f = eot_grad_fn(logits_fn, k, impl, jax.random.PRNGKey(5))
  return measure(lambda: f(variables, x, y), sync, repeats)


def device_facts() -> dict:
  """The accelerator's name and, where the backend reports it, its peak memory use."""
  d = jax.devices()[0]
  facts = {"device_kind": d.device_kind, "device_count": jax.device_count()}
  stats = d.memory_stats() if hasattr(d, "memory_stats") else None
  if stats:
    facts["peak_bytes_in_use"] = int(stats.get("peak_bytes_in_use", 0))
    facts["bytes_limit"] = int(stats.get("bytes_limit", 0))
  return facts


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  p.add_argument("--scaling", action="store_true", help="also batch-size and K scaling")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--workloads", nargs="+",
                 default=["train", "infer", "avg10", "eot_pgd"],
                 help="subset of train infer avg10 eot_pgd adv_train (adv_train: the "
                      "PGD adversarial-training step, --adv_steps steps, beside the "
                      "pixel-dropping train step)")
  p.add_argument("--adv_steps", type=int, default=7, help="adv_train: PGD steps per batch")
  p.add_argument("--eot_forms", nargs="+", default=["vmap:full", "batch:full", "vmap:1"],
                 help="EOT-PGD forms impl:unroll (unroll: full or an integer); on GPU/TPU "
                      "use rolled forms (vmap:1 batch:1): full unrolling only costs compile time")
  p.add_argument("--half_precision", action="store_true",
                 help="bfloat16 compute with float32 parameters (the GPU/TPU option)")
  p.add_argument("--train_batch", type=int, default=128, help="train-step batch size")
  p.add_argument("--infer_batch", type=int, default=512, help="inference batch size")
  p.add_argument("--scaling_batches", type=int, nargs="+", default=[32, 64, 128, 256],
                 help="train batch sizes for --scaling")
  args = p.parse_args(argv)
  q = args.quick
  depth, tb, ib, ab, en, ek, es = ((8, 16, 32, 8, 4, 2, 2) if q else
                                   (20, args.train_batch, args.infer_batch, 100, 100, 10, 10))
  cfg, model, tx, state, logits_fn = setup(depth, args.half_precision)
  # On the device once: host (NumPy) parameters would be copied to the
  # accelerator on every call (~3.6 ms per call on an H200).
  variables = jax.device_put(state.variables)
  out = {"framework": "jax", "jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "dropjax_backend": backend_lib.resolve().describe(),
         "depth": depth, "half_precision": args.half_precision, "machine_before": machine(),
         **device_facts(), "results": {}}
  res = out["results"]
  if "train" in args.workloads:
    res["train"] = {"batch": tb, **bench_train(cfg, model, tx, state, tb, args.repeats)}
  if "adv_train" in args.workloads:
    adv = cfg.replace(drop="none", adv_training="pgd", adv_eps=32 / 255,
                      adv_steps=2 if q else args.adv_steps).validate()
    res["adv_train"] = {"batch": tb, "adv_steps": adv.adv_steps,
                        **bench_train(adv, model, tx, state, tb, args.repeats)}
  if "infer" in args.workloads:
    res["infer"] = {"batch": ib, **bench_infer(logits_fn, variables, ib, args.repeats)}
  if "avg10" in args.workloads:
    res["avg10"] = {"batch": ab, "masks": 10,
                    **bench_avg(logits_fn, variables, ab, 10, args.repeats)}
  if "eot_pgd" in args.workloads:
    for form in args.eot_forms:
      impl, unroll = form.split(":")
      unroll = True if unroll == "full" else int(unroll)
      res[f"eot_pgd[{form}]"] = bench_eot_pgd(logits_fn, variables, en, ek, es, impl, unroll,
                                              max(1, args.repeats // 2))
  if args.scaling:
    for b in ((8, 16) if q else args.scaling_batches):
      res[f"scaling_train_batch{b}"] = {"batch": b, **bench_train(cfg, model, tx, state, b,
                                                                  args.repeats)}
    plain = bench_eot_grad(logits_fn, variables, en, 0, "vmap", args.repeats)
    res["scaling_input_grad"] = {"images": en, **plain}
    for k in ((1, 2) if q else (1, 2, 5, 10)):
      for impl in ("vmap", "batch"):
        r = bench_eot_grad(logits_fn, variables, en, k, impl, args.repeats)
        r["cost_vs_k_plain_grads"] = r["median_s"] / (k * plain["median_s"])
        res[f"scaling_eot_grad_k{k}_{impl}"] = {"images": en, "masks": k, **r}
  out["machine_after"] = machine()
  out.update({f"{k}_after": v for k, v in device_facts().items() if "bytes" in k})
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
