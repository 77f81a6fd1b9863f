"""Confidence intervals of accuracies measured on a subset of the test images.

An accuracy over ``n`` test images is a binomial proportion; its 95% Wilson score
interval (Wilson 1927) says how far the number may be from the accuracy on the
whole distribution.  For the defense's accuracies averaged over independent
scoring draws of the masks, the interval is over the images only (the draws'
spread is reported beside it, as a standard deviation).
"""
from __future__ import annotations

import math

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
  """``(low, high)`` of the Wilson score interval of a proportion ``p`` in [0, 1]
  observed on ``n`` trials (default 95%); ``(0, 1)`` when ``n`` is 0."""
  if not -1e-9 <= p <= 1.0 + 1e-9:  # a mean of draws may round a hair past an end
    raise ValueError(f"a proportion must be in [0, 1], got {p}")
  p = min(max(p, 0.0), 1.0)
  if n <= 0:
    return (0.0, 1.0)
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  # At p = 0 (p = 1) the low (high) end is exactly 0 (1); rounding would move it.
  low = 0.0 if p == 0.0 else max(0.0, centre - half)
  high = 1.0 if p == 1.0 else min(1.0, centre + half)
  return low, high
