"""Device memory of the EOT-PGD attack, from XLA's own buffer assignment.

    python benchmarks/eot_memory.py [--batch 128] [--masks 10] [--steps 20] [--depth 20] [--run]

Compiles (does not run) the L-inf EOT-PGD attack on ResNet-20 with the loop
rolled (the GPU/TPU default) and prints XLA's memory analysis: arguments,
outputs and temporaries of the compiled program.  Their sum is the peak the
program needs on the device it was compiled for; compiled on CPU it is an
estimate of the GPU figure (buffer assignment differs in detail, not in what
must be live: the activations of batch x masks images for one backward pass).
The issue's requirement is that batch 128 with 10 masks fits in 16 GB.

With ``--run`` the attack also runs once on random data, and the device's own
allocator statistics (``peak_bytes_in_use``, ``bytes_limit``) are reported.  To
prove the bound on a GPU, cap JAX's memory pool at 16 GB before the run
(``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 16 GB / the card's memory, see
``benchmarks/gpu_check.sh``): the attack then either fits or fails with an
out-of-memory error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import backend as backend_lib  # noqa: E402

if __name__ == "__main__":
  backend_lib.configure_process()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dropjax.attacks import AttackConfig, make_pgd  # noqa: E402
from dropjax.config import TrainConfig  # noqa: E402
from dropjax.masks import DropSpec  # noqa: E402
from dropjax.training import state as state_lib, step as step_lib  # noqa: E402


EPS = 8 / 255  # the paper's L-inf budget on CIFAR-10 ([0, 1] pixel scale)


def analyse(batch: int, masks: int, steps: int, depth: int, unroll: str = "1",
            run: bool = False) -> dict:
  cfg = TrainConfig(depth=depth)
  model = state_lib.make_model(cfg, 10, backend_lib.resolve().layers(train=False))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  attack = jax.jit(make_pgd(step_lib.make_logits_fn(model), AttackConfig(
      norm="linf", eps=EPS, step_size=2 / 255, num_steps=steps, eot_samples=masks,
      drop=DropSpec.fixed(0.5)), unroll=True if unroll == "full" else int(unroll)))
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  compiled = attack.lower(key, variables, x, y).compile()
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  row = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
  row["peak_estimate_gib"] = (row["argument_size_in_bytes"] + row["output_size_in_bytes"]
                              + row["temp_size_in_bytes"]
                              - row.get("alias_size_in_bytes", 0)) / 2**30
  row.update(batch=batch, masks=masks, steps=steps, depth=depth, unroll=unroll,
             backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind)
  if run:
    row.update(_run(compiled, model, batch, steps))
  return row


def _run(compiled, model, batch: int, steps: int) -> dict:
  """Runs the compiled attack once on random images; allocator stats and a sanity check."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))))(k1)
  x = jax.random.uniform(k2, (batch, 32, 32, 3), minval=-1, maxval=1)
  y = jax.random.randint(k3, (batch,), 0, 10)
  t0 = time.perf_counter()
  x_adv = jax.block_until_ready(compiled(jax.random.PRNGKey(1), variables, x, y))
  dt = time.perf_counter() - t0
  linf = float(jnp.max(jnp.abs(x_adv - x)))
  out = {"run_s": dt, "image_steps_per_s_first_run": batch * steps / dt,
         # eps is on the [0, 1] pixel scale, images in [-1, 1]: the bound is 2 * eps.
         "max_abs_perturbation": linf, "within_budget": linf <= 2 * EPS + 1e-6,
         "finite": bool(jnp.all(jnp.isfinite(x_adv)))}
  stats = jax.devices()[0].memory_stats() or {}
  for k in ("peak_bytes_in_use", "bytes_limit", "bytes_in_use"):
    if k in stats:
      out[k] = int(stats[k])
  if "peak_bytes_in_use" in out:
    out["peak_gib"] = out["peak_bytes_in_use"] / 2**30
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128, help="images per attack call")
  p.add_argument("--masks", type=int, default=10, help="EOT masks per step (K)")
  p.add_argument("--steps", type=int, default=20, help="PGD steps")
  p.add_argument("--depth", type=int, default=20, help="ResNet depth (6n+2)")
  p.add_argument("--unroll", default="1",
                 help="attack-loop unrolling: 1 (rolled, the GPU/TPU default), N or full")
  p.add_argument("--run", action="store_true",
                 help="also run the attack once and report the allocator's peak memory")
  args = p.parse_args(argv)
  print(json.dumps(analyse(args.batch, args.masks, args.steps, args.depth, args.unroll,
                           args.run)))


if __name__ == "__main__":
  main()
