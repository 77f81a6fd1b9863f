"""The worst case per example over attacks, scored by the randomized defense.

Every attack configuration ``j`` of an evaluation (CE / CW, untargeted and
targeted at each of the top-k other classes, restarts) yields one adversarial
input per example.  Each is scored with the defense's real decision over ``R``
independent draws of its masks, and for each reported *metric* and draw the
example is **broken** when:

=========================  =====================================================
``plain``                  the undefended model's prediction is wrong
``single``                 the prediction on one mask is wrong
``single_with_rejection``  ... wrong *and* not rejected by the entropy threshold
``avg``                    the K-mask average's prediction is wrong
``avg_with_rejection``     ... wrong *and* not rejected (the paper's headline)
=========================  =====================================================

Per example and metric the attack with the highest success rate over the
``R`` draws is kept (ties: the first), so "robust accuracy" counts an example
broken if some attack makes the prediction wrong, and "with rejection" only if
some attack makes it wrong and not rejected.  Robust accuracy is ``1 -`` the
broken fraction, averaged over draws; its spread over draws is reported too.
"""
from __future__ import annotations

import numpy as np

METRICS = ("plain", "single", "single_with_rejection", "avg", "avg_with_rejection")
HEADLINE = "avg_with_rejection"


def broken(decision: dict, labels: np.ndarray) -> dict[str, np.ndarray]:
  """Per metric (B,) bool from one draw's decision: ``pred_plain``,
  ``pred_single``, ``rejected_single``, ``pred_avg``, ``rejected_avg`` (B,)."""
  wrong = {k: np.asarray(decision[f"pred_{k}"]) != labels for k in ("plain", "single", "avg")}
  return {"plain": wrong["plain"], "single": wrong["single"],
          "single_with_rejection": wrong["single"] & ~np.asarray(decision["rejected_single"]),
          "avg": wrong["avg"],
          "avg_with_rejection": wrong["avg"] & ~np.asarray(decision["rejected_avg"])}


def select(broken_jrb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The worst attack per example for one metric.

  Args:
    broken_jrb: (J, R, B) bool: attack ``j``, draw ``r``, example ``b`` broken.

  Returns:
    ``(winner, draws)``: (B,) int index of the attack with the highest success
    rate over the draws (first on ties), and (B, R) bool, its draws.
  """
  broken_jrb = np.asarray(broken_jrb, bool)
  if broken_jrb.ndim != 3 or 0 in broken_jrb.shape:
    raise ValueError(f"need a non-empty (attacks, draws, examples) array, got {broken_jrb.shape}")
  rate = broken_jrb.mean(axis=1)  # (J, B)
  winner = np.argmax(rate, axis=0)  # first maximum
  draws = broken_jrb[winner, :, np.arange(broken_jrb.shape[2])]  # (B, R)
  return winner, draws


def robust_accuracy(draws_br: np.ndarray) -> dict[str, float]:
  """Robust accuracy from the worst-case draws (B, R) of every example: mean
  over draws, its standard deviation over draws, and the min and max."""
  per_draw = 1.0 - np.asarray(draws_br, bool).mean(axis=0)  # (R,)
  return {"mean": float(per_draw.mean()), "std": float(per_draw.std()),
          "min": float(per_draw.min()), "max": float(per_draw.max())}
