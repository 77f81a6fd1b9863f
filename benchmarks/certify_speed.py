"""Certification throughput beside plain inference (the same model, same device).

    python benchmarks/certify_speed.py [--depth 20] [--images 10] [--samples_per_pass 100]

Measures, for a ResNet built as ``certify.py`` builds it (the resolved backend's
inference layers):

* ``infer``: plain inference on ``images x samples_per_pass`` images, one call;
* ``ablate_pass[values|doubled]``: one pass of the vote counter
  (:func:`dropjax.certify.make_vote_counter`): ``samples_per_pass`` exact-k
  ablations of each of ``images`` images, the forward pass and the vote count,
  for a values-encoding (paper) model and a doubled-encoding (ablation) model;
* ``certify_n``: a whole certification at ``--n`` (+ ``--n0``) samples per image.

``ratio_ablate_vs_infer`` = ablated forward passes/s over plain images/s (1.0:
certification runs at inference speed).  Prints one JSON object; ``--out``
also writes it (``benchmarks/results/<date>-<machine>-certify-<commit>.json``).
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
from dropjax import certify  # noqa: E402
from dropjax.config import TrainConfig  # noqa: E402


def sync(x):
  return jax.block_until_ready(x)


def build(depth: int, encoding: str):
  return inference_model(TrainConfig(depth=depth, drop="ablate" if encoding == "doubled"
                                     else "fixed", input_encoding=encoding))


def main(argv=None):
  p = parser(__doc__, repeats=5)
  p.add_argument("--images", type=int, default=10, help="images per pass")
  p.add_argument("--samples_per_pass", type=int, default=100,
                 help="ablated samples per image per pass")
  p.add_argument("--keep", type=int, default=75, help="k, pixels kept of 1024")
  p.add_argument("--n", type=int, default=10_000, help="certify_n: samples bounding p_A")
  p.add_argument("--n0", type=int, default=1000, help="certify_n: selection samples")
  args = p.parse_args(argv)

  b, s = args.images, args.samples_per_pass
  x = jax.random.uniform(jax.random.PRNGKey(1), (b, 32, 32, 3), minval=-1, maxval=1)
  res = {}
  logits_fn, variables = build(args.depth, "values")
  plain = jax.jit(lambda v, xx: logits_fn(v, xx))
  big = jnp.repeat(x, s, axis=0)
  r = measure(lambda: plain(variables, big), sync, args.repeats)
  res["infer"] = {**r, "batch": b * s, "images_per_s": b * s / r["median_s"]}
  for enc in ("values", "doubled"):
    fn, var = build(args.depth, enc)
    cfg = certify.CertifyConfig(keep=args.keep, n0=s, n=s, samples_per_pass=s)
    count = certify.make_vote_counter(fn, cfg)
    r = measure(lambda: count(jax.random.PRNGKey(2), var, x, s), sync, args.repeats)
    res[f"ablate_pass[{enc}]"] = {**r, "batch": b * s,
                                  "forward_passes_per_s": b * s / r["median_s"]}
  cfg = certify.CertifyConfig(keep=args.keep, n0=args.n0, n=args.n, samples_per_pass=s)
  run = certify.make_certify(logits_fn, cfg)
  r = measure(lambda: run(jax.random.PRNGKey(3), variables, x)["radius"], lambda a: a, 1)
  res["certify_n"] = {**r, "images": b, "n": args.n, "n0": args.n0,
                      "images_per_s": b / r["median_s"],
                      "forward_passes_per_s": b * (args.n + args.n0) / r["median_s"]}
  out = {"benchmark": "certify_speed", "depth": args.depth, "keep": args.keep,
         "machine": machine(), "backend": backend_lib.resolve().describe(),
         "jax": jax.__version__, "results": res,
         "ratio_ablate_vs_infer": {
             enc: res[f"ablate_pass[{enc}]"]["forward_passes_per_s"] / res["infer"]["images_per_s"]
             for enc in ("values", "doubled")},
         "ratio_certify_vs_infer": res["certify_n"]["forward_passes_per_s"]
         / res["infer"]["images_per_s"]}
  report(out, args.out)


if __name__ == "__main__":
  main()
