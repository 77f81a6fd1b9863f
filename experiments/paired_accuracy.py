"""Two models scored on the same test images: is the difference in accuracy real?

    python experiments/paired_accuracy.py \\
        experiments/results/cifar10_resnet20_fixed_180ep/rows \\
        experiments/results/cifar10_resnet20_random_180ep/rows \\
        --setting none_eps0_r0.9 --out experiments/results/paired/fixed_vs_random_180ep.jsonl

reads the per-example rows of one clean setting (``evaluate.py --norm none``) of two
models A and B -- an evaluation output directory or kept rows
(``<setting>.rows.jsonl.gz``, as ``experiments/lib.sh`` ``save_rows`` keeps them) -- and
writes one row per prediction:

* ``plain`` (no mask), ``single`` (one mask), ``avg`` (the 10-mask defense), and
  ``single_with_rejection`` / ``avg_with_rejection`` (correct and not rejected);
* ``n`` images, ``accuracy_a`` and ``accuracy_b`` (fractions);
* ``a_only`` / ``b_only``: images only A (only B) classifies correctly;
* ``difference`` = accuracy_a - accuracy_b = (a_only - b_only) / n, with its 95% Wald
  interval for paired proportions, ``(d - z s, d + z s)`` with
  ``s = sqrt(a_only + b_only - n d^2) / n`` (fine when the discordant counts are in the
  tens or more, as at 10,000 images; where the two models tend to get the same images
  right, as two models of one data set do, it is narrower than the interval of two
  independent accuracies);
* ``mcnemar_p``: the exact two-sided McNemar p-value, the chance under "A and B are
  equally accurate" of a split of the ``a_only + b_only`` discordant images at least as
  uneven as the one observed (binomial with probability 1/2; 0.0 below the smallest
  float, ~1e-308).

Both row sets must hold the same images with the same labels (an error otherwise): the
pairing is the point. Reads rows only; computes nothing about the models.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import files, intervals  # noqa: E402
from dropjax.evaluation import store  # noqa: E402

PREDICTIONS = ("plain", "single", "avg", "single_with_rejection", "avg_with_rejection")


def correct(row: dict, prediction: str) -> bool:
  """Whether ``row`` (one clean example) is classified correctly by ``prediction``."""
  kind, _, rejection = prediction.partition("_with_")
  right = row[f"pred_{kind}"] == row["label"]
  return right and not (rejection and row[f"rejected_{kind}"])


def mcnemar_p(a_only: int, b_only: int) -> float:
  """Exact two-sided McNemar p-value of the discordant counts (a binomial test at 1/2)."""
  m = a_only + b_only
  if m == 0:
    return 1.0
  tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1))
  return min(1.0, 2 * tail / 2 ** m)


def compare(rows_a: list[dict], rows_b: list[dict], prediction: str) -> dict:
  """The paired comparison of one prediction (see the module docstring)."""
  by_index = {r["index"]: r for r in rows_b}
  if sorted(by_index) != sorted(r["index"] for r in rows_a):
    raise ValueError("the two row sets hold different images: "
                     f"{len(rows_a)} and {len(rows_b)} rows, not the same indices")
  a_only = b_only = right_a = right_b = 0
  for ra in rows_a:
    rb = by_index[ra["index"]]
    if ra["label"] != rb["label"]:
      raise ValueError(f"image {ra['index']}: label {ra['label']} in A, {rb['label']} in B")
    ca, cb = correct(ra, prediction), correct(rb, prediction)
    right_a += ca
    right_b += cb
    a_only += ca and not cb
    b_only += cb and not ca
  n = len(rows_a)
  d = (a_only - b_only) / n
  s = math.sqrt(max(a_only + b_only - n * d * d, 0.0)) / n
  return {"prediction": prediction, "n": n, "accuracy_a": right_a / n,
          "accuracy_b": right_b / n, "a_only": a_only, "b_only": b_only,
          "difference": d,
          "difference_interval": [d - intervals.Z_95 * s, d + intervals.Z_95 * s],
          "mcnemar_p": mcnemar_p(a_only, b_only)}


def read_rows(directory: str, setting: str) -> list[dict]:
  rows = store.rows_so_far(directory, setting)
  if not rows:
    raise FileNotFoundError(f"no rows of setting {setting!r} in {directory} (an "
                            "evaluation output directory, or kept rows "
                            f"{setting}.rows.jsonl.gz)")
  if "pred_plain" not in rows[0]:
    raise ValueError(f"{directory}: {setting!r} is not a clean setting "
                     "(evaluate.py --norm none): its rows have no pred_plain")
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("a", help="rows of model A: an evaluation output directory or a "
                      "directory of kept rows")
  parser.add_argument("b", help="rows of model B, the same images")
  parser.add_argument("--setting", required=True,
                      help="the clean setting's id, e.g. none_eps0_r0.9")
  parser.add_argument("--out", required=True, help="JSON-lines file for the rows "
                      "(replaced)")
  args = parser.parse_args(argv)
  rows_a, rows_b = read_rows(args.a, args.setting), read_rows(args.b, args.setting)
  out = [{"a": args.a, "b": args.b, "setting": args.setting,
          **compare(rows_a, rows_b, p)} for p in PREDICTIONS]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  files.write_jsonl(args.out, out)
  print("| prediction | n | A | B | A - B (points) | 95% interval | only A / only B | "
        "McNemar p |\n|---|---|---|---|---|---|---|---|")
  for r in out:
    lo, hi = (100 * v for v in r["difference_interval"])
    print(f"| {r['prediction']} | {r['n']} | {r['accuracy_a']:.4f} | "
          f"{r['accuracy_b']:.4f} | {100 * r['difference']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
          f"{r['a_only']} / {r['b_only']} | "
          f"{f'{p:.2g}' if (p := r['mcnemar_p']) > 0 else '< 1e-300'} |")
  print(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
