"""Figures and tables from evaluation rows (``summary.jsonl``), no recomputation.

    python -m dropjax.plots runs/*/eval --out figures/

writes (PNG and SVG):

* ``clean_vs_drop_rate``: clean accuracy (single mask and K-mask average) vs
  the test-time drop rate, one line per model (the paper's Fig. 2);
* ``robust_vs_drop_rate_<norm>``: robust accuracy with and without rejection vs
  the drop rate, per norm (Figs. 5/6);
  in both, each line lies over a light band, the 95% Wilson interval of each
  point over its test images (:mod:`dropjax.intervals`);
* ``table.md``: a Table-1-style markdown table (per model and norm: clean
  accuracy, robust accuracy without / with rejection);
* ``certified_accuracy``: certified accuracy vs L0 radius, one line per
  certification setting (``certify.py`` output directories, from their rows),
  over its 95% interval band likewise.

``--figures`` draws a subset (``clean robust certified table``; default all).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys

import matplotlib
from matplotlib.figure import Figure

from dropjax import files
from dropjax.config import TrainConfig
from dropjax.evaluation.store import read_summaries
from dropjax.intervals import wilson


def model_name(row: dict) -> str:
  """The trained model of a summary row, e.g. ``gtsrb ResNet-20 (random r)``, or
  ``gtsrb ResNet-20 (random r, weight decay 0.0005)`` where the row records a
  weight decay other than the preset's (He et al.'s)."""
  drop = {"none": "normal", "fixed": f"fixed r={row.get('train_drop_rate')}",
          "random": "random r"}.get(row.get("train_drop"), row.get("train_drop"))
  adv = row.get("train_adv_training") or "none"
  if adv != "none":  # e.g. "PGD-AT linf", and the dropping if it was combined with it
    adv = f"{adv.upper()}-AT {row.get('train_adv_norm')}"
    drop = adv if drop == "normal" else f"{adv}, {drop}"
  decay = row.get("train_weight_decay", TrainConfig.weight_decay)
  if decay != TrainConfig.weight_decay:
    drop += f", weight decay {decay:g}"
  return f"{row.get('dataset')} ResNet-{row.get('depth')} ({drop})"


# What makes a saved figure depend on more than its rows: the date matplotlib writes
# into an SVG and the random ids of its clip paths.  Without them, re-rendering
# unchanged rows rewrites no committed figure.
_REPRODUCIBLE = {"png": {}, "svg": {"Date": None}}
_SVG_SALT = "dropjax"


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
               squeeze: bool = True):
  """``(figure, axes)`` as ``pyplot.subplots`` makes them, without pyplot: no
  backend is chosen and no figure registered, so drawing (and importing this
  module) changes nothing in the process.  Sizes in inches."""
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig, out_dir: str, name: str) -> list[str]:
  """Saves ``fig`` as ``out_dir/name.png`` and ``.svg`` (the same bytes for the
  same figure), returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  with matplotlib.rc_context({"svg.hashsalt": _SVG_SALT}):
    for ext, metadata in _REPRODUCIBLE.items():
      path = os.path.join(out_dir, f"{name}.{ext}")
      fig.savefig(path, dpi=120, bbox_inches="tight", metadata=metadata)
      paths.append(path)
  return paths


def model_labels(rows: list[dict]):
  """``label(row)``: the row's :func:`model_name`, followed by its ``workdir`` where
  rows of several workdirs share that name (two fixed-r models trained with other
  weight decays, say), so that no model's points replace another's."""
  workdirs = collections.defaultdict(set)
  for r in rows:
    workdirs[model_name(r)].add(r.get("workdir"))

  def label(row: dict) -> str:
    name = model_name(row)
    return name if len(workdirs[name]) < 2 else f"{name} [{row.get('workdir')}]"
  return label


