"""Per-example attack objectives, all to be *maximized* by the attacker.

``logits`` (B, C) float, ``labels`` (B,) int -> (B,) float32.

* untargeted (``labels`` = true class): cross-entropy of the true class, or the
  Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (> 0 iff misclassified);
* targeted (``labels`` = target class): minus the cross-entropy of the target,
  or ``z_t - max_{j != t} z_j`` (> 0 iff classified as the target).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dropjax.objectives import cross_entropy

Array = jax.Array
LOSSES = ("ce", "cw")


def margin(logits: Array, labels: Array) -> Array:
  """``z_label - max_{j != label} z_j`` per example."""
  logits = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  z_label = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return z_label - z_other


def attack_objective(name: str, targeted: bool):
  """Returns ``objective(logits, labels) -> (B,)`` to maximize."""
  if name not in LOSSES:
    raise ValueError(f"unknown attack loss {name!r}; choose one of {LOSSES}")
  if name == "ce":
    return (lambda z, t: -cross_entropy(z, t)) if targeted else cross_entropy
  return margin if targeted else (lambda z, y: -margin(z, y))
