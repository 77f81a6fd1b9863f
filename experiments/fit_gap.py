"""Under-fitting or over-fitting? Training against validation accuracy per epoch.

    python experiments/fit_gap.py pretrained/gtsrb-resnet20-fixed pretrained/cifar10-resnet20-fixed \
        --out experiments/results/fit_gap

reads each run's ``metrics.jsonl`` (a workdir or a ``pretrained/`` package) and writes
one row per run and epoch to ``OUT/fit_gap.jsonl``, then the figure
``OUT/train_vs_val.{png,svg}`` from those rows, and prints a markdown table of a few
epochs per run. A row:

* ``train_accuracy``: the epoch's training accuracy, the step-weighted mean of its
  logged training rows: augmented batches, masked as in training, the model in training
  mode (batch statistics) and changing during the epoch;
* ``val_accuracy``: the validation accuracy logged at the epoch's end (held-out
  training images, evaluation mode, one mask of the training distribution:
  ``val_metric`` names the logged field, ``accuracy_dropped`` for a pixel-dropping
  model, else ``accuracy_clean``);
* ``gap``: ``train_accuracy - val_accuracy`` (fractions; positive: the model fits its
  training images better than held-out ones).

A gap near 0 at the end of the schedule says the model is under-fitted (a longer
schedule can still help); a large one says it over-fits (more epochs do not). Reads
rows only; computes nothing about the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import files, plots  # noqa: E402

ROWS_FILE = "fit_gap.jsonl"
FIGURE = "train_vs_val"
TABLE_POINTS = 6  # epochs per run in the printed table (plus the last)


def run_rows(run_dir: str) -> list[dict]:
  """One row per epoch that has a validation row, from ``run_dir/metrics.jsonl``."""
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = json.load(f)
  metrics = files.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  train = [r for r in metrics if r.get("kind") == "train"]
  val = {r["epoch"]: r for r in metrics if r.get("kind") == "val"}
  if not train or not val:
    raise ValueError(f"{run_dir}: metrics.jsonl has no training or no validation rows")
  steps_per_epoch = round(train[-1]["step"] / train[-1]["epoch"])
  metric = "accuracy_dropped" if cfg["drop"] != "none" else "accuracy_clean"
  sums: dict[int, list[float]] = {}
  last = 0
  for r in train:  # each logged interval lies within one epoch (epoch ends are logged)
    epoch = -(-r["step"] // steps_per_epoch)
    acc = sums.setdefault(epoch, [0.0, 0.0])
    acc[0] += (r["step"] - last) * r["accuracy"]
    acc[1] += r["step"] - last
    last = r["step"]
  name = os.path.basename(os.path.normpath(run_dir))
  rows = []
  for epoch in sorted(val):
    if epoch not in sums or metric not in val[epoch]:
      continue
    train_acc = sums[epoch][0] / sums[epoch][1]
    rows.append({"run": name, "dataset": cfg["dataset"], "depth": cfg["depth"],
                 "train_drop": cfg["drop"], "train_drop_rate": cfg["drop_rate"],
                 "epochs": cfg["epochs"], "epoch": epoch, "train_accuracy": train_acc,
                 "val_accuracy": val[epoch][metric], "val_metric": metric,
                 "gap": train_acc - val[epoch][metric]})
  return rows


def table(rows: list[dict]) -> str:
  out = ["| run | epoch (of) | train accuracy | validation accuracy | gap (points) |",
         "|---|---|---|---|---|"]
  for name in dict.fromkeys(r["run"] for r in rows):
    mine = [r for r in rows if r["run"] == name]
    stride = max(1, len(mine) // TABLE_POINTS)
    for r in mine[stride - 1::stride][:TABLE_POINTS - 1] + mine[-1:]:
      out.append(f"| {name} | {r['epoch']} ({r['epochs']}) | {r['train_accuracy']:.3f} | "
                 f"{r['val_accuracy']:.3f} | {100 * r['gap']:+.1f} |")
  return "\n".join(out)


def plot(rows_path: str, out_dir: str) -> list[str]:
  """Training (dashed) and validation (solid) accuracy against the fraction of each
  run's schedule, one panel per dataset, from the rows file."""
  rows = files.read_jsonl(rows_path)
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  fig, axes = plots.new_figure(1, len(datasets), figsize=(5.2 * len(datasets), 4.6),
                               squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    names = list(dict.fromkeys(r["run"] for r in rows if r["dataset"] == dataset))
    for i, name in enumerate(names):
      mine = [r for r in rows if r["run"] == name]
      x = [r["epoch"] / r["epochs"] for r in mine]
      label = f"{name} ({mine[0]['epochs']} ep)"
      ax.plot(x, [r["val_accuracy"] for r in mine], "-", color=f"C{i}",
              label=f"{label}: validation")
      ax.plot(x, [r["train_accuracy"] for r in mine], "--", color=f"C{i}",
              label=f"{label}: training")
    ax.set_title(dataset)
    ax.set_xlabel("fraction of the schedule (epoch / epochs)")
    ax.set_ylabel("accuracy (one mask of the training distribution)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
  return plots.save_figure(fig, out_dir, FIGURE)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="training workdirs or pretrained/ packages "
                      "(each with config.json and metrics.jsonl)")
  parser.add_argument("--out", required=True, help="directory for fit_gap.jsonl and the figure")
  args = parser.parse_args(argv)
  rows = [row for run in args.runs for row in run_rows(run)]
  os.makedirs(args.out, exist_ok=True)
  rows_path = os.path.join(args.out, ROWS_FILE)
  files.write_jsonl(rows_path, rows)
  print(table(rows))
  for path in [rows_path, *plot(rows_path, args.out)]:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