def clean_points(rows: list[dict]) -> dict[str, dict[float, dict]]:
  """``{model: {drop rate: summary row}}`` for Fig. 2: per model and rate the row
  measured on the most test images (an attack family run on fewer images measures
  the same clean accuracy less precisely); among equals the later row.  Models are
  told apart by :func:`model_labels`."""
  label = model_labels(rows)
  by_model = collections.defaultdict(dict)
  for r in rows:
    pts = by_model[label(r)]
    old = pts.get(r["drop_rate"])
    if old is None or r.get("num_examples", 0) >= old.get("num_examples", 0):
      pts[r["drop_rate"]] = r
  return by_model


def interval_band(points: list[dict], key: str) -> tuple[list[float], list[float]]:
  """``(lows, highs)``: the 95% Wilson interval of ``point[key]`` over each
  point's ``num_examples`` test images (:func:`dropjax.intervals.wilson`)."""
  bands = [wilson(p[key], p.get("num_examples", 0)) for p in points]
  return [lo for lo, _ in bands], [hi for _, hi in bands]


def plot_line(ax, rates: list[float], points: list[dict], key: str, style: str, **kw):
  """``points[i][key]`` at ``rates[i]``, over a light band of its 95% interval
  (a lone point, which spans no band: an error bar)."""
  ys = [p[key] for p in points]
  line, = ax.plot(rates, ys, style, **kw)
  lows, highs = interval_band(points, key)
  if len(rates) > 1:
    ax.fill_between(rates, lows, highs, color=line.get_color(), alpha=0.12, linewidth=0)
  else:
    ax.errorbar(rates, ys, yerr=[[ys[0] - lows[0]], [highs[0] - ys[0]]], fmt="none",
                ecolor=line.get_color(), alpha=0.5, capsize=3)
  return line


_BAND_NOTE = "shaded bands, bars: 95% Wilson intervals over the n test images"
# The drop-rate axis shows at least the paper's rates 0-0.9 (with matplotlib's 5%
# margins), so a figure of one rate (a model without masks: r = 0) reads like the rest.
RATE_AXIS = (-0.045, 0.945)


def rate_axis(ax) -> None:
  """Labels the x axis as the test-time drop rate and widens it to :data:`RATE_AXIS`."""
  lo, hi = ax.get_xlim()
  ax.set(xlabel="test-time drop rate r", xlim=(min(lo, RATE_AXIS[0]), max(hi, RATE_AXIS[1])))


def plot_clean_vs_rate(rows: list[dict], out_dir: str) -> list[str]:
  """Fig. 2: clean accuracy (single mask and 10-mask average) vs test-time drop
  rate, one line pair per model (:func:`clean_points`); saved in ``out_dir``,
  returns the paths (none without clean rows)."""
  by_model = clean_points(rows)
  if not by_model:
    return []
  fig, ax = new_figure(figsize=(5, 3.5))
  for name, pts in sorted(by_model.items()):
    rates = sorted(pts)
    points = [pts[x] for x in rates]
    plot_line(ax, rates, points, "clean_accuracy_avg", "o-", label=f"{name}, avg")
    plot_line(ax, rates, points, "clean_accuracy_single", "x--", label=f"{name}, 1 mask")
  rate_axis(ax)
  ax.set(ylabel="clean accuracy", ylim=(0, 1))
  ax.set_title(_BAND_NOTE, fontsize=7)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out_dir, "clean_vs_drop_rate")


def line_variant(row: dict) -> str:
  """The attack one line of a figure stands for: the row's variant; for a
  worst case over attack families (``dropjax.evaluation.combine``, a row with
  ``combined_from``) "worst case per example", and the families its setting id
  says were left out -- not which families it combines, which can differ from
  one drop rate to the next (the table and the row name them), so the worst case
  is one line across r."""
  if "combined_from" not in row:
    return row.get("variant") or ""
  left_out = row["setting"].rsplit("_worst", 1)[-1].split("-without-")[1:]
  return "worst case per example" + "".join(f", without {w}" for w in left_out)


