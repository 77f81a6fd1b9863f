"""PGD with Expectation over Transformation (EOT) over pixel-drop masks.

``make_pgd(logits_fn, config)`` returns a pure
``attack(key, variables, x, y) -> x_adv``; the whole attack (random start and
``num_steps`` steps) is one ``lax.fori_loop``, meant to be ``jax.jit``-ed once
by its caller.  ``logits_fn(variables, x) -> logits`` is the model in
inference mode (:func:`dropjax.training.step.make_logits_fn`).

Units.  Images live in ``[-1, 1]``.  ``AttackConfig.eps`` and ``step_size``
for L-inf and L2 are read as ``AttackConfig.budget_reading`` says
(:mod:`dropjax.units`): ``"literal"`` (default; the paper's numbers in the
units of X, so an L-inf budget of 16/255 moves each value of X by at most
16/255, an 8-bit pixel by 8 levels) or ``"doubled"`` (on the [0, 1] pixel
scale, doubled in X units).  For L0,
``eps`` is the budget as a count (pixels by default, see
:mod:`dropjax.attacks.norms`); ``l0_fraction`` gives it as a fraction of ``D``
(``D = H*W`` for pixels, ``H*W*C`` for values), e.g. the paper's 0.03·D.

The rejection-aware loss (``loss="rejection"``, :func:`dropjax.attacks.losses.rejection_aware`)
is a function of the defense's averaged probabilities: its gradient is taken
through the mean over ``eot_samples`` masks of the softmax, not averaged over
per-mask gradients.

EOT (the paper's estimator): at every step the gradient is the mean over
``eot_samples`` fresh masks ``M_k`` (drawn as ``AttackConfig.drop`` says, a
:class:`dropjax.masks.DropSpec`) of ``∇_x ℓ(f(x∘M_k), y)``, which by the
chain rule equals ``∇ℓ(x∘M_k)∘M_k``.  It is written as ``vmap`` of ``grad``
over ``K`` split keys, then a mean.  ``eot_samples = 0`` or a spec that drops
nothing attacks the undefended model with plain PGD.

``make_pgd(..., unroll=)`` is how far the step loop is unrolled; the caller
that owns the devices passes ``dropjax.backend.resolve().loop_unroll(steps)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp

from dropjax import contracts, masks, units
from dropjax.attacks import losses, norms

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """One PGD attack.  See the module docstring for units."""
  norm: str = "linf"
  eps: float = 16 / 255
  step_size: float = 2 / 255
  num_steps: int = 20
  loss: str = "ce"                # "ce" or "cw"
  targeted: bool = False
  random_start: bool = True
  eot_samples: int = 10           # K masks per step; 0 = no EOT
  drop: masks.DropSpec = masks.DropSpec()  # the defended model's masks
  l0_unit: str = "pixel"          # what an L0 budget counts
  l0_fraction: float | None = None  # budget as a fraction of D (overrides eps for L0)
  eot_impl: str = "vmap"          # "vmap", "batch" or "scan" (same value, different speed)
  budget_reading: str = "literal"  # units of eps/step_size: dropjax.units
  entropy_weight: float = 1.0     # loss "rejection": weight of the entropy term

  def validate(self) -> "AttackConfig":
    if self.norm not in norms.NORMS:
      raise ValueError(f"unknown norm {self.norm!r}; choose one of {norms.NORMS}")
    if not self.eps >= 0:
      raise ValueError(f"eps must be >= 0, got {self.eps}")
    if not self.step_size >= 0:
      raise ValueError(f"step_size must be >= 0, got {self.step_size}")
    if int(self.num_steps) != self.num_steps or self.num_steps < 1:
      raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps}")
    if self.loss not in losses.LOSSES:
      raise ValueError(f"unknown attack loss {self.loss!r}; choose one of {losses.LOSSES}")
    if self.eot_samples < 0:
      raise ValueError(f"eot_samples must be >= 0, got {self.eot_samples}")
    if not isinstance(self.drop, masks.DropSpec):
      raise ValueError(f"drop must be a dropjax.masks.DropSpec, got {self.drop!r}")
    if self.l0_unit not in norms.L0_UNITS:
      raise ValueError(f"l0_unit must be one of {norms.L0_UNITS}, got {self.l0_unit!r}")
    if self.eot_impl not in EOT_IMPLS:
      raise ValueError(f"eot_impl must be one of {EOT_IMPLS}, got {self.eot_impl!r}")
    if self.l0_fraction is not None and not 0 <= self.l0_fraction <= 1:
      raise ValueError(f"l0_fraction must be in [0, 1], got {self.l0_fraction}")
    units.check_reading(self.budget_reading)
    return self

  def x_units(self, value: float) -> float:
    """``eps`` or ``step_size`` in units of X ∈ [-1, 1] (L0: a count, unchanged)."""
    return value if self.norm == "l0" else units.to_x_units(value, self.budget_reading)

  @property
  def uses_eot(self) -> bool:
    return self.eot_samples > 0 and self.drop.drops

  def l0_budget(self, image_shape: Sequence[int]) -> int:
    """The L0 budget as a count for images of shape (H, W, C)."""
    h, w, c = image_shape[-3:]
    if self.l0_fraction is None:
      return int(self.eps)
    d = h * w if self.l0_unit == "pixel" else h * w * c
    return int(self.l0_fraction * d)

  def replace(self, **kw) -> "AttackConfig":
    return dataclasses.replace(self, **kw)


EOT_IMPLS = ("vmap", "batch", "scan")


def eot_gradient(key: Array, objective: Callable[[Array, Array], Array], x: Array,
                 labels: Array, drop: masks.DropSpec, num_masks: int, *,
                 impl: str = "vmap", unroll: int | bool = 1) -> Array:
  """Mean over ``num_masks`` keyed masks of ``∇_x sum(objective(x∘M_k, labels))``.

  Args:
    key: PRNG key; mask ``k`` uses ``split(key, num_masks)[k]``.
    objective: ``(images (N, H, W, C), labels (N,)) -> (N,)`` per-example values.
    x: images (B, H, W, C).
    labels: (B,) labels passed to ``objective``.
    drop: how each mask is drawn (:func:`dropjax.masks.spec_mask`; ``random``
      draws a rate per example and mask).
    num_masks: K >= 1.
    impl: how the K gradients are computed -- all give the same value:
      ``"vmap"`` (``vmap`` of ``grad`` over the K keys), ``"batch"`` (the K
      masked copies folded into one batch of K*B, one ``grad``; the sum of
      per-copy gradients is ∑ₖ ∇ℓ(x∘Mₖ)∘Mₖ) or ``"scan"`` (one mask at a time,
      B images per pass, the scan unrolled by ``unroll``).

  Returns:
    Gradient with the shape of ``x``.  Per-example objectives make the gradient
    of example ``i`` independent of the rest of the batch.
  """
  if impl not in EOT_IMPLS:
    raise ValueError(f"unknown EOT implementation {impl!r}; choose one of {EOT_IMPLS}")
  keys = jax.random.split(key, num_masks)

  def mask(k):
    return masks.spec_mask(k, drop, x.shape, dtype=x.dtype)

  def grad_one(k):
    m = mask(k)
    return jax.grad(lambda xx: jnp.sum(objective(xx * m, labels)))(x)

  if impl == "vmap":
    return jnp.mean(jax.vmap(grad_one)(keys), axis=0)
  if impl == "scan":
    total, _ = jax.lax.scan(lambda acc, k: (acc + grad_one(k), None), jnp.zeros_like(x), keys,
                            unroll=unroll)
    return total / num_masks
  ms = jax.vmap(mask)(keys)  # (K, B, H, W, C)
  tiled = jnp.tile(labels, num_masks)

  def folded(xx):
    return jnp.sum(objective((xx[None] * ms).reshape(-1, *x.shape[1:]), tiled))

  return jax.grad(folded)(x) / num_masks


def random_targets(key: Array, labels: Array, num_classes: int) -> Array:
  """A uniformly random class different from ``labels`` for every example."""
  shift = jax.random.randint(key, labels.shape, 1, num_classes)
  return (labels + shift) % num_classes


def make_pgd(logits_fn: Callable, config: AttackConfig, *, unroll: int | bool = 1) -> Callable:
  """Builds ``attack(key, variables, x, y, target=None) -> x_adv``.

  Args:
    logits_fn: ``(variables, x) -> logits (B, C)``.
    config: the attack.
    unroll: unroll of the step loop (and of the ``scan`` EOT form):
      ``dropjax.backend.resolve().loop_unroll(config.num_steps)``.

  The returned function takes ``x`` float (B, H, W, C) in [-1, 1] and ``y``
  int (B,); called with concrete arrays it raises ``ValueError`` for images
  outside [-1, 1] or not finite and for labels that are not class indices
  (:mod:`dropjax.contracts`; under ``jit`` only shapes and dtypes are checked).
  For targeted attacks ``target`` (B,) is the class to reach; when
  omitted a random wrong class is drawn from ``key``.  ``start`` (shape of
  ``x``), when given, is where the steps begin (projected onto the threat
  model) instead of the random start: adversarial training draws it per
  example (:func:`dropjax.training.step.make_adversary`).  Returns ``x_adv`` with
  the shape and dtype of ``x``, in [-1, 1] and within the budget.
  """
  config.validate()
  objective_fn = losses.attack_objective(config.loss, config.targeted, config.entropy_weight)
  averaged = config.loss in losses.AVERAGED_LOSSES
  eps, step = config.x_units(config.eps), config.x_units(config.step_size)
  num_steps = int(config.num_steps)

  def attack(key: Array, variables, x: Array, y: Array, target: Array | None = None,
             start: Array | None = None) -> Array:
    chex.assert_rank(x, 4)
    contracts.check_images(x, min_ndim=4)
    num_classes = jax.eval_shape(logits_fn, variables, x).shape[-1]
    contracts.check_labels(y, num_classes, batch=x.shape[0])
    if target is not None:
      contracts.check_labels(target, num_classes, batch=x.shape[0], name="target")
    k_target, k_start, k_steps = jax.random.split(key, 3)
    if config.targeted:
      if target is None:
        target = random_targets(k_target, y, num_classes)
      labels = target
    else:
      labels = y
    x0 = x.astype(jnp.float32)
    l0_k = config.l0_budget(x.shape)

    def objective(xx, ll):
      return objective_fn(logits_fn(variables, xx), ll)

    def project(xx):
      if config.norm == "linf":
        return norms.linf_project(xx, x0, eps)
      if config.norm == "l2":
        return norms.l2_project(xx, x0, eps)
      return norms.l0_project(xx, x0, l0_k, config.l0_unit)

    def averaged_objective(k, xx):
      """The rejection-aware loss of the mask-averaged probabilities (B,)."""
      if not config.uses_eot:
        return objective(xx, labels)
      keys = jax.random.split(k, config.eot_samples)
      probs = jax.vmap(lambda kk: jax.nn.softmax(logits_fn(
          variables, xx * masks.spec_mask(kk, config.drop, xx.shape, xx.dtype)).astype(
              jnp.float32), -1))(keys)
      return losses.rejection_aware(probs.mean(0), labels, config.targeted,
                                    config.entropy_weight)

    def gradient(k, xx):
      if averaged:
        return jax.grad(lambda v: jnp.sum(averaged_objective(k, v)))(xx)
      if config.uses_eot:
        return eot_gradient(k, objective, xx, labels, config.drop, config.eot_samples,
                            impl=config.eot_impl, unroll=unroll)
      return jax.grad(lambda v: jnp.sum(objective(v, labels)))(xx)

    def body(i, xx):
      g = gradient(jax.random.fold_in(k_steps, i), xx)
      if config.norm == "linf":
        xx = norms.linf_step(xx, g, step)
      elif config.norm == "l2":
        xx = norms.l2_step(xx, g, step)
      else:
        xx = norms.l0_step(xx, g, step)
      return project(xx)

    if start is not None:
      chex.assert_equal_shape((start, x))
      start = project(start.astype(jnp.float32))
    elif config.random_start:
      start = norms.random_start(k_start, x0, config.norm, eps, l0_k, config.l0_unit)
    else:
      start = x0
    x_adv = jax.lax.fori_loop(0, num_steps, body, start, unroll=unroll)
    return x_adv.astype(x.dtype)

  return attack


def best_of(key: Array, attacks: Sequence[Callable], success_fn: Callable, variables,
            x: Array, y: Array) -> tuple[Array, Array]:
  """Runs several attacks and keeps, per example, the first that succeeds.

  Args:
    key: PRNG key; attack ``j`` uses ``fold_in(key, j)``.
    attacks: functions ``(key, variables, x, y) -> x_adv`` (e.g. jitted
      :func:`make_pgd` results with CE/CW, targeted/untargeted, restarts).
    success_fn: ``(x_adv, y) -> bool (B,)``, e.g. "the defended model
      misclassifies".
    variables, x, y: as for the attacks.

  Returns:
    ``(x_adv, winner)``: per example the output of the first successful attack
    (or of the last attack if none succeeds), and the index of that attack
    (-1 where none succeeded).  Python drives the few configurations; each
    attack is one compiled call.
  """
  best = None
  winner = jnp.full(y.shape, -1, jnp.int32)
  for j, attack in enumerate(attacks):
    x_adv = attack(jax.random.fold_in(key, j), variables, x, y)
    open_ = winner < 0  # no success yet: take this attack's output
    best = x_adv if best is None else jnp.where(open_[:, None, None, None], x_adv, best)
    winner = jnp.where(open_ & success_fn(x_adv, y), j, winner)
  return best, winner
