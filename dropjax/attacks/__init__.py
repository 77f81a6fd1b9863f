"""Gradient attacks with EOT over pixel-drop masks: PGD (L0, L2, L-inf) and APGD (L2, L-inf)."""
from dropjax.attacks.apgd import APGDConfig, make_apgd
from dropjax.attacks.pgd import AttackConfig, best_of, eot_gradient, make_pgd
from dropjax.attacks.presets import PAPER_BUDGETS, paper_attack

__all__ = ["APGDConfig", "AttackConfig", "best_of", "eot_gradient", "make_apgd", "make_pgd",
           "PAPER_BUDGETS", "paper_attack"]
