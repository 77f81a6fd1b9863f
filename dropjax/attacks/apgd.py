"""APGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020), with EOT over masks.

``make_apgd(logits_fn, config)`` returns a pure
``attack(key, variables, x, y, target=None) -> x_adv``: a random start and
``num_steps`` iterations in one ``lax.fori_loop``.  Per example:

* step size ``η⁽⁰⁾ = 2ε``; the first step is a plain (sign / normalized)
  gradient step, then every step is ``z = P(x⁽ᵏ⁾ + η s(∇f(x⁽ᵏ⁾)))`` and
  ``x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α (z - x⁽ᵏ⁾) + (1 - α)(x⁽ᵏ⁾ - x⁽ᵏ⁻¹⁾))``, momentum
  ``α = 0.75``;
* checkpoints (:func:`checkpoints`): the first after 22% of the iterations,
  then intervals shrinking by 3% of the iterations to a minimum of 6% (the
  authors' integer arithmetic: ``max(int(0.22 N), 1)`` and so on);
* at a checkpoint the step size is halved and the iterate restarts from the
  best point so far when (1) the loss increased in at most ``ρ = 0.75`` of the
  interval's steps, or (2) the step size was not halved at the previous
  checkpoint and the best loss has not improved since (as in the authors' code,
  condition (2) is not applied at the first checkpoint: there is no previous one);
* the output is, as in the authors' code, the last iterate at which the model
  (the mask-averaged probabilities under EOT) misclassified the example (for
  targeted attacks: predicted the target), else the point with the highest loss;
* the start is the authors' random point: ``x + ε t / max|t|``,
  ``t ~ U[-1, 1]`` (L-inf) or ``x + ε t / ||t||``, ``t ~ N(0, 1)`` (L2), clipped
  to the box.

Losses (to maximize): ``ce`` (cross-entropy) and ``dlr`` (the difference of
logits ratio), untargeted ``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3)`` and
targeted ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)``.  With a drop spec that
drops pixels, loss and gradient are the means over ``eot_samples`` masks
(:func:`dropjax.masks.spec_mask`), fresh at every iteration.

Units as :mod:`dropjax.attacks.pgd` (``budget_reading``, :mod:`dropjax.units`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dropjax import contracts, masks, units
from dropjax.attacks import norms
from dropjax.attacks.pgd import random_targets
from dropjax.objectives import cross_entropy

Array = jax.Array
APGD_LOSSES = ("ce", "dlr")
APGD_NORMS = ("linf", "l2")


@dataclasses.dataclass(frozen=True)
class APGDConfig:
  """One APGD attack (defaults: the published schedule)."""
  norm: str = "linf"
  eps: float = 16 / 255
  num_steps: int = 100
  loss: str = "ce"
  targeted: bool = False
  eot_samples: int = 10
  drop: masks.DropSpec = masks.DropSpec()
  budget_reading: str = "literal"
  initial_step: float = 2.0        # η⁽⁰⁾ in multiples of ε
  momentum: float = 0.75           # α
  rho: float = 0.75                # checkpoint condition (1)
  first_checkpoint: float = 0.22   # fraction of the iterations
  interval_decrease: float = 0.03
  min_interval: float = 0.06

  def validate(self) -> "APGDConfig":
    if self.norm not in APGD_NORMS:
      raise ValueError(f"APGD supports {APGD_NORMS}, got {self.norm!r}")
    if self.loss not in APGD_LOSSES:
      raise ValueError(f"unknown APGD loss {self.loss!r}; choose one of {APGD_LOSSES}")
    if not self.eps >= 0 or int(self.num_steps) != self.num_steps or self.num_steps < 1:
      raise ValueError(f"need eps >= 0 and an integer num_steps >= 1, got {self.eps}, "
                       f"{self.num_steps}")
    if self.eot_samples < 0:
      raise ValueError(f"eot_samples must be >= 0, got {self.eot_samples}")
    if not 0 < self.momentum <= 1 or not 0 < self.rho <= 1:
      raise ValueError("momentum and rho must be in (0, 1]")
    units.check_reading(self.budget_reading)
    return self

  def replace(self, **kw) -> "APGDConfig":
    return dataclasses.replace(self, **kw)

  @property
  def uses_eot(self) -> bool:
    return self.eot_samples > 0 and self.drop.drops


def checkpoints(num_steps: int, first: float = 0.22, decrease: float = 0.03,
                minimum: float = 0.06) -> list[int]:
  """Iterations (0-based) after which the checkpoint conditions are checked.

  Intervals: ``max(int(first N), 1)``, then each ``decrease`` shorter
  (``max(int(decrease N), 1)``) down to ``max(int(minimum N), 1)``.  For
  N = 100: intervals 22, 19, 16, 13, 10, 7, 6, 6, ... -> checks after
  iterations 21, 40, 56, 69, 79, 86, 92, 98.
  """
  length = max(int(first * num_steps), 1)
  step, low = max(int(decrease * num_steps), 1), max(int(minimum * num_steps), 1)
  out, at = [], length
  while at <= num_steps:
    out.append(at - 1)
    length = max(length - step, low)
    at += length
  return out


def dlr(logits: Array, labels: Array, target: Array | None = None) -> Array:
  """The DLR loss to maximize, per example (B,); ``target`` for the targeted form."""
  z = logits.astype(jnp.float32)
  zs = jnp.sort(z, axis=-1)
  z_y = jnp.take_along_axis(z, labels[:, None], -1)[:, 0]
  if target is None:
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, z), -1)
    return -(z_y - z_other) / (zs[:, -1] - zs[:, -3] + 1e-12)
  z_t = jnp.take_along_axis(z, target[:, None], -1)[:, 0]
  return -(z_y - z_t) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def apgd_objective(name: str, targeted: bool) -> Callable:
  """``objective(logits, y, target) -> (B,)`` to maximize."""
  if name == "ce":
    return (lambda z, y, t: -cross_entropy(z, t)) if targeted else (
        lambda z, y, t: cross_entropy(z, y))
  if name == "dlr":
    return (lambda z, y, t: dlr(z, y, t)) if targeted else (lambda z, y, t: dlr(z, y))
  raise ValueError(f"unknown APGD loss {name!r}; choose one of {APGD_LOSSES}")


def make_apgd(logits_fn: Callable, config: APGDConfig, *, unroll: int | bool = 1,
              trace: bool = False) -> Callable:
  """Builds ``attack(key, variables, x, y, target=None) -> x_adv``.

  ``x`` float (B, H, W, C) in [-1, 1], ``y`` (B,) int; for targeted attacks
  ``target`` (B,) (default: a random wrong class from ``key``).  Returns the
  last successful iterate (else the highest-loss point), within the budget and
  in [-1, 1].  With
  ``trace=True`` it returns ``(x_adv, history)``: ``history["eta"]`` (the step
  size in units of X), ``["loss"]`` (the loss at the iterate) and
  ``["loss_best"]``, each (num_steps, B), after every iteration.
  """
  config.validate()
  objective_fn = apgd_objective(config.loss, config.targeted)
  eps = units.to_x_units(config.eps, config.budget_reading)
  n = int(config.num_steps)
  check = np.zeros(n, bool)
  check[checkpoints(n, config.first_checkpoint, config.interval_decrease,
                    config.min_interval)] = True
  lengths = np.zeros(n, np.float32)  # interval length ending at each checkpoint
  prev = -1
  for i in np.flatnonzero(check):
    lengths[i], prev = i - prev, i
  check, lengths = jnp.asarray(check), jnp.asarray(lengths)

  def attack(key, variables, x, y, target=None):
    contracts.check_images(x, min_ndim=4)
    num_classes = jax.eval_shape(logits_fn, variables, x).shape[-1]
    contracts.check_labels(y, num_classes, batch=x.shape[0])
    if config.targeted and target is None:
      target = random_targets(jax.random.fold_in(key, 1), y, num_classes)
    t = y if target is None else target
    x0 = x.astype(jnp.float32)
    b = x.shape[0]
    k_start, k_steps = jax.random.split(key)

    def value_and_grad(k, xx):
      """Per-example loss (B,), its gradient and whether the attack succeeds
      there (B,) bool, EOT means over masks."""
      def one(m):
        def total(v):
          z = logits_fn(variables, v * m if m is not None else v)
          f = objective_fn(z, y, t)
          return jnp.sum(f), (f, jax.nn.softmax(z.astype(jnp.float32), -1))
        (_, (f, p)), g = jax.value_and_grad(total, has_aux=True)(xx)
        return f, g, p
      if not config.uses_eot:
        f, g, p = one(None)
      else:
        keys = jax.random.split(k, config.eot_samples)
        f, g, p = jax.vmap(lambda kk: one(masks.spec_mask(kk, config.drop, xx.shape,
                                                          xx.dtype)))(keys)
        f, g, p = f.mean(0), g.mean(0), p.mean(0)
      pred = jnp.argmax(p, -1)
      return f, g, (pred == t) if config.targeted else (pred != y)

    def direction(g):
      return jnp.sign(g) if config.norm == "linf" else g / (norms.l2_norm(g) + 1e-12)

    def project(v):
      return (norms.linf_project(v, x0, eps) if config.norm == "linf"
              else norms.l2_project(v, x0, eps))

    def per_ex(a):
      return a.reshape((b,) + (1,) * (x.ndim - 1))

    if config.norm == "linf":
      u = jax.random.uniform(k_start, x0.shape, minval=-1.0, maxval=1.0)
      u = u / jnp.max(jnp.abs(u).reshape(b, -1), 1).reshape(per_ex(jnp.ones(b)).shape)
    else:
      u = jax.random.normal(k_start, x0.shape)
      u = u / (norms.l2_norm(u) + 1e-12)
    x_init = norms.clip_box(x0 + eps * u)
    f0, g0, ok0 = value_and_grad(jax.random.fold_in(k_steps, n), x_init)
    eta0 = jnp.full((b,), config.initial_step * eps, jnp.float32)
    state = dict(x=x_init, x_prev=x_init, g=g0, f=f0, x_best=x_init, f_best=f0, g_best=g0,
                 eta=eta0, n_inc=jnp.zeros((b,), jnp.float32),
                 f_best_check=f0, reduced_check=jnp.ones((b,), bool),
                 x_found=x_init, found=ok0)

    def body(i, s):
      a = jnp.where(i > 0, config.momentum, 1.0)
      z = project(s["x"] + per_ex(s["eta"]) * direction(s["g"]))
      x_new = project(s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["x_prev"]))
      f, g, ok = value_and_grad(jax.random.fold_in(k_steps, i), x_new)
      better = f > s["f_best"]
      x_best = jnp.where(per_ex(better), x_new, s["x_best"])
      g_best = jnp.where(per_ex(better), g, s["g_best"])
      f_best = jnp.where(better, f, s["f_best"])
      n_inc = s["n_inc"] + (f > s["f"]).astype(jnp.float32)
      # Checkpoint: halve the step and restart from the best point where the loss
      # rose in at most rho of the interval's steps, or where the step was not
      # halved last time and the best loss has not improved since.
      at_check = check[i]
      oscillating = n_inc <= config.rho * lengths[i]
      stalled = ~s["reduced_check"] & (s["f_best_check"] >= f_best)
      reduce = at_check & (oscillating | stalled)
      x_next = jnp.where(per_ex(reduce), x_best, x_new)
      g_next = jnp.where(per_ex(reduce), g_best, g)
      return dict(x=x_next, x_prev=s["x"], g=g_next, f=f, x_best=x_best, f_best=f_best,
                  g_best=g_best, eta=jnp.where(reduce, s["eta"] / 2, s["eta"]),
                  n_inc=jnp.where(at_check, 0.0, n_inc),
                  f_best_check=jnp.where(at_check, f_best, s["f_best_check"]),
                  reduced_check=jnp.where(at_check, reduce, s["reduced_check"]),
                  x_found=jnp.where(per_ex(ok), x_new, s["x_found"]), found=s["found"] | ok)

    if trace:
      def scan_body(st, i):
        st = body(i, st)
        return st, {"eta": st["eta"], "loss": st["f"], "loss_best": st["f_best"]}
      out, history = jax.lax.scan(scan_body, state, jnp.arange(n), unroll=unroll)
      return result(out).astype(x.dtype), history
    return result(jax.lax.fori_loop(0, n, body, state, unroll=unroll)).astype(x.dtype)

  def result(s):
    return jnp.where(s["found"].reshape((-1,) + (1,) * (s["x"].ndim - 1)), s["x_found"],
                     s["x_best"])

  return attack
