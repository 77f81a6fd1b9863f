"""dropjax.intervals, and the 95% interval bands of dropjax.plots (Figs. 2, 5/6)."""
import numpy as np
import pytest

from dropjax import intervals, plots


def test_wilson_interval_matches_the_closed_form_reference():
  lo, hi = intervals.wilson(0.5, 100)  # textbook value: [0.4038, 0.5962]
  assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
  lo, hi = intervals.wilson(0.0, 500)  # a zero count still has a positive upper bound
  assert lo == 0.0 and abs(hi - 0.00762) < 1e-4
  assert intervals.wilson(0.3, 0) == (0.0, 1.0)
  assert intervals.wilson(1.0, 500)[1] == 1.0
  with pytest.raises(ValueError, match="proportion"):
    intervals.wilson(1.5, 10)


def test_each_line_lies_over_its_wilson_band():
  points = [{"robust_accuracy_avg": p, "num_examples": n}
            for p, n in ((0.1, 1000), (0.5, 200), (0.0, 500))]
  lows, highs = plots.interval_band(points, "robust_accuracy_avg")
  for p, lo, hi in zip(points, lows, highs):
    assert (lo, hi) == intervals.wilson(p["robust_accuracy_avg"], p["num_examples"])
    assert lo <= p["robust_accuracy_avg"] <= hi
  assert highs[1] - lows[1] > highs[0] - lows[0]  # fewer images, a wider band
  fig, ax = plots.new_figure(figsize=(3, 2))
  line = plots.plot_line(ax, [0.0, 0.5, 0.9], points, "robust_accuracy_avg", "o-")
  [band] = ax.collections
  ys = band.get_paths()[0].vertices[:, 1]
  np.testing.assert_allclose(sorted(set(np.round(ys, 12))),
                             sorted(set(np.round(lows + highs, 12))))
  np.testing.assert_allclose(band.get_facecolor()[0][:3],
                             plots.matplotlib.colors.to_rgb(line.get_color()))


def test_a_lone_point_gets_an_error_bar_of_its_interval():
  point = {"clean_accuracy_avg": 0.8, "num_examples": 100}
  fig, ax = plots.new_figure(figsize=(3, 2))
  plots.plot_line(ax, [0.5], [point], "clean_accuracy_avg", "o-")
  lo, hi = intervals.wilson(0.8, 100)
  [bar] = [c for c in ax.collections]  # the error bar's vertical segment
  np.testing.assert_allclose(bar.get_segments()[0], [[0.5, lo], [0.5, hi]])


def test_the_rate_axis_spans_the_papers_rates_and_cuts_off_no_point():
  fig, ax = plots.new_figure(figsize=(3, 2))
  ax.plot([0.0], [0.5], "o")  # a model without masks: one rate
  plots.rate_axis(ax)
  lo, hi = ax.get_xlim()
  assert lo <= -0.04 and hi >= 0.94  # r = 0 ... 0.9 with margins, like a full sweep
  fig, ax = plots.new_figure(figsize=(3, 2))
  ax.plot([0.5, 1.0], [0.5, 0.1], "o-")
  plots.rate_axis(ax)
  assert ax.get_xlim()[1] > 1.0 and ax.get_xlim()[0] <= -0.04
  assert ax.get_xlabel() == "test-time drop rate r"
