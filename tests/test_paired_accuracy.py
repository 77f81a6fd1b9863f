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
def test_sign_flip_of_0_1_scores_is_the_exact_mcnemar_test(a_only, b_only):
  want = 1.0 if a_only + b_only == 0 else stats.binomtest(
      a_only, a_only + b_only, 0.5).pvalue
  # Concordant images (difference 0) change nothing.
  d = [1] * a_only + [-1] * b_only + [0] * 50
  assert pa.sign_flip_p(d) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_sign_flip_p_is_scipys_exact_paired_permutation_test(seed):
  rng = np.random.default_rng(seed)
  d = rng.integers(-5, 6, 12) + (seed == 3) * 2  # draws-scaled differences; one skewed
  want = stats.permutation_test((d,), np.sum, permutation_type="samples",
                                n_resamples=np.inf).pvalue
  assert pa.sign_flip_p(d) == pytest.approx(min(1.0, want), rel=1e-9)


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
  assert r["a_better"] == int((right_a & ~right_b).sum())
  assert r["b_better"] == int((right_b & ~right_a).sum())
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
  assert (r["accuracy_a"], r["accuracy_b"], r["a_better"], r["b_better"]) == (0.75, 1.0, 0, 1)
  assert pa.compare(a, b, "avg")["difference"] == 0.0
  same = pa.compare(b, b, "single")
  assert same["difference"] == 0.0 and same["p_value"] == 1.0
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
  assert [r["metric"] for r in rows] == list(pa.PREDICTIONS)
  single = rows[1]
  assert (single["a_better"], single["b_better"], single["n"]) == (1, 2, 6)
  assert single["settings"] == [SETTING] and single["scores"] == "clean"
  assert "| single | 6 |" in capsys.readouterr().out


def test_missing_rows_or_clean_settings_combined_are_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no rows"):
    pa.read_rows(str(tmp_path), [SETTING])
  for name, rows in ((SETTING, _rows([1, 2], [1, 2])), ("linf", _attacked([1, 2], [[0] * 5] * 2))):
    with gzip.open(tmp_path / f"{name}.rows.jsonl.gz", "wt") as f:
      f.write("".join(json.dumps(x) + "\n" for x in rows))
  with pytest.raises(ValueError, match="not attacked"):
    pa.read_rows(str(tmp_path), [SETTING, "linf"])
  with pytest.raises(ValueError, match="clean setting"):
    pa.compare(_rows([1, 2], [1, 2]), _attacked([1, 2], [[0] * 5] * 2), "avg")


def _attacked(labels, broken, indices=None):
  """Attacked rows: ``broken[i]`` the R draws of every metric of image i (the headline
  metric's draws, the others all broken but for ``plain``, never broken)."""
  indices = range(len(labels)) if indices is None else indices
  rows = []
  for i, y, b in zip(indices, labels, broken):
    row = {"index": int(i), "label": int(y), "pred_plain": int(y), "pred_single": int(y),
           "pred_avg": int(y), "rejected_single": False, "rejected_avg": False,
           "adv_rejected_avg": False, "norm_l0": 3}
    for m in pa.worst_case.METRICS:
      row[f"adv_broken_{m}"] = ([bool(x) for x in b] if m == pa.worst_case.HEADLINE else
                                [m != "plain"] * len(b))
    rows.append(row)
  return rows


