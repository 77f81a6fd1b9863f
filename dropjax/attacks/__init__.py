"""Attacks on the pixel-dropping defense: PGD (L0, L2, L-inf) and APGD (L2, L-inf) with
EOT over masks, and the black-box Sparse-RS (L0) against the defended decision."""
from dropjax.attacks.apgd import APGDConfig, make_apgd
from dropjax.attacks.pgd import AttackConfig, best_of, eot_gradient, make_pgd
from dropjax.attacks.presets import PAPER_BUDGETS, paper_attack
from dropjax.attacks.sparse_rs import SparseRSConfig, make_sparse_rs

__all__ = ["APGDConfig", "AttackConfig", "best_of", "eot_gradient", "make_apgd", "make_pgd",
           "make_sparse_rs", "PAPER_BUDGETS", "paper_attack", "SparseRSConfig"]