def line_label(row: dict, with_eps: bool = False, families: bool = True,
               model: str | None = None) -> str:
  """The model (``model``, default :func:`model_name`), and the budget / attack
  variant where they tell lines apart; ``families=False``: a worst case named as one
  line (:func:`line_variant`)."""
  label = model or model_name(row)
  if with_eps:
    label += f", eps {row['eps']:.4g}"
  if row.get("norm") != "l0" and row.get("budget_reading", "literal") != "literal":
    label += f", {row['budget_reading']} budget"  # another line, not the literal one's point
  variant = row.get("variant") if families else line_variant(row)
  if variant:
    label += f" [{variant}]"
  return label


def sample_sizes(rows: list[dict]) -> str:
  """The examples behind a line's points: ``"500"``, or ``"100-500"`` when they differ."""
  ns = sorted({r.get("num_examples", 0) for r in rows})
  return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def plot_robust_vs_rate(rows: list[dict], out_dir: str) -> list[str]:
  """Figs. 5/6: robust accuracy (with and without entropy rejection) vs test-time
  drop rate, one figure per norm of the attacked summary rows; saved in
  ``out_dir``, returns the paths."""
  paths = []
  attacked = [r for r in rows if r.get("norm") != "none" and "robust_accuracy_avg" in r]
  for norm in sorted({r["norm"] for r in attacked}):
    # One line per model, budget and attack (summary rows of several budgets or
    # attack variants at the same r are separate lines, not overwritten).
    lines = collections.defaultdict(dict)
    these = [r for r in attacked if r["norm"] == norm]
    several_eps = len({r["eps"] for r in these}) > 1
    model = model_labels(these)
    for r in these:
      lines[line_label(r, several_eps, families=False, model=model(r))][r["drop_rate"]] = r
    fig, ax = new_figure(figsize=(5, 3.5))
    for i, (name, pts) in enumerate(sorted(lines.items())):
      rates = sorted(pts)
      color = f"C{i % 10}"  # one colour per line: solid without, dashed with rejection
      points = [pts[x] for x in rates]
      name += f" (n={sample_sizes(points)})"
      plot_line(ax, rates, points, "robust_accuracy_avg", "o-", color=color, label=name)
      plot_line(ax, rates, points, "robust_accuracy_avg_with_rejection", "s--", color=color,
                label=f"{name}, with rejection")
    rate_axis(ax)
    ax.set(ylabel=f"robust accuracy ({norm})", ylim=(0, 1))
    ax.set_title(_BAND_NOTE, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside, not over
    paths += save_figure(fig, out_dir, f"robust_vs_drop_rate_{norm}")
  return paths


def markdown_table(rows: list[dict]) -> str:
  """One line per (model, norm, eps, drop rate): the paper's Table 1 columns."""
  head = ("| model | norm | eps | r | clean acc (avg) | robust acc | robust acc w/ rejection "
          "| adv. rejected |\n|---|---|---|---|---|---|---|---|\n")
  lines = []
  model = model_labels(rows)
  for r in sorted(rows, key=lambda r: (model(r), r["norm"], r["eps"], r.get("variant", ""),
                                      r["drop_rate"])):
    if r.get("norm") == "none":
      continue
    lines.append(f"| {line_label(r, model=model(r))} | {r['norm']} | {r['eps']:.4g} "
                 f"| {r['drop_rate']:.2g} "
                 f"| {r['clean_accuracy_avg']:.3f} | {r['robust_accuracy_avg']:.3f} "
                 f"| {r['robust_accuracy_avg_with_rejection']:.3f} "
                 f"| {r['adv_rejection_rate_avg']:.3f} |")
  return head + "\n".join(lines) + "\n"


def certification_label(summary: dict) -> str:
  train = (f"ablation k={summary['train_keep']}, {summary['input_encoding']}"
           if summary.get("train_drop") == "ablate" else
           {"none": "normal", "fixed": "fixed r", "random": "random r"}.get(
               summary.get("train_drop"), summary.get("train_drop")))
  return (f"{summary['dataset']} ResNet-{summary['depth']} ({train}), "
          f"k={summary['keep']}, n={summary['n']}")


def plot_certified_accuracy(curves: dict[str, list[dict]], out_dir: str,
                            name: str = "certified_accuracy") -> list[str]:
  """Certified accuracy vs radius from certification rows, one line per label."""
  from dropjax.certification import certified_curve  # pylint: disable=g-import-not-at-top
  if not curves:
    return []
  fig, ax = new_figure(figsize=(5, 3.5))
  for label, rows in sorted(curves.items()):
    radii, acc = certified_curve(rows)
    line, = ax.step(radii, acc, where="post", label=f"{label}, {len(rows)} images")
    band = [wilson(float(a), len(rows)) for a in acc]
    ax.fill_between(radii, [lo for lo, _ in band], [hi for _, hi in band], step="post",
                    color=line.get_color(), alpha=0.12, linewidth=0)
  ax.set(xlabel="L0 radius ρ (pixels)", ylabel="certified accuracy", ylim=(0, 1))
  ax.set_title("shaded bands: 95% Wilson intervals over the certified test images",
               fontsize=7)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out_dir, name)


