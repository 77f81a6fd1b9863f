"""experiments/paired_plot.py: paired differences drawn from paired_accuracy.py's rows."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "paired_plot.py")
_spec = importlib.util.spec_from_file_location("paired_plot", _PATH)
pp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pp)


def _row(metric, d, half):
  return {"a": "A", "b": "B", "metric": metric, "scores": "robust", "n": 500,
          "difference": d, "difference_interval": [d - half, d + half]}


def test_labels_drop_the_common_words_only():
  assert pp.labels_of(["x/m_vs_n_l0_r0.5.jsonl", "y/m_vs_n_l2_r0.9.jsonl"]) == [
      "l0_r0.5", "l2_r0.9"]
  assert pp.labels_of(["x/one.jsonl"]) == ["one"]


def test_every_comparison_and_metric_is_drawn_at_its_interval(tmp_path):
  rows = {"l0": [_row("avg", 0.15, 0.03), _row("avg_with_rejection", 0.08, 0.03)],
          "linf": [_row("avg", -0.03, 0.01), _row("avg_with_rejection", 0.02, 0.04)]}
  paths = []
  for name, rs in rows.items():
    path = tmp_path / f"cmp_{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    paths.append(str(path))
  fig = pp.draw([(n, rs) for n, rs in rows.items()])
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["linf", "l0"]  # top to bottom
  # One errorbar per metric; its points are the differences in accuracy points.
  xs = sorted(round(x, 6) for line in ax.lines for x in line.get_xdata()
              if line.get_marker() in ("o", "s"))
  assert xs == sorted(round(100 * r["difference"], 6) for rs in rows.values() for r in rs)
  assert pp.main(paths + ["--out", str(tmp_path / "fig"), "--name", "p"]) == 0
  assert sorted(os.listdir(tmp_path / "fig")) == ["p.png", "p.svg"]
  with pytest.raises(ValueError, match="no row of metric 'single'"):
    pp.draw([("l0", rows["l0"])], ("single",))
  with pytest.raises(SystemExit, match="1 labels for 2 files"):
    pp.main(paths + ["--out", str(tmp_path), "--labels", "one"])
