"""Worst case per example over attacks (dropjax.evaluation.worst_case), on rows with
known answers."""
import numpy as np
import pytest

from dropjax.evaluation import worst_case


def test_broken_per_metric():
  dec = {"pred_plain": np.array([1, 0, 1, 0]), "pred_single": np.array([1, 1, 0, 0]),
         "rejected_single": np.array([True, False, False, False]),
         "pred_avg": np.array([1, 1, 1, 0]), "rejected_avg": np.array([False, True, False, False])}
  b = worst_case.broken(dec, np.zeros(4, int))
  np.testing.assert_array_equal(b["plain"], [1, 0, 1, 0])
  np.testing.assert_array_equal(b["single"], [1, 1, 0, 0])
  np.testing.assert_array_equal(b["single_with_rejection"], [0, 1, 0, 0])
  np.testing.assert_array_equal(b["avg"], [1, 1, 1, 0])
  np.testing.assert_array_equal(b["avg_with_rejection"], [1, 0, 1, 0])


def test_select_keeps_the_attack_with_the_highest_success_rate():
  # 3 attacks, 4 draws, 3 examples.
  j = np.zeros((3, 4, 3), bool)
  j[0, :1, 0] = True          # example 0: attack 0 breaks it in 1 of 4 draws
  j[2, :3, 0] = True          #            attack 2 in 3 of 4 -> attack 2
  j[1, :, 1] = True           # example 1: attack 1 always
  j[0, :, 1] = True           #            attack 0 always too -> the first (0)
  winner, draws = worst_case.select(j)  # example 2: never broken -> attack 0, no draws
  np.testing.assert_array_equal(winner, [2, 0, 0])
  np.testing.assert_array_equal(draws[0], [1, 1, 1, 0])
  np.testing.assert_array_equal(draws[1], [1, 1, 1, 1])
  assert not draws[2].any()
  acc = worst_case.robust_accuracy(draws)
  per_draw = [1 - 2 / 3, 1 - 2 / 3, 1 - 2 / 3, 1 - 1 / 3]
  assert acc["mean"] == pytest.approx(np.mean(per_draw))
  assert acc["std"] == pytest.approx(np.std(per_draw))
  assert acc["min"] == pytest.approx(1 / 3) and acc["max"] == pytest.approx(2 / 3)


def test_rejection_aware_worst_case_differs_from_prediction_only():
  """An attack that fools the prediction but is always rejected loses, with
  rejection, to one that fools it less often but is never rejected."""
  labels = np.zeros(1, int)
  fooled_rejected = {"pred_plain": [1], "pred_single": [1], "rejected_single": [True],
                     "pred_avg": [1], "rejected_avg": [True]}
  sometimes = [{"pred_plain": [p], "pred_single": [p], "rejected_single": [False],
                "pred_avg": [p], "rejected_avg": [False]} for p in (1, 0)]
  dec = {0: [fooled_rejected, fooled_rejected], 1: sometimes}
  per_metric = {m: np.zeros((2, 2, 1), bool) for m in worst_case.METRICS}
  for a in range(2):
    for r in range(2):
      for m, v in worst_case.broken({k: np.array(v) for k, v in dec[a][r].items()}, labels).items():
        per_metric[m][a, r] = v
  w_avg, _ = worst_case.select(per_metric["avg"])
  w_rej, d_rej = worst_case.select(per_metric["avg_with_rejection"])
  assert w_avg[0] == 0 and w_rej[0] == 1
  np.testing.assert_array_equal(d_rej[0], [True, False])


def test_select_rejects_empty_input():
  with pytest.raises(ValueError, match="non-empty"):
    worst_case.select(np.zeros((0, 2, 3), bool))
