"""Figures and tables from evaluation rows (``summary.jsonl``), no recomputation.

    python -m dropjax.plots runs/*/eval --out figures/

writes (PNG and SVG):

* ``clean_vs_drop_rate``: clean accuracy (single mask and K-mask average) vs
  the test-time drop rate, one line per model (the paper's Fig. 2);
* ``robust_vs_drop_rate_<norm>``: robust accuracy with and without rejection vs
  the drop rate, per norm (Figs. 5/6);
* ``table.md``: a Table-1-style markdown table (per model and norm: clean
  accuracy, robust accuracy without / with rejection).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SUMMARY_FILE = "summary.jsonl"


def read_summaries(paths: list[str]) -> list[dict]:
  """Rows from ``summary.jsonl`` files or directories holding one."""
  rows = []
  for p in paths:
    f = os.path.join(p, SUMMARY_FILE) if os.path.isdir(p) else p
    if not os.path.isfile(f):
      raise FileNotFoundError(f"no {SUMMARY_FILE} at {p}")
    with open(f) as fh:
      rows += [json.loads(line) for line in fh if line.strip()]
  return rows


def model_name(row: dict) -> str:
  drop = {"none": "normal", "fixed": f"fixed r={row.get('train_drop_rate')}",
          "random": "random r"}.get(row.get("train_drop"), row.get("train_drop"))
  return f"{row.get('dataset')} ResNet-{row.get('depth')} ({drop})"


def save_figure(fig, out_dir: str, name: str) -> list[str]:
  """Saves ``fig`` as ``out_dir/name.png`` and ``.svg``, closes it, returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for ext in ("png", "svg"):
    path = os.path.join(out_dir, f"{name}.{ext}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    paths.append(path)
  plt.close(fig)
  return paths


def plot_clean_vs_rate(rows: list[dict], out_dir: str) -> list[str]:
  by_model = collections.defaultdict(dict)
  for r in rows:
    by_model[model_name(r)][r["drop_rate"]] = r  # later rows win
  if not by_model:
    return []
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, pts in sorted(by_model.items()):
    rates = sorted(pts)
    ax.plot(rates, [pts[x]["clean_accuracy_avg"] for x in rates], "o-", label=f"{name}, avg")
    ax.plot(rates, [pts[x]["clean_accuracy_single"] for x in rates], "x--",
            label=f"{name}, 1 mask")
  ax.set(xlabel="test-time drop rate r", ylabel="clean accuracy", ylim=(0, 1))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out_dir, "clean_vs_drop_rate")


def plot_robust_vs_rate(rows: list[dict], out_dir: str) -> list[str]:
  paths = []
  attacked = [r for r in rows if r.get("norm") != "none" and "robust_accuracy_avg" in r]
  for norm in sorted({r["norm"] for r in attacked}):
    by_model = collections.defaultdict(dict)
    for r in attacked:
      if r["norm"] == norm:
        by_model[model_name(r)][r["drop_rate"]] = r
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in sorted(by_model.items()):
      rates = sorted(pts)
      ax.plot(rates, [pts[x]["robust_accuracy_avg"] for x in rates], "o-",
              label=f"{name}")
      ax.plot(rates, [pts[x]["robust_accuracy_avg_with_rejection"] for x in rates], "s--",
              label=f"{name}, with rejection")
    ax.set(xlabel="test-time drop rate r", ylabel=f"robust accuracy ({norm})", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths += save_figure(fig, out_dir, f"robust_vs_drop_rate_{norm}")
  return paths


def markdown_table(rows: list[dict]) -> str:
  """One line per (model, norm, eps, drop rate): the paper's Table 1 columns."""
  head = ("| model | norm | eps | r | clean acc (avg) | robust acc | robust acc w/ rejection "
          "| adv. rejected |\n|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in sorted(rows, key=lambda r: (model_name(r), r["norm"], r["eps"], r["drop_rate"])):
    if r.get("norm") == "none":
      continue
    lines.append(f"| {model_name(r)} | {r['norm']} | {r['eps']:.4g} | {r['drop_rate']:.2g} "
                 f"| {r['clean_accuracy_avg']:.3f} | {r['robust_accuracy_avg']:.3f} "
                 f"| {r['robust_accuracy_avg_with_rejection']:.3f} "
                 f"| {r['adv_rejection_rate_avg']:.3f} |")
  return head + "\n".join(lines) + "\n"


def render(paths: list[str], out_dir: str) -> list[str]:
  rows = read_summaries(paths)
  os.makedirs(out_dir, exist_ok=True)
  written = plot_clean_vs_rate(rows, out_dir) + plot_robust_vs_rate(rows, out_dir)
  table = os.path.join(out_dir, "table.md")
  with open(table, "w") as f:
    f.write(markdown_table(rows))
  return written + [table]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m dropjax.plots", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="+", help="eval dirs or summary.jsonl files (globs ok)")
  p.add_argument("--out", default="figures", help="output directory for PNG/SVG/markdown")
  args = p.parse_args(argv)
  inputs = [m for pat in args.inputs for m in (glob.glob(pat) or [pat])]
  try:
    for path in render(inputs, args.out):
      print(path)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
