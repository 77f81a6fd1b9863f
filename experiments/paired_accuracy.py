"""Two models scored on the same test images: is the difference in accuracy real?

    python experiments/paired_accuracy.py \\
        experiments/results/cifar10_resnet20_fixed_180ep/rows \\
        experiments/results/cifar10_resnet20_random_180ep/rows \\
        --setting none_eps0_r0.9 --out experiments/results/paired/fixed_vs_random_180ep.jsonl

reads the per-example rows of one setting of two models A and B -- an evaluation output
directory or kept rows (``<setting>.rows.jsonl.gz``, as ``experiments/lib.sh``
``save_rows`` keeps them) -- scores every image under each metric, and writes one row per
metric.

**Scores.** A clean setting (``evaluate.py --norm none``) scores an image 1 when the
prediction is right, 0 otherwise (``plain``: no mask; ``single``: one mask; ``avg``: the
10-mask defense; ``*_with_rejection``: right *and* not rejected). An attacked setting
scores it ``1 - `` the fraction of the defense's ``R`` scoring draws the worst attack broke
(:mod:`dropjax.evaluation.worst_case`), so the mean score is the setting's robust
accuracy. Several ``--setting`` of one norm, budget and drop rate (the paper's EOT-PGD,
APGD, the rejection-aware PGD, Sparse-RS) are first combined per model, per example, into
their worst case (:func:`dropjax.evaluation.combine.combine`, as
``eval_summary_worst.jsonl`` is), on the images all of them hold.

**Per metric** the row holds ``n`` images, ``accuracy_a`` and ``accuracy_b`` (mean
scores), ``a_better`` / ``b_better`` (images A scores higher than B, and the reverse; for
clean rows: images only A, only B classifies), and

* ``difference`` = accuracy_a - accuracy_b = the mean of the per-image differences
  ``d_i``, with its 95% normal interval ``d +- z s``, ``s = sqrt(sum_i (d_i - d)^2) / n``
  (for 0/1 scores the Wald interval of paired proportions; fine when tens of images or
  more differ; where two models tend to get the same images right, as two models of one
  data set do, narrower than the interval of two independent accuracies);
* ``p_value``: the exact two-sided **sign-flip (paired permutation) test** -- the chance,
  were A and B exchangeable on every image, that flipping the signs of the ``d_i`` gives
  a total at least as far from 0 as the observed one. For 0/1 scores this is the exact
  McNemar test (a binomial test at 1/2 of the discordant images); 0.0 below the smallest
  float, ~1e-308.

Both row sets must hold the same images with the same labels, each once (an error
otherwise): the pairing is the point. ``--common`` pairs the images both hold instead
(say, a 1,000-image evaluation against a 500-image one), and says how many.
``--clean_right`` keeps only the images both models' defense classifies correctly
before the attack (``pred_avg`` = label), so that a difference in clean accuracy does not
pass for one in robustness. Reads rows only; computes nothing about the models.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import files, intervals  # noqa: E402
from dropjax.evaluation import combine, store, worst_case  # noqa: E402

PREDICTIONS = ("plain", "single", "avg", "single_with_rejection", "avg_with_rejection")
TEST = "exact sign-flip (McNemar for 0/1 scores)"


def correct(row: dict, prediction: str) -> bool:
  """Whether ``row`` (one clean example) is classified correctly by ``prediction``."""
  kind, _, rejection = prediction.partition("_with_")
  right = row[f"pred_{kind}"] == row["label"]
  return right and not (rejection and row[f"rejected_{kind}"])


def is_attacked(rows: Sequence[dict]) -> bool:
  """Whether ``rows`` are an attacked setting's (they hold the defense's broken draws)."""
  return f"adv_broken_{worst_case.HEADLINE}" in rows[0]


def scores(rows: Sequence[dict], metric: str) -> tuple[np.ndarray, int]:
  """Per-image scores in [0, 1] of one metric, as ``(counts, denominator)``: (n,) int
  numerators over one common int denominator (1 for clean rows, the number of scoring
  draws for attacked ones), so that differences stay exact integers."""
  if not is_attacked(rows):
    return np.array([correct(r, metric) for r in rows], np.int64), 1
  counts = {len(r[f"adv_broken_{metric}"]) for r in rows}
  if len(counts) != 1:
    raise ValueError(f"metric {metric!r}: the rows hold unequal numbers of scoring draws "
                     f"({sorted(counts)})")
  draws = np.array([r[f"adv_broken_{metric}"] for r in rows], bool)  # (n, R)
  return draws.shape[1] - draws.sum(axis=1), draws.shape[1]


def _binomial_pmf(count: int) -> np.ndarray:
  """(count + 1,) probabilities of Binomial(count, 1/2), from log-gammas (tails that
  fall below the smallest float are 0)."""
  k = np.arange(count + 1)
  log = (math.lgamma(count + 1) - np.array([math.lgamma(i + 1) + math.lgamma(count - i + 1)
                                           for i in k]) - count * math.log(2.0))
  return np.exp(log)


def sign_flip_p(differences: Sequence[int]) -> float:
  """Exact two-sided p-value of the sign-flip test of integer paired differences.

  Under the null each ``d_i`` is ``+|d_i|`` or ``-|d_i|`` with probability 1/2,
  independently; p = P(|sum_i +-|d_i|| >= |sum_i d_i|). The null distribution is built
  per distinct magnitude ``v`` (``c`` images): ``v (2X - c)`` with ``X ~ Binomial(c,
  1/2)``, convolved over magnitudes -- exact up to float rounding.
  """
  d = np.asarray(differences, np.int64)
  observed = abs(int(d.sum()))
  if observed == 0:
    return 1.0
  magnitudes, counts = np.unique(np.abs(d[d != 0]), return_counts=True)
  total = int((magnitudes * counts).sum())
  dist = np.zeros(2 * total + 1)  # position t holds P(sum = t - total)
  dist[total] = 1.0
  for v, c in zip(magnitudes.tolist(), counts.tolist()):
    step = np.zeros(2 * v * c + 1)
    step[::2 * v] = _binomial_pmf(c)  # sums -v c, -v c + 2v, ..., v c
    dist = np.convolve(dist, step)[v * c:v * c + 2 * total + 1]
  p = dist[:total - observed + 1].sum() + dist[total + observed:].sum()
  return float(min(1.0, p))


def pair(rows_a: Sequence[dict], rows_b: Sequence[dict], common: bool = False,
         clean_right: bool = False) -> tuple[list[dict], list[dict]]:
  """The rows of A and B on the same images, by ``index`` ascending; with
  ``clean_right`` only those both defenses classify correctly unattacked.

  Raises:
    ValueError: an index held twice in one set; different images (unless ``common``;
      then: no image in common); one image with two labels; no image left.
  """
  by = []
  for name, rows in (("A", rows_a), ("B", rows_b)):
    index = {r["index"]: r for r in rows}
    if len(index) != len(rows):
      raise ValueError(f"the rows of {name} hold {len(rows) - len(index)} image(s) twice")
    by.append(index)
  ia, ib = set(by[0]), set(by[1])
  if ia != ib and not common:
    raise ValueError(f"the two row sets hold different images: {len(ia)} and {len(ib)} "
                     f"rows, {len(ia & ib)} in common (--common pairs those)")
  shared = sorted(ia & ib)
  if not shared:
    raise ValueError("the two row sets hold no image in common")
  for i in shared:
    if by[0][i]["label"] != by[1][i]["label"]:
      raise ValueError(f"image {i}: label {by[0][i]['label']} in A, {by[1][i]['label']} in B")
  if clean_right:
    shared = [i for i in shared if all(correct(b[i], "avg") for b in by)]
    if not shared:
      raise ValueError("no image that both models' defense classifies correctly")
  return [by[0][i] for i in shared], [by[1][i] for i in shared]


def compare(rows_a: Sequence[dict], rows_b: Sequence[dict], metric: str,
            common: bool = False, clean_right: bool = False) -> dict:
  """The paired comparison of one metric (see the module docstring)."""
  rows_a, rows_b = pair(rows_a, rows_b, common, clean_right)
  if is_attacked(rows_a) != is_attacked(rows_b):
    raise ValueError("one row set is a clean setting's, the other an attacked one's")
  (ka, da), (kb, db) = scores(rows_a, metric), scores(rows_b, metric)
  scale = math.lcm(da, db)
  d = ka * (scale // da) - kb * (scale // db)  # (n,) int, in units of 1 / scale
  n = len(d)
  mean = d.sum() / (n * scale)
  s = math.sqrt(float(((d / scale - mean) ** 2).sum())) / n
  return {"metric": metric, "scores": "robust" if is_attacked(rows_a) else "clean", "n": n,
          "accuracy_a": float(ka.sum() / (n * da)), "accuracy_b": float(kb.sum() / (n * db)),
          "a_better": int((d > 0).sum()), "b_better": int((d < 0).sum()),
          "difference": float(mean),
          "difference_interval": [float(mean - intervals.Z_95 * s),
                                  float(mean + intervals.Z_95 * s)],
          "p_value": sign_flip_p(d), "test": TEST}


def read_rows(directory: str, settings: Sequence[str]) -> list[dict]:
  """One model's rows of ``settings``: the rows of one setting, or the per-example worst
  case of several attacked ones (:func:`dropjax.evaluation.combine.combine`)."""
  by_setting = {}
  for setting in settings:
    rows = store.rows_so_far(directory, setting)
    if not rows:
      raise FileNotFoundError(f"no rows of setting {setting!r} in {directory} (an "
                              "evaluation output directory, or kept rows "
                              f"{setting}.rows.jsonl.gz)")
    by_setting[setting] = rows
  if len(by_setting) == 1:
    return next(iter(by_setting.values()))
  clean = [s for s, rows in by_setting.items() if not is_attacked(rows)]
  if clean:
    raise ValueError(f"{directory}: {', '.join(clean)} not attacked; only attacked "
                     "settings of one norm, budget and drop rate combine")
  return combine.combine(by_setting)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Scores: clean settings 0/1 per image; attacked settings 1 - the broken "
             "fraction of the scoring draws (mean = robust accuracy). Differences are "
             "in accuracy points / 100 (fractions).")
  parser.add_argument("a", help="rows of model A: an evaluation output directory or a "
                      "directory of kept rows")
  parser.add_argument("b", help="rows of model B, the same images")
  parser.add_argument("--setting", required=True, action="append",
                      help="a setting's id, e.g. none_eps0_r0.9 (clean) or "
                      "l0_eps0.03_r0.9 (attacked); repeat it to compare the per-example "
                      "worst case over several attacked settings of one budget and drop rate")
  parser.add_argument("--common", action="store_true",
                      help="pair the images both models' rows hold (default: they must "
                      "hold the same images)")
  parser.add_argument("--clean_right", action="store_true",
                      help="pair only the images both models' 10-mask defense classifies "
                      "correctly before the attack (robustness apart from clean accuracy)")
  parser.add_argument("--out", required=True, help="JSON-lines file for the rows "
                      "(replaced)")
  args = parser.parse_args(argv)
  rows_a, rows_b = read_rows(args.a, args.setting), read_rows(args.b, args.setting)
  metrics = worst_case.METRICS if is_attacked(rows_a) else PREDICTIONS
  out = [{"a": args.a, "b": args.b, "settings": args.setting, "common": args.common,
          "clean_right": args.clean_right,
          **compare(rows_a, rows_b, m, args.common, args.clean_right)} for m in metrics]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  files.write_jsonl(args.out, out)
  print(f"{out[0]['scores']} accuracy, {' + '.join(args.setting)}\n"
        "| metric | n | A | B | A - B (points) | 95% interval | A better / B better | "
        "p (sign-flip) |\n|---|---|---|---|---|---|---|---|")
  for r in out:
    lo, hi = (100 * v for v in r["difference_interval"])
    print(f"| {r['metric']} | {r['n']} | {r['accuracy_a']:.4f} | "
          f"{r['accuracy_b']:.4f} | {100 * r['difference']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
          f"{r['a_better']} / {r['b_better']} | "
          f"{f'{p:.2g}' if (p := r['p_value']) > 0 else '< 1e-300'} |")
  print(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
