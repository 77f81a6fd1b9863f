"""How noisy is the loss Sparse-RS maximizes against the randomized defense?

Sparse-RS (``dropjax.attacks.sparse_rs``) keeps a proposed pixel set when its loss
is higher.  Against the pixel-dropping defense that loss -- the margin of the
10-mask averaged probabilities -- depends on the masks drawn.  For the first N
test images this draws a random set of k pixels at vertices of the colour cube
(Sparse-RS's start) and a proposal that moves ``--moved`` of them, and scores
both under ``--draws`` independent mask draws (draw ``s`` the same masks for
both).  Per drop rate it writes one row (medians over the images, in nats of the
log-probability margin):

* ``noise_sd``: the spread of one set's loss over mask draws;
* ``effect``: |mean over draws of proposal - current|, what the search must see;
* ``fresh_diff_sd``: the spread of that difference scored under independent
  masks (the authors' comparison, ``--comparison fresh``; sqrt(2) x noise_sd
  when the two draws are independent);
* ``paired_diff_sd``: the spread under the same masks (``--comparison paired``).

    python experiments/sparse_rs_noise.py --workdir pretrained/gtsrb-resnet20-random \\
        --out experiments/results/gtsrb_resnet20_random_30ep/sparse_rs_noise.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from dropjax import defense, masks  # noqa: E402
from dropjax.attacks import losses  # noqa: E402
from dropjax.data.augment import to_float  # noqa: E402
from dropjax.evaluation import protocol  # noqa: E402


def place(x, idx, vals):
  """``x`` (B, H, W, C) with pixels ``idx`` (B, k) set to ``vals`` (B, k, C)."""
  b, h, w, c = x.shape
  flat = x.reshape(b, h * w, c)
  return jax.vmap(lambda f, i, v: f.at[i].set(v))(flat, idx, vals).reshape(x.shape)


def measure(key, logits_fn, variables, x, y, rate: float, pixels: int, moved: int,
            draws: int, num_masks: int) -> dict:
  """One row of the module docstring for images ``x`` (B, H, W, C) in [-1, 1]."""
  b, h, w, _ = x.shape
  drop = masks.DropSpec.fixed(rate)
  k_set, k_vals, k_move, k_masks = jax.random.split(key, 4)
  _, idx = jax.lax.top_k(jax.random.uniform(k_set, (b, h * w)), 2 * pixels)
  vals = jax.random.rademacher(k_vals, (b, pixels, x.shape[-1]), dtype=jnp.float32)
  current = place(x, idx[:, :pixels], vals)
  moves = jax.random.permutation(k_move, pixels)[:moved]  # the same positions for every image
  proposal = place(x, idx[:, :pixels].at[:, moves].set(idx[:, pixels:pixels + moved]), vals)

  @jax.jit
  def loss(k, xx):
    p = defense.mask_average_probs(k, logits_fn, variables, xx, drop, num_masks)
    return losses.rejection_aware(p, y, False, 0.0)  # Sparse-RS's margin loss

  keys = jax.random.split(k_masks, 2 * draws)
  cur = np.stack([np.asarray(loss(keys[s], current)) for s in range(draws)])  # (S, B)
  same = np.stack([np.asarray(loss(keys[s], proposal)) for s in range(draws)])
  other = np.stack([np.asarray(loss(keys[draws + s], proposal)) for s in range(draws)])
  return {"drop_rate": rate, "num_examples": b, "pixels": pixels, "moved": moved,
          "draws": draws, "num_masks": num_masks, "loss_mean": float(cur.mean()),
          "noise_sd": float(np.median(cur.std(0))),
          "effect": float(np.median(np.abs((same - cur).mean(0)))),
          "fresh_diff_sd": float(np.median((other - cur).std(0))),
          "paired_diff_sd": float(np.median((same - cur).std(0)))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="pretrained/gtsrb-resnet20-random",
                 help="packaged model or training run")
  p.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.9],
                 help="test-time drop rates (fractions of the values dropped)")
  p.add_argument("--num_examples", type=int, default=100, help="first N test images")
  p.add_argument("--pixels", type=int, default=30,
                 help="pixels in the set, k (paper's L0 budget: 3%% of 1,024 = 30)")
  p.add_argument("--moved", type=int, default=3,
                 help="pixels a proposal moves (Sparse-RS: 30%% of k early on, fewer later)")
  p.add_argument("--draws", type=int, default=20, help="independent mask draws per set")
  p.add_argument("--num_masks", type=int, default=10, help="masks averaged by the defense")
  p.add_argument("--seed", type=int, default=0, help="seed of sets, moves and masks")
  p.add_argument("--out", default="", help="JSON-lines file to write (empty: print only)")
  a = p.parse_args(argv)
  if not 0 < a.moved <= a.pixels or a.draws < 2 or a.num_examples < 1:
    p.error("need 0 < --moved <= --pixels, --draws >= 2 and --num_examples >= 1")
  cfg, variables, logits_fn, data = protocol.load_model(a.workdir)
  test = data.test.take(a.num_examples)
  x, y = to_float(jnp.asarray(test.x)), jnp.asarray(test.y)
  rows = []
  for rate in a.rates:
    row = {"workdir": a.workdir, "dataset": cfg.dataset, "seed": a.seed,
           **measure(jax.random.fold_in(jax.random.PRNGKey(a.seed), int(rate * 1000)),
                     logits_fn, variables, x, y, rate, a.pixels, a.moved, a.draws,
                     a.num_masks),
           "machine": {k: v for k, v in machine().items() if k != "loadavg"}}
    print(json.dumps(row))
    rows.append(row)
  if a.out:
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
