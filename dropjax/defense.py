"""The paper's test-time defense: mask averaging and entropy-based rejection.

* :func:`mask_average_probs`: softmax probabilities averaged over ``K`` masks at
  drop rate ``r`` (``vmap`` over ``K`` split keys, then a mean; one pass at r = 0).
* :func:`entropy`: predictive entropy (nats) of a probability vector.
* :func:`calibrate_threshold`: the entropy threshold on clean validation data at
  which accuracy -- **counting rejected inputs as errors**, as the paper does --
  is ``max_drop`` (default 1 percentage point) below a reference accuracy.  The
  paper's reference for the averaged defense is the accuracy when each example
  is run once (one mask, :data:`CALIBRATION_RULES` ``"single"``); the stricter
  ``"avg"`` rule takes the averaged prediction's own accuracy.  Inputs with
  entropy above the threshold are rejected.

An adversarial input that is rejected counts as a defense success.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dropjax import contracts, masks

Array = jax.Array


def masked_probs(key: Array, logits_fn: Callable, variables, x: Array,
                 drop: masks.DropSpec) -> Array:
  """Softmax of the model on one masked copy of ``x`` (B, H, W, C): (B, C) float32."""
  contracts.check_images(x, min_ndim=4)
  xm = masks.spec_drop(key, drop, x)
  return jax.nn.softmax(logits_fn(variables, xm).astype(jnp.float32), axis=-1)


def mask_average_probs(key: Array, logits_fn: Callable, variables, x: Array,
                       drop: masks.DropSpec, num_masks: int) -> Array:
  """Mean over ``num_masks`` keyed masks of the softmax probabilities.

  Args:
    key: PRNG key; mask ``k`` uses ``split(key, num_masks)[k]``.
    logits_fn: ``(variables, x) -> logits``.
    x: images (B, H, W, C) in [-1, 1].
    drop: how each copy is dropped (e.g. ``DropSpec.fixed(0.9)``).
    num_masks: K >= 1.

  Returns:
    Probabilities (B, C) float32; rows sum to 1.  When ``drop`` drops nothing
    (r = 0) every mask is the identity and the average is one pass of the model.
  """
  if num_masks < 1:
    raise ValueError(f"num_masks must be >= 1, got {num_masks}")
  contracts.check_images(x, min_ndim=4)
  if not drop.drops:
    return masked_probs(key, logits_fn, variables, x, drop)
  keys = jax.random.split(key, num_masks)
  probs = jax.vmap(lambda k: masked_probs(k, logits_fn, variables, x, drop))(keys)
  return jnp.mean(probs, axis=0)


def entropy(probs: Array) -> Array:
  """Entropy in nats of (..., C) probabilities -> (...)."""
  p = jnp.asarray(probs, jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


CALIBRATION_RULES = ("single", "avg")


def calibrate_threshold(entropies: np.ndarray, correct: np.ndarray,
                        max_drop: float = 0.01, reference: float | None = None) -> float:
  """Smallest entropy threshold keeping accuracy within ``max_drop`` of ``reference``.

  Accuracy with rejection is ``mean(correct & (entropy <= t))``: a rejected
  input counts as an error.  Returns the smallest ``t`` (most rejection) with
  that accuracy >= ``reference - max_drop``; ``inf`` (reject nothing) when even
  no rejection falls short of that target.

  Args:
    entropies: (N,) entropies of clean validation inputs.
    correct: (N,) bool, whether each prediction is right.
    max_drop: allowed accuracy loss (fraction, 0.01 = 1 point).
    reference: the accuracy the target is measured from (fraction); default
      ``mean(correct)``, the same predictions without rejection.  The paper's
      rule passes the single-mask accuracy for the averaged defense.
  """
  entropies = np.asarray(entropies, np.float64)
  correct = np.asarray(correct, bool)
  if entropies.shape != correct.shape or entropies.ndim != 1 or entropies.size == 0:
    raise ValueError(f"need matching non-empty 1-D arrays, got {entropies.shape} "
                     f"and {correct.shape}")
  if not 0 <= max_drop <= 1:
    raise ValueError(f"max_drop must be in [0, 1], got {max_drop}")
  n = entropies.size
  reference = correct.mean() if reference is None else float(reference)
  need = math.ceil((reference - max_drop) * n - 1e-9)  # correct inputs to keep
  if need <= 0:
    return -1.0  # entropies are >= 0: reject everything
  kept = np.sort(entropies[correct])
  if need > kept.size:
    return math.inf  # the target is above the accuracy without rejection
  return float(kept[need - 1])


def accuracy_with_rejection(pred: np.ndarray, labels: np.ndarray, rejected: np.ndarray) -> float:
  """Clean-data accuracy where a rejected input counts as an error."""
  return float(np.mean((pred == labels) & ~rejected))


def robust_accuracy_with_rejection(adv_pred: np.ndarray, labels: np.ndarray,
                                   rejected: np.ndarray) -> float:
  """Adversarial-data accuracy where a rejected input counts as a success."""
  return float(np.mean((adv_pred == labels) | rejected))
