"""Device memory of the EOT-PGD attack, from XLA's own buffer assignment.

    python benchmarks/eot_memory.py [--batch 128] [--masks 10] [--steps 20] [--depth 20]

Compiles (does not run) the L-inf EOT-PGD attack on ResNet-20 with the loop
rolled (the GPU/TPU default) and prints XLA's memory analysis: arguments,
outputs and temporaries of the compiled program.  Their sum is the peak the
program needs on the device it was compiled for; compiled on CPU it is an
estimate of the GPU figure (buffer assignment differs in detail, not in what
must be live: the activations of batch x masks images for one backward pass).
The issue's requirement is that batch 128 with 10 masks fits in 16 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dropjax  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dropjax.attacks import AttackConfig, make_pgd  # noqa: E402
from dropjax.config import TrainConfig  # noqa: E402
from dropjax.training import state as state_lib, step as step_lib  # noqa: E402


def analyse(batch: int, masks: int, steps: int, depth: int, unroll: str = "1") -> dict:
  cfg = TrainConfig(depth=depth)
  model = state_lib.make_model(cfg, 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  os.environ["DROPJAX_LOOP_UNROLL"] = unroll
  try:
    attack = jax.jit(make_pgd(step_lib.make_logits_fn(model), AttackConfig(
        norm="linf", eps=8 / 255, step_size=2 / 255, num_steps=steps, eot_samples=masks,
        drop_rate=0.5)))
  finally:
    del os.environ["DROPJAX_LOOP_UNROLL"]
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  mem = attack.lower(key, variables, x, y).compile().memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  row = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
  row["peak_estimate_gib"] = (row["argument_size_in_bytes"] + row["output_size_in_bytes"]
                              + row["temp_size_in_bytes"] - row.get("alias_size_in_bytes", 0)) / 2**30
  row.update(batch=batch, masks=masks, steps=steps, depth=depth, unroll=unroll,
             backend=jax.default_backend())
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128, help="images per attack call")
  p.add_argument("--masks", type=int, default=10, help="EOT masks per step (K)")
  p.add_argument("--steps", type=int, default=20, help="PGD steps")
  p.add_argument("--depth", type=int, default=20, help="ResNet depth (6n+2)")
  args = p.parse_args(argv)
  print(json.dumps(analyse(args.batch, args.masks, args.steps, args.depth)))


if __name__ == "__main__":
  main()