def test_robust_scores_are_the_surviving_fraction_of_draws_and_pair_exactly():
  rng = np.random.default_rng(1)
  n, draws = 11, 5
  labels = rng.integers(0, 10, n)
  broken_a = rng.random((n, draws)) < 0.3
  broken_b = rng.random((n, draws)) < 0.5
  a, b = _attacked(labels, broken_a), _attacked(labels, broken_b)
  r = pa.compare(a, b, "avg_with_rejection")
  assert r["scores"] == "robust" and r["n"] == n
  # The mean score is the robust accuracy evaluate.py reports.
  assert r["accuracy_a"] == pytest.approx(pa.worst_case.robust_accuracy(broken_a)["mean"])
  assert r["accuracy_b"] == pytest.approx(pa.worst_case.robust_accuracy(broken_b)["mean"])
  per_image = (1 - broken_a.mean(1)) - (1 - broken_b.mean(1))
  assert r["difference"] == pytest.approx(per_image.mean())
  assert (r["a_better"], r["b_better"]) == ((per_image > 1e-12).sum(), (per_image < -1e-12).sum())
  lo, hi = r["difference_interval"]
  half = 1.959963984540054 * per_image.std() / math.sqrt(n)
  assert (lo, hi) == pytest.approx((per_image.mean() - half, per_image.mean() + half))
  want = stats.permutation_test((per_image,), np.sum, permutation_type="samples",
                                n_resamples=np.inf).pvalue
  assert r["p_value"] == pytest.approx(min(1.0, want), rel=1e-6)
  assert pa.compare(a, a, "plain")["difference"] == 0.0
  assert pa.compare(a, b, "plain")["accuracy_a"] == 1.0
  assert pa.compare(a, b, "avg")["accuracy_a"] == 0.0


def test_several_attacked_settings_pair_their_per_example_worst_case(tmp_path):
  labels = [3, 1, 4, 1]
  pgd = [[1, 0, 0, 0, 0], [0] * 5, [1] * 5, [0] * 5]
  sparse = [[0] * 5, [1, 1, 0, 0, 0], [0] * 5]  # run on the first three images only
  for model, scale in (("a", 1), ("b", 0)):
    d = tmp_path / model
    d.mkdir()
    for name, broken in (("l0_r0.9", pgd), ("l0_r0.9_sparse_rs", sparse)):
      rows = _attacked(labels, [[x * scale for x in draw] for draw in broken])
      with gzip.open(d / f"{name}.rows.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(x) + "\n" for x in rows))
  a = pa.read_rows(str(tmp_path / "a"), ["l0_r0.9", "l0_r0.9_sparse_rs"])
  assert [r["index"] for r in a] == [0, 1, 2]
  assert [r["adv_broken_avg_with_rejection"] for r in a] == [
      [True] + [False] * 4, [True, True, False, False, False], [True] * 5]
  out = tmp_path / "paired.jsonl"
  assert pa.main([str(tmp_path / "a"), str(tmp_path / "b"), "--setting", "l0_r0.9",
                  "--setting", "l0_r0.9_sparse_rs", "--out", str(out)]) == 0
  rows = {r["metric"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == set(pa.worst_case.METRICS)
  head = rows["avg_with_rejection"]
  assert (head["n"], head["accuracy_b"], head["b_better"], head["a_better"]) == (3, 1.0, 3, 0)
  assert head["accuracy_a"] == pytest.approx(1 - 8 / 15)


def test_common_pairs_the_shared_images_and_duplicates_are_an_error():
  a = _rows([1, 2, 3, 4], [1, 2, 0, 0])
  b = _rows([1, 2], [1, 0])
  r = pa.compare(a, b, "avg", common=True)
  assert (r["n"], r["accuracy_a"], r["accuracy_b"]) == (2, 1.0, 0.5)
  with pytest.raises(ValueError, match="different images.*2 in common"):
    pa.compare(a, b, "avg")
  with pytest.raises(ValueError, match="twice"):
    pa.compare(a + a[:1], a, "avg")
  far = _rows([5], [5])
  far[0]["index"] = 99
  with pytest.raises(ValueError, match="no image in common"):
    pa.compare(a, far, "avg", common=True)


def test_clean_right_keeps_the_images_both_defenses_classify():
  a = _rows([1, 2, 3, 4], [1, 2, 0, 4])  # A wrong on image 2
  b = _rows([1, 2, 3, 4], [1, 0, 3, 4])  # B wrong on image 1
  r = pa.compare(a, b, "plain", clean_right=True)
  assert (r["n"], r["accuracy_a"], r["accuracy_b"]) == (2, 1.0, 1.0)
  with pytest.raises(ValueError, match="no image that both"):
    pa.compare(_rows([1], [0]), _rows([1], [1]), "plain", clean_right=True)


def test_unequal_numbers_of_draws_are_an_error():
  a = _attacked([1, 2], [[0] * 5, [0] * 3])
  with pytest.raises(ValueError, match="unequal numbers of scoring draws"):
    pa.compare(a, a, "avg")
