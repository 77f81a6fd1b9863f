"""Train state, optimizer and learning-rate schedule."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dropjax import models
from dropjax.models import ModelLayers
from dropjax.config import TrainConfig


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. ``step`` counts optimizer updates."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def make_model(config: TrainConfig, num_classes: int, layers: ModelLayers | None = None,
               bn_axis_name: str | None = None) -> models.CifarResNet:
  """The run's ResNet built from ``layers`` (default: plain ``nn.Conv`` /
  ``nn.BatchNorm``; pass ``dropjax.backend.resolve().layers(train)`` for the
  backend's fast equivalents -- same parameters either way)."""
  layers = layers or ModelLayers()
  return models.resnet(config.depth, num_classes, width=config.width,
                       half_precision=config.half_precision, bn_axis_name=bn_axis_name,
                       input_encoding=config.input_encoding, fill=config.input_fill,
                       **layers.as_kwargs())


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate per step: linear warm-up over ``warmup_epochs``, then cosine
  decay to 0 or step decays (x0.1 at the fractions ``lr_boundaries`` of training)."""
  total = config.epochs * steps_per_epoch
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(config.lr, max(1, total - warmup))
  else:
    main = optax.piecewise_constant_schedule(
        config.lr, {int(b * total) - warmup: 0.1 for b in config.lr_boundaries})
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), main], [warmup])


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled L2 weight decay (PyTorch semantics)."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(make_schedule(config, steps_per_epoch), momentum=config.momentum,
                nesterov=config.nesterov))


def create_state(key: jax.Array, model, tx: optax.GradientTransformation,
                 image_shape: tuple[int, int, int]) -> TrainState:
  """Initial state (one compiled program, not op-by-op dispatch)."""

  @jax.jit
  def init(key):
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"], opt_state=tx.init(params))

  return jax.device_get(init(key))
