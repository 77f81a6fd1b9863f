"""The paper's attack budgets, as the paper states them (units: :mod:`dropjax.units`;
read literally, in units of X ∈ [-1, 1], by default).

| dataset | L-inf eps (step) | L2 eps (step)      | L0 budget (step) |
|---------|------------------|--------------------|------------------|
| GTSRB   | 32/255 (4/255)   | 512/255 (32/255)   | 0.03·D (1)       |
| CIFAR-10| 16/255 (2/255)   | 1.0 (16/255)       | 0.03·D (1)       |
"""
from __future__ import annotations

from dropjax.attacks.pgd import AttackConfig

PAPER_BUDGETS = {
    "gtsrb": {"linf": dict(eps=32 / 255, step_size=4 / 255),
              "l2": dict(eps=512 / 255, step_size=32 / 255),
              "l0": dict(eps=0.0, l0_fraction=0.03, step_size=1.0)},
    "cifar10": {"linf": dict(eps=16 / 255, step_size=2 / 255),
                "l2": dict(eps=1.0, step_size=16 / 255),
                "l0": dict(eps=0.0, l0_fraction=0.03, step_size=1.0)},
}


def paper_attack(dataset: str, norm: str, **overrides) -> AttackConfig:
  """The paper's budget for ``dataset`` and ``norm``, with ``overrides``."""
  if dataset not in PAPER_BUDGETS:
    raise ValueError(f"no attack preset for dataset {dataset!r}; choose {sorted(PAPER_BUDGETS)}")
  if norm not in PAPER_BUDGETS[dataset]:
    raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(PAPER_BUDGETS[dataset])}")
  return AttackConfig(norm=norm, **{**PAPER_BUDGETS[dataset][norm], **overrides}).validate()
