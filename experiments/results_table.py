"""Markdown tables of RESULTS.md from committed evaluation summary rows.

    python experiments/results_table.py experiments/results/gtsrb_resnet20_random_30ep/eval_summary*.jsonl

prints one row per attack setting (norm, budget, test-time r, attack variant): robust
accuracy of the 10-mask defense without and with entropy rejection (mean ± std over the
scoring draws), the single-mask numbers, the subset size and a 95% Wilson interval for
the defended robust accuracy; then, for the rows of ``python -m
dropjax.evaluation.combine``, each attack family on the same examples beside the
per-example worst case.  Later summary rows of the same setting win (a resumed or
extended run appends).  Reads rows only; computes nothing about the model.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import units  # noqa: E402
from dropjax.intervals import wilson  # noqa: E402
from dropjax.evaluation.store import read_summaries  # noqa: E402

NORM_ORDER = {"linf": 0, "l2": 1, "l0": 2}


def variant(row: dict) -> str:
  """The attack variant the evaluation recorded (empty: the paper's EOT-PGD)."""
  return row.get("variant") or "pgd (paper)"


def read(paths: list[str]) -> list[dict]:
  latest = {}
  for row in read_summaries(paths):
    if row.get("norm", "none") != "none" and "n0" not in row:
      latest[row["setting"]] = row
  return sorted(latest.values(), key=lambda r: (NORM_ORDER.get(r["norm"], 9), r["eps"],
                                               r["drop_rate"], variant(r)))


def budget(row: dict) -> str:
  """The budget in X units (L0: a fraction of the pixels D), naming a non-literal reading."""
  if row["norm"] == "l0":
    return f"{row['eps']:g}·D"
  reading = row.get("budget_reading", "literal")
  x = units.to_x_units(row["eps"], reading)
  return f"{x:.6g}" + (f" ({reading})" if reading != "literal" else "")


def fmt(row: dict, key: str) -> str:
  std = row.get(f"{key}_std")
  return f"{row[key]:.3f}" + (f" ± {std:.3f}" if std else "")


def table(rows: list[dict]) -> str:
  out = ["| norm | budget (X units) | r | attack | clean (avg) | robust (avg) | with rejection "
         "| one mask | one mask, w/ rej. | n | 95% CI (avg) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lo, hi = wilson(r["robust_accuracy_avg"], r["num_examples"])
    out.append(f"| {r['norm']} | {budget(r)} | {r['drop_rate']:g} | {variant(r)} "
               f"| {r['clean_accuracy_avg']:.3f} | {fmt(r, 'robust_accuracy_avg')} "
               f"| {fmt(r, 'robust_accuracy_avg_with_rejection')} "
               f"| {fmt(r, 'robust_accuracy_single')} "
               f"| {fmt(r, 'robust_accuracy_single_with_rejection')} "
               f"| {r['num_examples']} | [{lo:.3f}, {hi:.3f}] |")
  return "\n".join(out)


def families_table(rows: list[dict]) -> str:
  """For each combined row (``python -m dropjax.evaluation.combine``): every attack
  family's robust accuracy on the combined examples, and the per-example worst case
  (defended, without / with rejection)."""
  out = ["| norm | budget (X units) | r | attack family | robust (avg) | with rejection | n |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    head = f"| {r['norm']} | {budget(r)} | {r['drop_rate']:g} "
    plain = r["robust_accuracy_avg_by_attack"]
    rej = r["robust_accuracy_avg_with_rejection_by_attack"]
    for name in sorted(plain, key=lambda n: (n != "pgd (paper)", n)):  # the paper's first
      out.append(f"{head}| {name} | {plain[name]:.3f} | {rej[name]:.3f} | {r['num_examples']} |")
    out.append(f"{head}| **worst case per example** | **{fmt(r, 'robust_accuracy_avg')}** "
               f"| **{fmt(r, 'robust_accuracy_avg_with_rejection')}** | {r['num_examples']} |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("summaries", nargs="+", help="summary.jsonl files of evaluate.py")
  args = p.parse_args(argv)
  rows = read(args.summaries)
  print(table(rows))
  combined = [r for r in rows if "robust_accuracy_avg_by_attack" in r]
  if combined:
    print()
    print(families_table(combined))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
