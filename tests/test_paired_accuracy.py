"""experiments/paired_accuracy.py: two models' accuracies on the same images, paired."""
import gzip
import importlib.util
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "paired_accuracy.py")
_spec = importlib.util.spec_from_file_location("paired_accuracy", _PATH)
pa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pa)

SETTING = "none_eps0_r0.9"


def _rows(labels, preds, rejected=None):
  rejected = [False] * len(labels) if rejected is None else rejected
  return [{"index": i, "label": int(y), "pred_plain": int(p), "pred_single": int(p),
           "pred_avg": int(p), "rejected_single": bool(r), "rejected_avg": bool(r)}
          for i, (y, p, r) in enumerate(zip(labels, preds, rejected))]


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (3, 0), (7, 9), (728, 567), (40, 1)])
def test_mcnemar_p_is_the_exact_binomial_test(a_only, b_only):
  want = 1.0 if a_only + b_only == 0 else stats.binomtest(
      a_only, a_only + b_only, 0.5).pvalue
  assert pa.mcnemar_p(a_only, b_only) == pytest.approx(want, rel=1e-9)


def test_counts_difference_and_interval_follow_the_pairs():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 400)
  # Correlated, as two models of one data set are: B errs where A does, and on more.
  hard = rng.random(400)
  preds_a = np.where(hard < 0.8, labels, (labels + 1) % 10)
  preds_b = np.where((hard < 0.7) | (rng.random(400) < 0.05), labels, (labels + 2) % 10)
  r = pa.compare(_rows(labels, preds_a), _rows(labels, preds_b), "avg")
  right_a, right_b = preds_a == labels, preds_b == labels
  assert r["n"] == 400
  assert r["accuracy_a"] == right_a.mean() and r["accuracy_b"] == right_b.mean()
  assert r["a_only"] == int((right_a & ~right_b).sum())
  assert r["b_only"] == int((right_b & ~right_a).sum())
  assert r["difference"] == pytest.approx(r["accuracy_a"] - r["accuracy_b"])
  lo, hi = r["difference_interval"]
  assert lo < r["difference"] < hi
  # Paired, and correlated: narrower than the interval of two independent accuracies.
  pa_, pb_ = r["accuracy_a"], r["accuracy_b"]
  unpaired = 1.959963984540054 * math.sqrt((pa_ * (1 - pa_) + pb_ * (1 - pb_)) / 400)
  assert (hi - lo) / 2 <= unpaired


def test_rejection_counts_as_an_error_and_the_same_model_differs_by_nothing():
  labels = [1, 2, 3, 4]
  a = _rows(labels, labels, rejected=[True, False, False, False])
  b = _rows(labels, labels)
  r = pa.compare(a, b, "avg_with_rejection")
  assert (r["accuracy_a"], r["accuracy_b"], r["a_only"], r["b_only"]) == (0.75, 1.0, 0, 1)
  assert pa.compare(a, b, "avg")["difference"] == 0.0
  same = pa.compare(b, b, "single")
  assert same["difference"] == 0.0 and same["mcnemar_p"] == 1.0
  assert same["difference_interval"] == [0.0, 0.0]


def test_different_images_or_labels_are_an_error():
  a = _rows([1, 2, 3], [1, 2, 3])
  with pytest.raises(ValueError, match="different images"):
    pa.compare(a, _rows([1, 2], [1, 2]), "avg")
  with pytest.raises(ValueError, match="label"):
    pa.compare(a, _rows([1, 2, 4], [1, 2, 4]), "avg")


def test_main_reads_an_evaluation_and_kept_rows(tmp_path, capsys):
  labels = [0, 1, 2, 3, 4, 5]
  # A: an evaluation output directory, its chunks (a setting still running counts too).
  run = tmp_path / "eval" / SETTING
  run.mkdir(parents=True)
  a = _rows(labels, [0, 1, 2, 3, 9, 9])
  for c, part in enumerate((a[:4], a[4:])):
    (run / f"chunk_{c:05d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in part))
  # B: kept rows (experiments/lib.sh save_rows).
  kept = tmp_path / "kept"
  kept.mkdir()
  b = _rows(labels, [0, 9, 2, 3, 4, 5])
  with gzip.open(kept / f"{SETTING}.rows.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps(x) + "\n" for x in b))
  out = tmp_path / "paired" / "rows.jsonl"
  assert pa.main([str(tmp_path / "eval"), str(kept), "--setting", SETTING,
                  "--out", str(out)]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prediction"] for r in rows] == list(pa.PREDICTIONS)
  single = rows[1]
  assert (single["a_only"], single["b_only"], single["n"]) == (1, 2, 6)
  assert single["setting"] == SETTING
  assert "| single | 6 |" in capsys.readouterr().out


def test_missing_or_non_clean_rows_are_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no rows"):
    pa.read_rows(str(tmp_path), SETTING)
  d = tmp_path / "linf"
  d.mkdir()
  (d / "rows.jsonl").write_text(json.dumps({"index": 0, "label": 1, "robust_avg": 1.0}) + "\n")
  with pytest.raises(ValueError, match="not a clean setting"):
    pa.read_rows(str(tmp_path), "linf")
