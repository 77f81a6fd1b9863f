"""Per-example attack objectives, all to be *maximized* by the attacker.

``logits`` (B, C) float, ``labels`` (B,) int -> (B,) float32.

* untargeted (``labels`` = true class): cross-entropy of the true class, or the
  Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (> 0 iff misclassified);
* targeted (``labels`` = target class): minus the cross-entropy of the target,
  or ``z_t - max_{j != t} z_j`` (> 0 iff classified as the target).

The *rejection-aware* loss (:func:`rejection_aware`) is a function of the
defense's **mask-averaged probabilities** ``p̄`` (the attack differentiates
through the average, :func:`dropjax.attacks.pgd.make_pgd`): a margin on
``log p̄`` toward the most likely wrong class (or the target) minus
``entropy_weight`` times the entropy of ``p̄``, so the adversarial input is
misclassified *and* confident enough to pass the entropy threshold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dropjax.objectives import cross_entropy

Array = jax.Array
LOSSES = ("ce", "cw", "rejection")
AVERAGED_LOSSES = ("rejection",)  # defined on the mask-averaged probabilities


def margin(logits: Array, labels: Array) -> Array:
  """``z_label - max_{j != label} z_j`` per example."""
  logits = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  z_label = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return z_label - z_other


def rejection_aware(probs: Array, labels: Array, targeted: bool,
                    entropy_weight: float = 1.0) -> Array:
  """``(B, C)`` averaged probabilities -> ``(B,)`` to maximize.

  Untargeted (``labels`` = true class): ``log p̄_j - log p̄_y - w H(p̄)`` with
  ``j`` the most likely other class; targeted (``labels`` = target):
  ``log p̄_t - max_{j != t} log p̄_j - w H(p̄)``.  ``H`` in nats.
  """
  logp = jnp.log(jnp.clip(probs.astype(jnp.float32), 1e-30, 1.0))
  m = margin(logp, labels)  # log p_label - max_{j != label} log p_j
  h = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)
  return (m if targeted else -m) - entropy_weight * h


def attack_objective(name: str, targeted: bool, entropy_weight: float = 1.0):
  """Returns ``objective(logits, labels) -> (B,)`` to maximize (for the
  rejection-aware loss: of one pass's softmax; the attacks apply it to the
  mask average)."""
  if name not in LOSSES:
    raise ValueError(f"unknown attack loss {name!r}; choose one of {LOSSES}")
  if name == "rejection":
    return lambda z, t: rejection_aware(jax.nn.softmax(z.astype(jnp.float32), -1), t,
                                        targeted, entropy_weight)
  if name == "ce":
    return (lambda z, t: -cross_entropy(z, t)) if targeted else cross_entropy
  return margin if targeted else (lambda z, y: -margin(z, y))
