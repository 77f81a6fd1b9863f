"""The pure train step and the evaluation forward pass.

Batches are dicts of host arrays: ``image`` uint8 ``(B, H, W, C)``, ``label``
int32 ``(B,)`` and ``index`` int32 ``(B,)`` (each example's position in the
global batch).  Every random draw for example ``i`` at step ``s`` comes from
``fold_in(fold_in(key, s), index_i)``, so results do not depend on how the
batch is split over devices, and a run is reproducible from its seed.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dropjax import masks, objectives, units
from dropjax.attacks import norms
from dropjax.attacks.pgd import AttackConfig, make_pgd
from dropjax.config import TrainConfig
from dropjax.data import augment
from dropjax.training.state import TrainState

Array = jax.Array


def example_keys(key: Array, step: Array, index: Array) -> Array:
  """Per-example keys ``fold_in(fold_in(key, step), index)``: shape (B,)."""
  step_key = jax.random.fold_in(key, step)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, index)


def prepare_inputs(config: TrainConfig, key: Array, step: Array, batch: dict):
  """Scales, augments and drops pixels of a batch, on device.

  Returns:
    ``(x, x_dropped, masks_, ex_keys)``: the augmented images ``x`` in [-1, 1]
    ``(B, H, W, C)`` float32, the model's input ``x_dropped = M * x`` (equal to
    ``x`` with ``drop="none"``), the masks ``M`` and per-example keys for
    further sampling.
  """
  ex_keys = example_keys(key, step, batch["index"])
  k_aug, k_drop, k_extra = (jax.vmap(lambda k: jax.random.split(k, 3))(ex_keys)
                            .transpose(1, 0, *range(2, ex_keys.ndim + 1)))
  x = augment.to_float(batch["image"])
  x = augment.augment_batch(k_aug, x, crop_pad=config.crop_pad, hflip=config.use_hflip)
  spec = config.drop_spec
  if not spec.drops:
    return x, x, jnp.ones_like(x), k_extra
  m = jax.vmap(lambda k: masks.spec_mask(k, spec, x.shape[1:]))(k_drop)
  return x, x * m, m, k_extra


def per_example_loss(config: TrainConfig, apply_logits: Callable, x: Array,
                     x_dropped: Array, m: Array, keys: Array, labels: Array):
  """Per-example objective (B,) and the logits of the dropped images.

  ``apply_logits(images, keep=None) -> logits`` runs the model in training
  mode on one batch (``keep``: the masks, for a model whose input encoding
  needs them); auxiliary inputs are concatenated into that single batch so
  that batch norm sees them together.
  """
  if config.objective == "standard":
    logits = apply_logits(x_dropped, m if config.model_takes_mask else None)
    return objectives.cross_entropy(logits, labels), logits
  if config.objective == "uniform_original":
    aux_in = x
  else:  # uniform_noisy
    eps = units.to_x_units(config.aux_eps, config.budget_reading)
    noisy = jax.vmap(lambda k, xi: objectives.noisy_images(k, xi, eps))(keys, x)
    aux_in = noisy * m
  b = x.shape[0]
  both = apply_logits(jnp.concatenate([x_dropped, aux_in]))
  logits, aux_logits = both[:b], both[b:]
  loss = (objectives.cross_entropy(logits, labels)
          + config.aux_weight * objectives.uniform_cross_entropy(aux_logits))
  return loss, logits


def adversary_attack_config(config: TrainConfig) -> AttackConfig:
  """The PGD attack of ``--adv_training pgd`` (Madry et al. 2018): CE,
  untargeted, ``adv_steps`` steps of ``adv_step`` within ``adv_eps``, no EOT."""
  return AttackConfig(norm=config.adv_norm, eps=config.adv_eps, step_size=config.adv_step,
                      num_steps=config.adv_steps, loss="ce", eot_samples=0,
                      budget_reading=config.budget_reading).validate()


def make_adversary(config: TrainConfig, model, *, unroll: int | bool = 1) -> Callable:
  """``adversary(variables, x, y, keys) -> x_adv`` for PGD adversarial training.

  ``x`` float (B, H, W, C) in [-1, 1], ``y`` (B,) int, ``keys`` (B,) per-example
  keys: example ``i`` starts at a uniform random point of its ball drawn from
  ``keys[i]`` (so the attack does not depend on how the batch is split over
  devices), then takes :func:`adversary_attack_config`'s PGD steps on the
  model in *training* mode -- batch statistics, as in Madry et al.'s code --
  without updating the running statistics.  The result carries no gradient.
  """
  attack_config = adversary_attack_config(config)
  eps = attack_config.x_units(attack_config.eps)

  def logits_fn(variables, images):
    logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits

  attack = make_pgd(logits_fn, attack_config, unroll=unroll)

  def adversary(variables, x, y, keys):
    start = jax.vmap(lambda k, xi: norms.random_start(k, xi[None], config.adv_norm, eps)[0])(
        keys, x)
    # The key is unused: the start is given, the attack is untargeted, no EOT.
    x_adv = attack(keys[0], variables, x, y, start=start)
    return jax.lax.stop_gradient(x_adv)

  return adversary


def make_train_step(config: TrainConfig, model, tx, axis_name: str | None = None, *,
                    unroll: int | bool = 1):
  """Returns the pure ``train_step(state, batch, key) -> (state, metrics)``.

  With ``axis_name`` (pmap) gradients, batch-norm statistics (through the
  model's ``bn_axis_name``) and metrics are averaged over that axis.  With
  ``config.adv_training == "pgd"`` the model is trained on
  :func:`make_adversary`'s examples of each batch (``unroll``: of its step
  loop, ``dropjax.backend.resolve().loop_unroll(config.adv_steps)``).
  """
  adversary = (make_adversary(config, model, unroll=unroll)
               if config.adv_training != "none" else None)

  def train_step(state: TrainState, batch: dict, key: Array):
    x, x_dropped, m, keys = prepare_inputs(config, key, state.step, batch)
    if adversary is not None:  # validate() ensures no dropping and the standard objective
      x = x_dropped = adversary(state.variables, x, batch["label"], keys)

    def loss_fn(params):
      new_stats = {}

      def apply_logits(images, keep=None):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                      images, train=True, keep=keep, mutable=["batch_stats"])
        new_stats["batch_stats"] = updates["batch_stats"]
        return logits

      losses, logits = per_example_loss(config, apply_logits, x, x_dropped, m, keys,
                                        batch["label"])
      return jnp.mean(losses), (logits, new_stats["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "input_zero_fraction": jnp.mean(x_dropped == 0),
    }
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_logits_fn(model) -> Callable:
  """``logits_fn(variables, x, keep=None) -> logits``: inference-mode forward pass.

  ``variables`` = ``{"params", "batch_stats"}``; ``x`` float ``(B, H, W, C)`` in
  [-1, 1]; ``keep`` an optional 0/1 mask of the pixels shown (for models with
  the doubled input encoding; see :class:`dropjax.models.CifarResNet`); logits
  float32 ``(B, num_classes)``.  Attacks and the defense call it as
  ``logits_fn(variables, x)``; certification passes ``keep``.
  """

  def logits_fn(variables, x, keep=None):
    return model.apply(variables, x, train=False, keep=keep)

  return logits_fn
