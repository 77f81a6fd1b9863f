"""How the paper's perturbation budgets are read: the units of ε and step sizes.

The paper defines images X ∈ [−1, 1] and states its budgets (L∞: ε = 16/255 for
CIFAR-10, 32/255 for GTSRB; L2: ε = 1 and 512/255; the auxiliary noise
ε = 16/255) and step sizes without any rescaling.  Two readings:

* ``"literal"`` (the default): the numbers are in the units of X.  CIFAR-10's
  then equal the field's standard budgets on the [0, 1] pixel scale (L∞ 8/255,
  L2 0.5): a value of X moves by 16/255, an 8-bit pixel by 8 levels.
* ``"doubled"``: the numbers are on the [0, 1] pixel scale and are doubled in
  X units (twice the literal budget); dropjax's reading before 2026-12-02.

L0 budgets are counts (pixels or values) and read the same either way.  Every
evaluation row and summary carries the reading and the budget in both units
(:func:`both_scales`).
"""
from __future__ import annotations

BUDGET_READINGS = ("literal", "doubled")
_X_UNITS_PER_STATED = {"literal": 1.0, "doubled": 2.0}


def check_reading(reading: str) -> str:
  if reading not in BUDGET_READINGS:
    raise ValueError(f"unknown budget reading {reading!r}; choose one of {BUDGET_READINGS}")
  return reading


def to_x_units(value: float, reading: str) -> float:
  """A stated budget or step size in units of X ∈ [−1, 1]."""
  return _X_UNITS_PER_STATED[check_reading(reading)] * value


def both_scales(value_x: float) -> dict[str, float]:
  """A budget in X units and on the [0, 1] pixel scale (half of it)."""
  return {"x_units": value_x, "pixel01": value_x / 2.0}
