"""Certified L0 robustness by randomized ablation (Levine & Feizi, AAAI 2020).

The base classifier ``f`` sees an *ablated* image: exactly ``k`` of its
``d = H * W`` pixels, chosen uniformly without replacement (all channels of a
kept pixel kept; :func:`dropjax.masks.ablate`).  It is called as
``logits_fn(variables, x * M, M)`` with the one-channel keep-mask ``M``: a
model trained with Levine & Feizi's doubled encoding shows ablated pixels as
``[0, 0]`` (:func:`dropjax.models.encode_doubled`), one trained with their mean
encoding as the training set's mean (:func:`dropjax.models.encode_mean`); a
pixel-dropping model of
the paper (values encoding) sees them as 0, its own dropped value -- the
paper-model variant (zero fill), certified by exactly the same bound.  The smoothed classifier is
``g(x) = argmax_c P(f(ablate(x)) = c)``.  If an attacker changes at most ``ρ``
pixels, a random k-subset avoids all of them with probability
``C(d - ρ, k) / C(d, k)``, so every class probability moves by at most

    Δ(ρ) = 1 - C(d - ρ, k) / C(d, k)                        (Levine & Feizi, Thm. 1)

and ``g`` provably keeps its prediction ``c_A`` when ``p_A - Δ(ρ) > 1/2``
(then ``p_A - Δ > p_B + Δ`` for every other class, since ``p_B <= 1 - p_A``).

Certification of one input (:func:`make_certify`, as the reference
implementation): ``n0`` samples pick the top class ``c_A``; ``n`` further
samples count its votes ``n_A``; ``p_A`` is bounded below by the one-sided
Clopper–Pearson bound at confidence ``1 - α`` (:func:`clopper_pearson_lower`);
the certified radius is the largest ``ρ`` with ``p_A_lower - Δ(ρ) > 1/2``
(:func:`certified_radius`).  If even ``ρ = 0`` fails (``p_A_lower <= 1/2``)
the smoothed classifier abstains (radius -1).  Defaults as the reference:
``n0 = 1,000``, ``n = 10,000``, ``α = 0.05``; ``k = 75`` for CIFAR-10.
A prediction that is wrong is not counted as certified (:func:`summarize`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dropjax import contracts, masks

Array = jax.Array


# --- the bound -------------------------------------------------------------


def log_binom(n: int, k: int) -> float:
  """``log C(n, k)`` (``-inf`` for ``k > n``)."""
  if k < 0 or k > n:
    return -math.inf
  return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def delta(rho: int, d: int, k: int) -> float:
  """``Δ(ρ) = 1 - C(d - ρ, k) / C(d, k)``, in log space (exact to float64)."""
  if not 0 <= k <= d:
    raise ValueError(f"need 0 <= k <= d, got k={k}, d={d}")
  if rho < 0:
    raise ValueError(f"rho must be >= 0, got {rho}")
  if rho > d - k:
    return 1.0
  return -math.expm1(log_binom(d - rho, k) - log_binom(d, k))


def certified_radius(p_lower: float, d: int, k: int) -> int:
  """Largest ``ρ`` with ``p_lower - Δ(ρ) > 1/2``; -1 when none (abstain).

  ``Δ`` grows with ``ρ``, so this is a binary search over ``[0, d - k]``.
  """
  if not p_lower - delta(0, d, k) > 0.5:
    return -1
  lo, hi = 0, d - k  # invariant: lo certifies; find the largest
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if p_lower - delta(mid, d, k) > 0.5:
      lo = mid
    else:
      hi = mid - 1
  return lo


def _log_binom_coefficients(s: int, n: int) -> np.ndarray:
  """``log C(n, i)`` for ``i = s .. n`` (float64, by the ratio recursion)."""
  i = np.arange(s, n, dtype=np.float64)
  steps = np.log(n - i) - np.log(i + 1)  # log C(n, i+1) - log C(n, i)
  return log_binom(n, s) + np.concatenate([[0.0], np.cumsum(steps)])


def _log_binom_tail(log_coef: np.ndarray, s: int, n: int, p: float) -> float:
  """``log P(X >= s)`` for ``X ~ Binomial(n, p)``, summed in log space."""
  i = np.arange(s, n + 1, dtype=np.float64)
  logs = log_coef + i * math.log(p) + (n - i) * math.log1p(-p)
  top = logs.max()
  return float(top + math.log(np.exp(logs - top).sum()))


def clopper_pearson_lower(successes: int, n: int, alpha: float) -> float:
  """One-sided lower Clopper–Pearson bound on a binomial proportion.

  The ``p`` at which ``P(X >= successes | n, p) = alpha``, i.e. the ``alpha``
  quantile of ``Beta(successes, n - successes + 1)``; 0 for no successes and
  ``alpha ** (1 / n)`` when every trial succeeded.  Bisection (float64).
  """
  if not 0 <= successes <= n or n < 1:
    raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes}, {n}")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  if successes == 0:
    return 0.0
  if successes == n:
    return alpha ** (1.0 / n)
  log_coef = _log_binom_coefficients(successes, n)
  lo, hi, target = 0.0, successes / n, math.log(alpha)
  for _ in range(60):  # the tail grows with p: find where it crosses alpha
    mid = 0.5 * (lo + hi)
    if _log_binom_tail(log_coef, successes, n, mid) < target:
      lo = mid
    else:
      hi = mid
  return lo


# --- sampling on the device -------------------------------------------------


def _f(default, help_text: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help_text, **kw})


@dataclasses.dataclass(frozen=True)
class CertifyConfig:
  """Randomized-ablation certification.

  Attributes:
    keep: ``k``, pixels each sample keeps (of ``d = H * W``).
    n0: samples that pick the top class.
    n: samples that bound its probability.
    alpha: the certificate holds with probability at least ``1 - alpha``.
    samples_per_pass: samples per image evaluated in one compiled call (memory).
  """
  keep: int = _f(75, "k: pixels kept per sample, of d = H*W (Levine & Feizi, CIFAR-10: 75)")
  n0: int = _f(1000, "samples per image that select the top class")
  n: int = _f(10_000, "samples per image that bound its probability")
  alpha: float = _f(0.05, "the certificate holds with probability >= 1 - alpha")
  samples_per_pass: int = _f(100, "samples per image in one compiled call (memory)")

  def validate(self) -> "CertifyConfig":
    if self.keep is not None and self.keep < 1:
      raise ValueError(f"keep must be >= 1, got {self.keep}")
    if self.n0 < 1 or self.n < 1 or self.samples_per_pass < 1:
      raise ValueError("n0, n and samples_per_pass must be >= 1")
    if not 0 < self.alpha < 1:
      raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
    return self


def make_vote_counter(logits_fn: Callable, config: CertifyConfig) -> Callable:
  """``count(key, variables, x, num, index=None) -> (B, C) int32``: votes of
  ``num`` ablated samples per image, rounded up to whole passes of
  ``samples_per_pass`` (each pass one compiled call on ``samples_per_pass x B``
  images).

  Sample ``j`` of image ``i`` in pass ``p`` uses ``fold_in(fold_in(key, p), i)``
  split into the pass's samples, so votes do not depend on the batch size.
  """
  s = config.samples_per_pass

  @jax.jit
  def one_pass(key, variables, x, index):
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), s))(index)
    xs, ms = jax.vmap(lambda ks, xi: jax.vmap(
        lambda kk: masks.ablate(kk, xi, config.keep))(ks))(keys, x)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    logits = logits_fn(variables, flat(xs), flat(ms))
    votes = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.int32)
    return votes.reshape(x.shape[0], s, -1).sum(1)

  def count(key, variables, x, num: int, index=None):
    index = jnp.arange(x.shape[0]) if index is None else jnp.asarray(index)
    total = 0
    for p in range(-(-num // s)):  # each pass is one compiled call: s samples x B images
      total = total + one_pass(jax.random.fold_in(key, p), variables, x, index)
    return total

  return count


def make_certify(logits_fn: Callable, config: CertifyConfig) -> Callable:
  """Builds ``certify(key, variables, x, index=None) -> dict`` of per-image arrays.

  ``logits_fn(variables, x_ablated, keep) -> (N, C) logits`` is the base
  classifier (``keep``: (N, H, W, 1) 0/1; see the module docstring).
  ``x`` float (B, H, W, C) in [-1, 1]; ``index`` (B,) ints, the examples'
  positions in the dataset (each one's randomness is ``fold_in(key, index)``).
  Returns ``prediction`` (B,) int
  (``c_A``, or -1 when abstaining), ``p_lower`` (B,) float64, ``radius`` (B,)
  int (-1: abstain), ``votes_top`` and ``votes_n`` (B,) int.  ``n0`` and ``n``
  are rounded up to whole passes of ``samples_per_pass`` samples.
  """
  config.validate()
  count = make_vote_counter(logits_fn, config)

  def certify(key, variables, x, index=None) -> dict:
    contracts.check_images(x, min_ndim=4)
    d = x.shape[1] * x.shape[2]
    if config.keep > d:
      raise ValueError(f"keep={config.keep} exceeds the {d} pixels of a {x.shape[1:3]} image")
    k_select, k_estimate = jax.random.split(key)
    c_a = np.asarray(jnp.argmax(count(k_select, variables, x, config.n0, index), -1))
    votes = np.asarray(count(k_estimate, variables, x, config.n, index))
    n = int(votes[0].sum())
    n_a = votes[np.arange(len(c_a)), c_a]
    p_lower = np.array([clopper_pearson_lower(int(v), n, config.alpha) for v in n_a])
    radius = np.array([certified_radius(p, d, config.keep) for p in p_lower])
    return {"prediction": np.where(radius >= 0, c_a, -1), "p_lower": p_lower,
            "radius": radius, "votes_top": n_a, "votes_n": np.full(len(c_a), n)}

  return certify


def summarize(rows: list[dict], radii=(0, 1, 2, 5, 10)) -> dict:
  """Certified accuracy at each radius (correct and certified at >= ρ) and the
  median certified radius over all examples (wrong or abstained count as -1)."""
  if not rows:
    raise ValueError("no rows to summarize")
  r = np.array([row["radius"] if row["correct"] else -1 for row in rows])
  out = {"num_examples": len(rows),
         "abstain_rate": float(np.mean([row["abstained"] for row in rows])),
         "clean_accuracy_smoothed": float(np.mean([row["correct"] for row in rows])),
         "median_radius": float(np.median(r))}
  for rho in radii:
    out[f"certified_accuracy_r{rho}"] = float(np.mean(r >= rho))
  return out
