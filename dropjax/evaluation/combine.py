"""The worst case per example over several evaluated attacks of one setting.

One evaluation setting (``evaluate.py``: a norm, budget and test-time drop rate)
runs one attack family -- the paper's EOT-PGD, APGD-EOT, the rejection-aware PGD,
Sparse-RS -- and keeps per example, for every metric of
:mod:`dropjax.evaluation.worst_case` and every one of its ``R`` scoring draws,
whether the example was broken.  A robustness claim is only as good as the
strongest attack *per example*, so this module takes the rows of several settings
that differ only in their attack and applies the same rule across them: per
example and metric the setting with the highest success rate over the draws wins
(:func:`worst_case.select`), and its draws count.  The result is a summary row
of the same form as ``evaluate.py``'s (``variant`` "worst of N"), which
``python -m dropjax.plots`` and ``experiments/results_table.py`` read like any
other.

    python -m dropjax.evaluation.combine experiments/results/RUN/eval_summary*.jsonl \\
        --rows experiments/results/RUN/rows --out experiments/results/RUN/eval_summary_worst.jsonl

Settings are grouped by model (``workdir``), norm, budget and its reading, drop
rate, masks, scoring draws, calibration and seed; every group with two attack
families or more gets one combined row.  The attacks must have scored the same
clean decisions (same model, masks and thresholds): a mismatch is an error, not
a silently mixed number.  Examples are those all settings of a group hold: a
family run on fewer images (Sparse-RS is costly) narrows the combined row to them,
so ``--exclude`` leaves such families out; the combined setting then says what it
left out (``<setting>_worst-without-sparse_rs``) and stands beside the full one.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from dropjax import defense, files
from dropjax.evaluation import store, worst_case

WORST_SUFFIX = "worst"
# Fields that must agree for two settings' attacks to be compared per example.
GROUP_FIELDS = ("workdir", "norm", "eps", "budget_reading", "drop_rate", "num_masks",
                "score_draws", "calibration", "seed")
# Summary fields copied from the group's settings (equal across them).
_COPIED = GROUP_FIELDS + ("dataset", "depth", "train_drop", "train_drop_rate",
                          "train_adv_training", "train_adv_norm", "eps_stated",
                          "max_drop", "threshold_single", "threshold_avg")
# The model's fields that only rows written since they were recorded hold: copied from
# the settings that hold them, which must agree (rows of two models never combine).
_MODEL = (store.MODEL_FIELD, "train_weight_decay")
# Per-example clean columns every combined setting must share.
_CLEAN = ("label", "pred_plain", "pred_single", "pred_avg", "rejected_single", "rejected_avg")


def attack_name(summary: dict) -> str:
  """The attack family of a summary row, as tables name it."""
  return summary.get("variant") or "pgd (paper)"


def base_setting(summary: dict) -> str:
  """The setting id without its attack variant (shared by a group)."""
  setting, variant = summary["setting"], summary.get("variant") or ""
  return setting[:-len(variant) - 1] if variant and setting.endswith("_" + variant) else setting


def groups(summaries: Sequence[dict]) -> dict[tuple, list[dict]]:
  """Attacked settings with two attack families or more, keyed by
  :data:`GROUP_FIELDS`; later rows of one setting win, combined rows are skipped."""
  latest = {}
  for s in summaries:
    if s.get("norm", "none") != "none" and "robust_accuracy_avg" in s and "combined_from" not in s:
      latest[s["setting"], s.get("workdir")] = s
  out = collections.defaultdict(list)
  for s in latest.values():
    out[tuple(s.get(k) for k in GROUP_FIELDS)].append(s)
  return {k: sorted(v, key=lambda s: s["setting"]) for k, v in out.items() if len(v) > 1}


def find_rows(rows_dirs: Sequence[str], setting: str) -> list[dict]:
  """The rows of ``setting`` from committed rows (``<setting>.rows.jsonl[.gz]``)
  or an evaluation output (``<setting>/rows.jsonl``) in ``rows_dirs``."""
  for d in rows_dirs:
    kept = store.committed_rows(d, setting)
    if kept is not None:
      return kept[0]
    path = os.path.join(d, setting, store.ROWS_FILE)
    if os.path.exists(path):
      return files.read_jsonl(path)
  raise FileNotFoundError(f"no rows of setting {setting!r} under {', '.join(rows_dirs)} "
                          "(experiments/lib.sh save_rows keeps them; a setting whose "
                          "evaluation has not finished has none)")


def combine(rows_by_setting: Mapping[str, Sequence[dict]]) -> list[dict]:
  """Per-example worst case over settings.

  Args:
    rows_by_setting: setting name -> its rows (``evaluate.py``'s per-example
      rows: ``index``, the clean columns, ``adv_broken_<metric>`` lists of ``R``
      bools, ``adv_rejected_avg``, ``norm_<n>``).

  Returns:
    One row per example all settings hold (by ``index``, ascending): the clean
    columns, and per metric ``adv_broken_<metric>`` (the winning setting's ``R``
    draws) and ``adv_attack_<metric>`` (the winning setting's name);
    ``adv_rejected_avg`` of the headline metric's winner; ``norm_<n>`` the
    largest over settings.

  Raises:
    ValueError: fewer than two settings, no common example, draws of unequal
      count, or clean columns that differ (the attacks scored other decisions).
  """
  names = sorted(rows_by_setting)
  if len(names) < 2:
    raise ValueError(f"combining needs two settings or more, got {names}")
  by_index = {n: {r["index"]: r for r in rows_by_setting[n]} for n in names}
  common = sorted(set.intersection(*(set(v) for v in by_index.values())))
  if not common:
    raise ValueError(f"settings {names} hold no example in common")
  out = []
  for i in common:
    rows = [by_index[n][i] for n in names]
    first = rows[0]
    for n, r in zip(names[1:], rows[1:]):
      bad = [k for k in _CLEAN if r[k] != first[k]]
      if bad:
        raise ValueError(f"example {i}: {', '.join(bad)} differ between {names[0]} and {n} -- "
                         "the attacks were scored against other clean decisions (another "
                         "model, masks or calibration) and cannot be combined")
    row = {k: first[k] for k in ("index",) + _CLEAN}
    for metric in worst_case.METRICS:
      draws = [r[f"adv_broken_{metric}"] for r in rows]
      if len({len(d) for d in draws}) != 1:
        raise ValueError(f"example {i}: settings scored {[len(d) for d in draws]} draws; "
                         "combine settings of equal --score_draws")
      winner, chosen = worst_case.select(np.asarray(draws, bool)[:, :, None])
      row[f"adv_broken_{metric}"] = [bool(b) for b in chosen[0]]
      row[f"adv_attack_{metric}"] = names[int(winner[0])]
      if metric == worst_case.HEADLINE:
        row["adv_rejected_avg"] = bool(rows[int(winner[0])]["adv_rejected_avg"])
    for key in first:
      if key.startswith("norm_"):
        row[key] = max(r[key] for r in rows)
    out.append(row)
  return out


def summarize(rows: Sequence[dict], settings: Sequence[dict],
              without: Sequence[str] = ()) -> dict:
  """The summary row of combined ``rows`` (:func:`combine`) of ``settings``
  (their summary rows, one group of :func:`groups`); ``without``: the patterns
  that left families of the group out (named in the setting id)."""
  first = settings[0]
  s = {k: first[k] for k in _COPIED if k in first}
  for k in _MODEL:
    values = {x[k] for x in settings if k in x}
    if len(values) > 1:
      raise ValueError(f"{base_setting(first)}: the settings were computed on different "
                       f"models ({k}: {sorted(values)}); they are not combined")
    if values:
      s[k] = values.pop()
  s["setting"] = f"{base_setting(first)}_{WORST_SUFFIX}" + "".join(
      f"-without-{w}" for w in without)
  families = [attack_name(x) for x in settings]
  s["variant"] = f"worst of {len(settings)}: " + ", ".join(families)
  s["combined_from"] = [x["setting"] for x in settings]
  s["num_examples"] = len(rows)
  col = {k: np.array([r[k] for r in rows]) for k in _CLEAN}
  y = col["label"]
  for kind in ("plain", "single", "avg"):
    s[f"clean_accuracy_{kind}"] = float(np.mean(col[f"pred_{kind}"] == y))
  for kind in ("single", "avg"):
    s[f"clean_accuracy_{kind}_with_rejection"] = defense.accuracy_with_rejection(
        col[f"pred_{kind}"], y, col[f"rejected_{kind}"])
  name_of = {x["setting"]: attack_name(x) for x in settings}
  for metric in worst_case.METRICS:
    acc = worst_case.robust_accuracy(np.array([r[f"adv_broken_{metric}"] for r in rows]))
    s[f"robust_accuracy_{metric}"] = acc["mean"]
    s[f"robust_accuracy_{metric}_std"] = acc["std"]
    s[f"robust_accuracy_{metric}_min"] = acc["min"]
    wins = [name_of[r[f"adv_attack_{metric}"]] for r in rows if any(r[f"adv_broken_{metric}"])]
    s[f"attack_wins_{metric}"] = {n: wins.count(n) for n in sorted(set(wins))}
  s["adv_rejection_rate_avg"] = float(np.mean([r["adv_rejected_avg"] for r in rows]))
  for key in rows[0]:
    if key.startswith("norm_"):
      s[f"max_perturbation_{key[5:]}"] = float(max(r[key] for r in rows))
  return s


def each_attack(rows_by_setting: Mapping[str, Sequence[dict]], indices: Sequence[int],
                metric: str) -> dict[str, float]:
  """Each setting's own robust accuracy for ``metric`` on the examples ``indices``
  (the combined subset), so the families compare on the same images."""
  keep = set(indices)
  return {name: worst_case.robust_accuracy(np.array(
      [r[f"adv_broken_{metric}"] for r in rows if r["index"] in keep]))["mean"]
          for name, rows in rows_by_setting.items()}


def split_excluded(settings: Sequence[dict], exclude: Sequence[str]
                   ) -> tuple[list[dict], list[str]]:
  """``settings`` whose id contains none of the ``exclude`` substrings, and the
  patterns that matched one (sorted, unique)."""
  kept = [x for x in settings if not any(e in x["setting"] for e in exclude)]
  used = sorted({e for e in exclude for x in settings if e in x["setting"]})
  return kept, used


def combine_summaries(summaries: Sequence[dict], rows_dirs: Sequence[str],
                      exclude: Sequence[str] = ()) -> list[dict]:
  """One combined summary row per group of :func:`groups`, with each attack
  family's own robust accuracy on the same examples
  (``robust_accuracy_<metric>_by_attack``, headline metrics) and each family's
  own example count (``num_examples_by_attack``).  Settings whose id contains
  a string of ``exclude`` are left out (a group keeps a row if two families or
  more remain)."""
  out = []
  for settings in groups(summaries).values():
    settings, without = split_excluded(settings, exclude)
    if len(settings) < 2:
      continue
    rows = {x["setting"]: find_rows(rows_dirs, x["setting"]) for x in settings}
    combined = combine(rows)
    s = summarize(combined, settings, without)
    s["num_examples_by_attack"] = {attack_name(x): len(rows[x["setting"]]) for x in settings}
    name_of = {x["setting"]: attack_name(x) for x in settings}
    for metric in ("avg", worst_case.HEADLINE):
      s[f"robust_accuracy_{metric}_by_attack"] = {
          name_of[k]: v for k, v in each_attack(rows, [r["index"] for r in combined],
                                                metric).items()}
    out.append(s)
  return out


@dataclasses.dataclass
class CombineConfig:
  """``python -m dropjax.evaluation.combine`` (every field a flag)."""
  summaries: tuple = dataclasses.field(default=(), metadata={
      "help": "summary.jsonl files of evaluate.py (globs ok), or eval dirs holding one",
      "positional": True})
  rows: tuple = dataclasses.field(default=(), metadata={
      "help": "directories of the settings' rows: committed rows (<setting>.rows.jsonl.gz) "
              "or evaluate.py --out dirs (<setting>/rows.jsonl); default: beside each summary "
              "(its rows/ folder and its own directory)"})
  out: str = dataclasses.field(default="", metadata={
      "help": "summary file to write the combined rows to (rows of the same settings "
              "replaced, others kept); empty: print them"})
  exclude: tuple = dataclasses.field(default=(), metadata={
      "help": "leave out the settings whose id contains one of these strings (e.g. "
              "sparse_rs, run on fewer images); the combined id then ends "
              "'_worst-without-<string>', beside the full combination"})
  allow_empty: bool = dataclasses.field(default=False, metadata={
      "help": "when no setting has two attack families or more, say so and exit 0 "
              "instead of failing (for scripts run on any model)"})


def run(cfg: CombineConfig) -> int:
  paths = files.expand(cfg.summaries)
  if not paths:
    raise ValueError("give the summary.jsonl files to combine")
  summaries = store.read_summaries(paths)
  dirs = list(cfg.rows) or [d for p in paths for d in (
      os.path.join(os.path.dirname(p) if os.path.isfile(p) else p, "rows"),
      os.path.dirname(p) if os.path.isfile(p) else p)]
  combined = combine_summaries(summaries, dirs, cfg.exclude)
  if not combined and cfg.allow_empty:
    print("nothing to combine: no setting was evaluated by two attack families or more"
          + (f" (excluding {', '.join(cfg.exclude)})" if cfg.exclude else ""))
    return 0
  if not combined:
    raise ValueError("no setting was evaluated by two attack families or more in "
                     f"{', '.join(paths)}" + (f" (excluding {', '.join(cfg.exclude)})"
                                              if cfg.exclude else ""))
  for s in combined:
    print(f"{s['setting']} (n = {s['num_examples']}), robust accuracy of the "
          f"{s.get('num_masks')}-mask defense without / with rejection:")
    counts = s["num_examples_by_attack"]
    if len(set(counts.values())) > 1:
      print("  the families ran on different numbers of examples ("
            + ", ".join(f"{k}: {v}" for k, v in counts.items())
            + f"); all are compared on the {s['num_examples']} they share")
    for name in s["robust_accuracy_avg_by_attack"]:
      print(f"  {name:>40}: {s['robust_accuracy_avg_by_attack'][name]:.3f} / "
            f"{s[f'robust_accuracy_{worst_case.HEADLINE}_by_attack'][name]:.3f}")
    print(f"  {'worst case per example':>40}: {s['robust_accuracy_avg']:.3f} / "
          f"{s['robust_accuracy_avg_with_rejection']:.3f}")
  if cfg.out:
    done = {s["setting"] for s in combined}
    old = files.read_jsonl(cfg.out) if os.path.exists(cfg.out) else []
    files.write_jsonl(cfg.out, [r for r in old if r["setting"] not in done] + combined)
    print(cfg.out)
  return 0


def main(argv=None) -> int:
  from dropjax import cli  # pylint: disable=g-import-not-at-top
  return cli.run_command("python -m dropjax.evaluation.combine", __doc__, CombineConfig, run,
                         argv)


if __name__ == "__main__":
  raise SystemExit(main())
