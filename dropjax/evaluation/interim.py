"""Interim numbers of evaluation settings that have not finished.

A long setting (Sparse-RS: about an hour per 100 images on 2 cores) has no
summary row until its last chunk is done, yet its finished chunks already say
something.  This prints what they say -- per setting, and with ``--worst`` the
per-example worst case over attack families of one setting
(:func:`dropjax.evaluation.combine.combine`, the rule of every summary) on the
examples they all hold -- marked as interim and never written into a summary
file::

    python -m dropjax.evaluation.interim --worst --rows experiments/results/RUN/rows runs/OUT -- \\
        l0_eps0.03_r0.5 l0_eps0.03_r0.5_rejection l0_eps0.03_r0.5_sparse_rs_q1000_margin-rejection

Rows are read from kept rows (``<setting>.rows.jsonl.gz``, as
``experiments/lib.sh save_rows`` keeps them) or an ``evaluate.py --out``
directory (``<setting>/rows.jsonl``, else its chunks from the first up to the
first missing one); of several directories holding a setting, the one with the
most rows counts.  Accuracies are fractions of the examples; "± x" is the spread
over the scoring draws, the interval the 95% Wilson interval over the examples.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import numpy as np

from dropjax import intervals
from dropjax.evaluation import combine, store, worst_case

WORST = "worst case per example"


def rows_so_far(rows_dirs: Sequence[str], setting: str) -> list[dict]:
  """The rows of ``setting`` finished so far: of the directories holding some (see
  the module docstring), the one with the most (chunk ``c`` is the same examples
  wherever it was computed)."""
  found = [rows for d in rows_dirs if (rows := store.rows_so_far(d, setting))]
  if found:
    return max(found, key=len)
  raise FileNotFoundError(f"no finished rows of setting {setting!r} under "
                          f"{', '.join(rows_dirs)}")


def numbers(rows: Sequence[dict]) -> dict:
  """Clean and robust accuracy (10-mask average, without and with rejection) of
  ``rows`` (per-example rows of one setting, or combined ones)."""
  y = np.array([r["label"] for r in rows])
  out = {"num_examples": len(rows),
         "clean_accuracy_avg": float(np.mean(np.array([r["pred_avg"] for r in rows]) == y))}
  for metric in ("avg", worst_case.HEADLINE):
    acc = worst_case.robust_accuracy(np.array([r[f"adv_broken_{metric}"] for r in rows]))
    out[f"robust_accuracy_{metric}"] = acc["mean"]
    out[f"robust_accuracy_{metric}_std"] = acc["std"]
  out["robust_accuracy_avg_interval"] = list(intervals.wilson(out["robust_accuracy_avg"],
                                                              len(rows)))
  return out


def interim(rows_by_setting: Mapping[str, Sequence[dict]], worst: bool = False) -> list[dict]:
  """One row per setting on its own examples; with ``worst`` (two settings or
  more: attack families of one setting, scored against the same clean
  decisions), each again on the examples all hold, and their per-example worst
  case there.  Every row says ``"interim": true`` and which examples it covers."""
  out = [{"setting": name, "examples": "own", "interim": True, **numbers(rows)}
         for name, rows in rows_by_setting.items()]
  if worst:
    combined = combine.combine(rows_by_setting)  # refuses fewer than two, or a mismatch
    common = {r["index"] for r in combined}
    for name, rows in rows_by_setting.items():
      out.append({"setting": name, "examples": "common", "interim": True,
                  **numbers([r for r in rows if r["index"] in common])})
    out.append({"setting": WORST, "examples": "common", "interim": True,
                **numbers(combined)})
  return out


def table(rows: Sequence[dict]) -> str:
  """``rows`` of :func:`interim` as a Markdown table."""
  def pm(r, k):
    return f"{r[k]:.3f}" + (f" ± {r[k + '_std']:.3f}" if r[k + "_std"] else "")
  lines = ["| setting (interim) | examples | n | clean (avg) | robust (avg) | with rejection "
           "| 95% CI (avg) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lo, hi = r["robust_accuracy_avg_interval"]
    lines.append(f"| {r['setting']} | {r['examples']} | {r['num_examples']} | "
                 f"{r['clean_accuracy_avg']:.3f} | {pm(r, 'robust_accuracy_avg')} | "
                 f"{pm(r, 'robust_accuracy_' + worst_case.HEADLINE)} | [{lo:.3f}, {hi:.3f}] |")
  return "\n".join(lines)


@dataclasses.dataclass
class InterimConfig:
  """``python -m dropjax.evaluation.interim`` (every field a flag)."""
  settings: tuple = dataclasses.field(default=(), metadata={
      "help": "setting ids (the names of their rows or directories)", "positional": True})
  rows: tuple = dataclasses.field(default=(), metadata={
      "help": "directories of the settings' rows: kept rows (<setting>.rows.jsonl.gz) or "
              "evaluate.py --out dirs; per setting the one with the most rows counts",
      "required": True})
  worst: bool = dataclasses.field(default=False, metadata={
      "help": "the settings are attack families of one setting (same model, rate, budget "
              "and calibration): also each on the examples all hold, and their "
              "per-example worst case there"})
  json: bool = dataclasses.field(default=False, metadata={
      "help": "print JSON lines instead of a Markdown table"})


def run(cfg: InterimConfig) -> int:
  if not cfg.rows or not cfg.settings:
    raise ValueError("give one setting id or more and --rows")
  rows = interim({s: rows_so_far(cfg.rows, s) for s in cfg.settings}, cfg.worst)
  print("\n".join(json.dumps(r) for r in rows) if cfg.json else table(rows))
  return 0


def main(argv=None) -> int:
  from dropjax import cli  # pylint: disable=g-import-not-at-top
  return cli.run_command("python -m dropjax.evaluation.interim", __doc__, InterimConfig, run,
                         argv)


if __name__ == "__main__":
  raise SystemExit(main())
