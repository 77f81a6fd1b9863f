"""Where the time goes in a train step and in an EOT-PGD step (ResNet-20, CPU).

    python benchmarks/profile_steps.py > benchmarks/results/profile-<machine>.json

A profile by decomposition: each stage is compiled and timed on its own
(median of repeats, compile excluded), so the differences between rows are
the cost of each stage.  Complements ``jax.profiler`` traces, which on XLA:CPU
show one fused thunk per op and no per-layer attribution.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dropjax  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine, measure  # noqa: E402
from dropjax.attacks.losses import attack_objective  # noqa: E402
from dropjax.attacks.pgd import eot_gradient  # noqa: E402
from dropjax.config import TrainConfig  # noqa: E402
from dropjax.objectives import cross_entropy  # noqa: E402
from dropjax.training import state as state_lib, step as step_lib  # noqa: E402

sync = jax.block_until_ready


def main():
  repeats = 5
  cfg = TrainConfig(depth=20, drop="fixed", drop_rate=0.9)
  model = state_lib.make_model(cfg, 10)
  tx = state_lib.make_optimizer(cfg, 100)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, (32, 32, 3))
  rng = np.random.RandomState(0)
  b = 128
  batch = {"image": jnp.asarray(rng.randint(0, 256, (b, 32, 32, 3)).astype(np.uint8)),
           "label": jnp.asarray(rng.randint(0, 10, b).astype(np.int32)),
           "index": jnp.arange(b, dtype=jnp.int32)}
  key = jax.random.PRNGKey(1)
  out = {"machine": machine(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "train": {},
         "eot": {}}

  prep = jax.jit(lambda: step_lib.prepare_inputs(cfg, key, state.step, batch)[1])
  x_in = prep()

  def fwd(params):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, x_in,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(cross_entropy(logits, batch["label"]))

  stages = {
      "input_prep (uint8 -> [-1,1], crop, flip, mask)": prep,
      "forward (train mode, BN batch stats)": jax.jit(lambda: fwd(state.params)),
      "forward + backward": jax.jit(lambda: jax.grad(fwd)(state.params)),
      "full train step (prep + fwd + bwd + SGD update)": jax.jit(
          lambda: step_lib.make_train_step(cfg, model, tx)(state, batch, key)[1]["loss"]),
  }
  for name, f in stages.items():
    out["train"][name] = measure(f, sync, repeats)["median_s"]

  logits_fn = step_lib.make_logits_fn(model)
  v = state.variables
  n, k = 100, 10
  x = jax.random.uniform(key, (n, 32, 32, 3), minval=-1, maxval=1)
  y = jnp.zeros((n,), jnp.int32)
  obj = attack_objective("ce", False)
  objective = lambda xx, yy: obj(logits_fn(v, xx), yy)
  eot_stages = {
      "forward (inference), 100 images": jax.jit(lambda: logits_fn(v, x)),
      "input gradient, 100 images": jax.jit(
          lambda: jax.grad(lambda xx: jnp.sum(objective(xx, y)))(x)),
      "EOT gradient K=10 (vmap of grad)": jax.jit(
          lambda: eot_gradient(key, objective, x, y, 0.9, k, impl="vmap")),
      "EOT gradient K=10 (folded batch of 1000)": jax.jit(
          lambda: eot_gradient(key, objective, x, y, 0.9, k, impl="batch")),
      "EOT gradient K=10 (scan over masks)": jax.jit(
          lambda: eot_gradient(key, objective, x, y, 0.9, k, impl="scan")),
  }
  for name, f in eot_stages.items():
    out["eot"][name] = measure(f, sync, repeats)["median_s"]

  def pgd(unroll, steps=4):
    def body(i, xx):
      g = eot_gradient(jax.random.fold_in(key, i), objective, xx, y, 0.9, k, impl="vmap")
      return jnp.clip(x + jnp.clip(xx + 0.01 * jnp.sign(g) - x, -0.1, 0.1), -1, 1)
    return jax.jit(lambda: jax.lax.fori_loop(0, steps, body, x, unroll=unroll))

  for unroll in (1, 2, True):
    r = measure(pgd(unroll), sync, 1)
    out["eot"][f"4 EOT-PGD steps, fori_loop unroll={unroll}"] = r["median_s"]
    out["eot"][f"compile, unroll={unroll}"] = r["compile_s"]
  out["machine_after"] = machine()
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