def certification_curves(paths: list[str]) -> dict[str, list[dict]]:
  """``{label: rows}`` for the certification settings among ``paths``."""
  curves = {}
  for p in paths:
    d = p if os.path.isdir(p) else os.path.dirname(p)
    for summary in read_summaries([p]):
      if "n0" in summary:
        curves[certification_label(summary)] = files.read_jsonl(
            os.path.join(d, summary["setting"], "rows.jsonl"))
  return curves


FIGURES = ("clean", "robust", "certified", "table")


def render(paths: list[str], out_dir: str, figures: tuple = FIGURES) -> list[str]:
  """Writes the ``figures`` (of :data:`FIGURES`) that the rows under ``paths`` support."""
  unknown = sorted(set(figures) - set(FIGURES))
  if unknown:
    raise ValueError(f"unknown figures {unknown}; choose from {list(FIGURES)}")
  all_rows = read_summaries(paths)
  rows = [r for r in all_rows if "n0" not in r]  # evaluation summaries
  os.makedirs(out_dir, exist_ok=True)
  written = []
  if "clean" in figures:
    written += plot_clean_vs_rate(rows, out_dir)
  if "robust" in figures:
    written += plot_robust_vs_rate(rows, out_dir)
  if "certified" in figures:
    written += plot_certified_accuracy(certification_curves(paths), out_dir)
  if "table" in figures and any(r.get("norm") != "none" for r in rows):
    table = os.path.join(out_dir, "table.md")  # attacked rows only: no empty table
    files.write_atomic(table, markdown_table(rows))
    written.append(table)
  return written


@dataclasses.dataclass
class PlotsConfig:
  """``python -m dropjax.plots`` (every field a flag)."""
  inputs: tuple = dataclasses.field(default=(), metadata={
      "help": "eval or certify dirs, or their summary.jsonl files (globs ok)",
      "positional": True})
  out: str = dataclasses.field(default="figures", metadata={
      "help": "output directory for PNG/SVG/markdown"})
  figures: tuple = dataclasses.field(default=FIGURES, metadata={
      "help": "what to draw: clean (Fig. 2), robust (Figs. 5/6), certified, table",
      "choices": FIGURES})


def run(cfg: PlotsConfig) -> int:
  inputs = files.expand(cfg.inputs)
  written = render(inputs, cfg.out, tuple(cfg.figures))
  for path in written:
    print(path)
  if not written:  # e.g. a resumed run whose first setting has not finished yet
    print(f"nothing to draw: no rows for {list(cfg.figures)} in {inputs}", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  from dropjax import cli  # pylint: disable=g-import-not-at-top
  return cli.run_command("python -m dropjax.plots", __doc__, PlotsConfig, run, argv)


if __name__ == "__main__":
  raise SystemExit(main())
