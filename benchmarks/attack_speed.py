"""Attack throughput: EOT-PGD, APGD-EOT and Sparse-RS on the same model and device.

    python benchmarks/attack_speed.py [--depth 20] [--images 100] [--steps 20] [--eot 10]

For a ResNet built as ``evaluate.py`` builds it (the resolved backend's
inference layers), one jitted attack call each on ``--images`` images:

* ``pgd_eot``: L-inf EOT-PGD, ``--steps`` steps, ``--eot`` masks per gradient;
* ``apgd_eot``: L-inf APGD-CE, same steps and masks (one extra gradient at the start);
* ``rejection_pgd``: PGD with the rejection-aware loss (gradient through the mask average);
* ``sparse_rs``: ``--queries`` queries of the ``--eot``-mask defended decision.

Reports image-steps/s (gradient attacks: images x steps / s; Sparse-RS: images x
queries / s) and the ratios to EOT-PGD.  Prints one JSON object; ``--out`` also writes it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import backend as backend_lib  # noqa: E402

backend_lib.configure_process()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import machine, measure, parser, report  # noqa: E402
from benchmarks.models import inference_model  # noqa: E402
from dropjax.attacks import (APGDConfig, AttackConfig, SparseRSConfig, make_apgd,  # noqa: E402
                             make_pgd, make_sparse_rs)
from dropjax.config import TrainConfig  # noqa: E402
from dropjax.masks import DropSpec  # noqa: E402


def main(argv=None):
  p = parser(__doc__, repeats=3)
  p.add_argument("--images", type=int, default=100, help="images per attack call")
  p.add_argument("--steps", type=int, default=20, help="gradient-attack iterations")
  p.add_argument("--eot", type=int, default=10, help="masks per gradient / per query")
  p.add_argument("--queries", type=int, default=100, help="Sparse-RS queries")
  args = p.parse_args(argv)

  backend = backend_lib.resolve()
  logits_fn, variables = inference_model(TrainConfig(depth=args.depth))
  n = args.images
  x = jax.random.uniform(jax.random.PRNGKey(1), (n, 32, 32, 3), minval=-1, maxval=1)
  y = jnp.zeros((n,), jnp.int32)
  drop = DropSpec.fixed(0.9)
  unroll = backend.loop_unroll(args.steps)
  pgd = AttackConfig(norm="linf", eps=16 / 255, step_size=2 / 255, num_steps=args.steps,
                     eot_samples=args.eot, drop=drop, eot_impl=backend.eot_impl)
  attacks = {
      "pgd_eot": (jax.jit(make_pgd(logits_fn, pgd, unroll=unroll)), args.steps),
      "apgd_eot": (jax.jit(make_apgd(logits_fn, APGDConfig(
          norm="linf", eps=16 / 255, num_steps=args.steps, eot_samples=args.eot, drop=drop),
          unroll=unroll)), args.steps),
      "rejection_pgd": (jax.jit(make_pgd(logits_fn, pgd.replace(loss="rejection"),
                                         unroll=unroll)), args.steps),
      "sparse_rs": (jax.jit(make_sparse_rs(logits_fn, SparseRSConfig(
          num_queries=args.queries, num_masks=args.eot, drop=drop))), args.queries),
  }
  res = {}
  for name, (attack, steps) in attacks.items():
    r = measure(lambda: attack(jax.random.PRNGKey(2), variables, x, y), jax.block_until_ready,
                args.repeats)
    res[name] = {**r, "images": n, "steps_or_queries": steps,
                 "image_steps_per_s": n * steps / r["median_s"]}
  base = res["pgd_eot"]["image_steps_per_s"]
  out = {"benchmark": "attack_speed", "depth": args.depth, "eot": args.eot,
         "loop_unroll": str(unroll),
         "machine": machine(), "backend": backend.describe(), "jax": jax.__version__,
         "results": res,
         "ratio_vs_pgd_eot": {k: v["image_steps_per_s"] / base for k, v in res.items()}}
  report(out, args.out)


if __name__ == "__main__":
  main()
