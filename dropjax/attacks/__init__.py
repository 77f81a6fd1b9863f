"""Projected gradient attacks (L0, L2, L-inf) with EOT over pixel-drop masks."""
from dropjax.attacks.pgd import AttackConfig, best_of, eot_gradient, make_pgd
from dropjax.attacks.presets import PAPER_BUDGETS, paper_attack

__all__ = ["AttackConfig", "best_of", "eot_gradient", "make_pgd", "PAPER_BUDGETS",
           "paper_attack"]
