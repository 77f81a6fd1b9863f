"""Paired differences of two models, as a figure: one line per comparison, its interval.

    python experiments/paired_plot.py \\
        experiments/results/paired/cifar10_resnet20_random_180ep_vs_30ep_*.jsonl \\
        --out experiments/results/paired --name cifar10_resnet20_random_180ep_vs_30ep

reads the rows of ``experiments/paired_accuracy.py`` (one file per comparison, one row
per metric) and draws, per comparison, the difference A - B in accuracy points with its
95% interval, one marker per metric (``--metrics``), beside a line at 0; a comparison
whose interval leaves 0 is a real difference at that level. Labels are the files' names
without the common prefix (or ``--labels``). Writes ``OUT/NAME.png`` and ``.svg``.
Reads rows only.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import files, plots  # noqa: E402

METRICS = ("avg", "avg_with_rejection")
MARKERS = "osD^v"


def labels_of(paths: list[str]) -> list[str]:
  """The files' names without the ``.jsonl`` suffix and the ``_``-separated words all
  of them begin with."""
  names = [os.path.basename(p).removesuffix(".jsonl") for p in paths]
  prefix = os.path.commonprefix(names) if len(names) > 1 else ""
  prefix = prefix[:prefix.rfind("_") + 1]  # whole words only
  return [n[len(prefix):] or n for n in names]


def draw(comparisons: list[tuple[str, list[dict]]], metrics=METRICS):
  """The figure: ``comparisons`` = (label, paired rows) pairs, top to bottom."""
  fig, ax = plots.new_figure(figsize=(7.0, 0.45 * len(comparisons) + 1.4))
  offsets = [0.25 * (i - (len(metrics) - 1) / 2) for i in range(len(metrics))]
  for m, (metric, dy) in enumerate(zip(metrics, offsets)):
    xs, ys, lows, highs = [], [], [], []
    for y, (label, rows) in enumerate(comparisons):
      row = next((r for r in rows if r.get("metric") == metric), None)
      if row is None:
        raise ValueError(f"{label}: no row of metric {metric!r} "
                         f"(have {[r.get('metric') for r in rows]})")
      d, (lo, hi) = 100 * row["difference"], row["difference_interval"]
      xs.append(d)
      ys.append(len(comparisons) - 1 - y + dy)
      lows.append(d - 100 * lo)
      highs.append(100 * hi - d)
    ax.errorbar(xs, ys, xerr=[lows, highs], fmt=MARKERS[m % len(MARKERS)], capsize=3,
                label=metric.replace("_", " "))
  ax.axvline(0.0, color="grey", lw=0.8)
  ax.set_yticks(range(len(comparisons)))
  ax.set_yticklabels([label for label, _ in reversed(comparisons)])
  first = comparisons[0][1][0]
  sizes = {rows[0]["n"] for _, rows in comparisons}
  images = f"; n = {first['n']} images" if len(sizes) == 1 else ""
  ax.set_xlabel(f"A - B, accuracy points ({first['scores']} scores; 95% interval{images})")
  models = {(rows[0]["a"], rows[0]["b"]) for _, rows in comparisons}
  ax.set_title(f"A = {first['a']}\nB = {first['b']}" if len(models) == 1 else
               "A - B of each comparison's two models", fontsize=7)
  ax.legend(fontsize=8)
  return fig


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("rows", nargs="+", help="JSON-lines files of experiments/paired_accuracy.py "
                 "(globs ok), one comparison each, drawn top to bottom")
  p.add_argument("--metrics", nargs="+", default=list(METRICS),
                 help="which metrics to draw (plain, single, avg, "
                 "single_with_rejection, avg_with_rejection)")
  p.add_argument("--labels", nargs="+", default=None,
                 help="one label per file (default: the names without their common prefix)")
  p.add_argument("--out", required=True, help="directory for NAME.png and NAME.svg")
  p.add_argument("--name", default="paired_differences", help="file name, no suffix")
  args = p.parse_args(argv)
  paths = files.expand(args.rows)
  if not paths:
    raise SystemExit(f"no paired rows match {args.rows}")
  labels = args.labels or labels_of(paths)
  if len(labels) != len(paths):
    raise SystemExit(f"{len(labels)} labels for {len(paths)} files")
  fig = draw([(label, files.read_jsonl(path)) for label, path in zip(labels, paths)],
             tuple(args.metrics))
  for path in plots.save_figure(fig, args.out, args.name):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
