"""Sparse-RS, pixel version (Croce, Andriushchenko, Singh, Flammarion & Hein,
AAAI 2022): a black-box L0 attack by random search, against the defended decision.

The attacker changes a set of ``k`` pixels, each set to a vertex of the colour
cube (every channel at -1 or 1 in the units of X).  It starts from a random set
with random vertices; at query ``i`` it proposes to move ``max(int(α(i) k), 1)``
of the set's pixels to random pixels outside the set, with new random
vertices, and keeps the proposal when the loss improves.  ``α(i)`` follows the
authors' schedule (:func:`alpha_schedule`): ``α_init`` halved, quartered, ...
at fixed fractions of the query budget.

It sees only the defense's output: the probabilities averaged over
``num_masks`` masks (:func:`dropjax.defense.mask_average_probs`), fresh masks
at every query, as a user of the randomized defense would.  No gradients, so
it exposes gradient masking.  The loss (maximized) is the rejection-aware loss
of the averaged probabilities (:func:`dropjax.attacks.losses.rejection_aware`;
``entropy_weight = 0`` is the plain log-probability margin).

Against a randomized defense the loss of a pixel set is a random variable, and
how a proposal is judged matters (``comparison``):

* ``"fresh"`` (the authors' rule, written for deterministic models): the
  proposal's loss under new masks against the best loss seen so far.  The kept
  value is the luckiest draw of the sets accepted, so true improvements smaller
  than the masks' noise are rarely accepted (a winner's curse).
* ``"paired"``: at every query the current set and the proposal are scored under
  the *same* masks (common random numbers) and the proposal is kept when it
  scores higher there; the masks' noise largely cancels in the difference.  Each
  query then costs two evaluations of the defense: ``num_queries`` / 2 paired
  queries cost what ``num_queries`` fresh ones do.  At that equal cost it is
  far stronger against the pixel-dropping defense
  (``experiments/sparse_rs_paired.sh``, RESULTS.md).

Either rule can also average ``draws`` independent evaluations of the defense
into each loss it compares (:func:`defended_loss`): the estimate of the
defense's expected loss then spreads ``sqrt(draws)`` times less, at ``draws``
times the cost per query -- the other way, beside more queries, to spend more
on the search (``experiments/sparse_rs_paired.sh`` with ``QUERIES`` / ``DRAWS``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from dropjax import contracts, defense, masks
from dropjax.attacks import losses
from dropjax.attacks.pgd import random_targets

Array = jax.Array

# The authors' schedule for a budget of 10,000 queries: after query t (scaled to
# that budget) the fraction α_init is divided by the factor of its interval.
_SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SCHEDULE_DIVISORS = (1, 2, 4, 5, 6, 8, 10, 12, 15, 20)
COMPARISONS = ("fresh", "paired")


def alpha_schedule(query: int | Array, num_queries: int, alpha_init: float) -> Array:
  """``α`` at ``query`` (0-based) for a budget of ``num_queries``."""
  t = jnp.asarray(query, jnp.float32) / num_queries * 10_000
  interval = jnp.sum(t > jnp.asarray(_SCHEDULE_BOUNDS, jnp.float32))
  return alpha_init / jnp.asarray(_SCHEDULE_DIVISORS, jnp.float32)[interval]


@dataclasses.dataclass(frozen=True)
class SparseRSConfig:
  """One Sparse-RS attack.

  Attributes:
    l0_fraction: the budget ``k`` as a fraction of the ``H * W`` pixels
      (paper: 0.03); ``pixels`` overrides it when set.
    pixels: the budget ``k`` in pixels.
    num_queries: queries of the defended decision per image.
    alpha_init: initial fraction of the set resampled per query.
    targeted: maximize toward a target class instead of away from the label.
    num_masks / drop: the defense queried (mask average of ``num_masks`` masks).
    entropy_weight: weight of the entropy term of the loss (0: margin only).
    comparison: how a proposal is judged, one of :data:`COMPARISONS` (module
      docstring): "fresh" (the authors' rule) or "paired" (current set and
      proposal under the same masks; two defense evaluations per query).
    draws: independent evaluations of the defense averaged into each loss
      (:func:`defended_loss`; 1: the authors' single evaluation).
  """
  l0_fraction: float = 0.03
  pixels: int | None = None
  num_queries: int = 1000
  alpha_init: float = 0.3
  targeted: bool = False
  num_masks: int = 10
  drop: masks.DropSpec = masks.DropSpec()
  entropy_weight: float = 0.0
  comparison: str = "fresh"
  draws: int = 1

  def validate(self) -> "SparseRSConfig":
    if self.pixels is None and not 0 <= self.l0_fraction <= 1:
      raise ValueError(f"l0_fraction must be in [0, 1], got {self.l0_fraction}")
    if self.pixels is not None and self.pixels < 0:
      raise ValueError(f"pixels must be >= 0, got {self.pixels}")
    if self.num_queries < 1 or self.num_masks < 1 or self.draws < 1:
      raise ValueError("num_queries, num_masks and draws must be >= 1")
    if not 0 < self.alpha_init <= 1:
      raise ValueError(f"alpha_init must be in (0, 1], got {self.alpha_init}")
    if self.comparison not in COMPARISONS:
      raise ValueError(f"unknown comparison {self.comparison!r}; choose one of {COMPARISONS}")
    return self

  def budget(self, h: int, w: int) -> int:
    return int(self.pixels) if self.pixels is not None else int(self.l0_fraction * h * w)

  def replace(self, **kw) -> "SparseRSConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_steps(self) -> int:  # for loop-unroll choices, like the other attacks
    return self.num_queries


def defended_loss(key: Array, logits_fn: Callable, variables, x: Array, labels: Array,
                  config: SparseRSConfig) -> Array:
  """The loss Sparse-RS maximizes, per example: the rejection-aware loss of the
  defense's probabilities (the average over ``config.num_masks`` masks),
  averaged over ``config.draws`` independent evaluations of the defense.

  Args:
    key: PRNG key; with one draw the defense's masks come from ``key`` itself,
      with ``d > 1`` draw ``j`` uses ``split(key, d)[j]``.
    x: images (B, H, W, C) in [-1, 1].
    labels: (B,) int, the true classes (untargeted) or the targets (targeted).

  Returns:
    (B,) float32, in nats (log-probability margin, plus the weighted entropy).
  """
  def one(draw_key):
    p = defense.mask_average_probs(draw_key, logits_fn, variables, x, config.drop,
                                   config.num_masks)
    return losses.rejection_aware(p, labels, config.targeted, config.entropy_weight)

  if config.draws == 1:
    return one(key)
  return jnp.mean(jax.lax.map(one, jax.random.split(key, config.draws)), axis=0)


def make_sparse_rs(logits_fn: Callable, config: SparseRSConfig, *,
                   unroll: int | bool = 1) -> Callable:
  """Builds ``attack(key, variables, x, y, target=None) -> x_adv``.

  ``x`` (B, H, W, C) in [-1, 1]; the output differs from ``x`` in at most
  ``k`` pixels and lies in [-1, 1].  Query ``i`` uses ``fold_in(key, i)``: the
  proposal it draws is the same for either ``comparison``, and without masks
  (a deterministic defense) both comparisons take the same decisions.
  """
  config.validate()
  del unroll  # a query is one forward pass of the defense: nothing to gain

  def attack(key, variables, x, y, target=None):
    contracts.check_images(x, min_ndim=4)
    b, h, w, c = x.shape
    num_classes = jax.eval_shape(logits_fn, variables, x).shape[-1]
    contracts.check_labels(y, num_classes, batch=b)
    if config.targeted and target is None:
      target = random_targets(jax.random.fold_in(key, -1), y, num_classes)
    labels = target if config.targeted else y
    d, k = h * w, min(config.budget(h, w), h * w)
    x0 = x.astype(jnp.float32)
    if k == 0:
      return x
    if 2 * k > d:
      raise ValueError(f"Sparse-RS needs k <= H*W/2 pixels to resample from, got k={k} of {d}")
    flat0 = x0.reshape(b, d, c)

    def apply(idx, vals):
      return jax.vmap(lambda f, i, v: f.at[i].set(v))(flat0, idx, vals).reshape(x0.shape)

    def loss(qkey, xx):
      return defended_loss(qkey, logits_fn, variables, xx, labels, config)

    def vertices(vkey, shape):
      return jax.random.rademacher(vkey, shape, dtype=jnp.float32)

    k_init, k_vals, k_query = jax.random.split(key, 3)
    _, idx0 = jax.lax.top_k(jax.random.uniform(k_init, (b, d)), k)
    vals0 = vertices(k_vals, (b, k, c))
    best0 = loss(jax.random.fold_in(k_query, config.num_queries), apply(idx0, vals0))

    def body(i, s):
      idx, vals, best = s
      qk = jax.random.fold_in(k_query, i)
      k_pos, k_new, k_v, k_eval = jax.random.split(qk, 4)
      m = jnp.maximum((alpha_schedule(i, config.num_queries, config.alpha_init) * k)
                      .astype(jnp.int32), 1)
      # Which of the k set positions move: the m with the lowest random scores.
      rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_pos, (b, k)), axis=1), axis=1)
      moving = rank < m  # (B, k)
      # New pixels: distinct, outside the current set; the r-th moving position
      # takes the r-th candidate.
      scores = jax.random.uniform(k_new, (b, d))
      scores = jax.vmap(lambda sc, ii: sc.at[ii].set(-1.0))(scores, idx)
      _, cand = jax.lax.top_k(scores, k)
      new_idx = jnp.where(moving, jnp.take_along_axis(cand, rank, axis=1), idx)
      new_vals = jnp.where(moving[..., None], vertices(k_v, (b, k, c)), vals)
      f = loss(k_eval, apply(new_idx, new_vals))
      if config.comparison == "paired":  # the current set under the proposal's masks
        best = loss(k_eval, apply(idx, vals))
      better = f > best
      return (jnp.where(better[:, None], new_idx, idx),
              jnp.where(better[:, None, None], new_vals, vals), jnp.where(better, f, best))

    idx, vals, _ = jax.lax.fori_loop(0, config.num_queries, body, (idx0, vals0, best0))
    return apply(idx, vals).astype(x.dtype)

  return attack
