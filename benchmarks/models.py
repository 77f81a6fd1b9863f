"""The networks the benchmarks time, built as train.py / evaluate.py build them:
from the resolved backend's layers, freshly initialized (timing does not
depend on the weights)."""
from __future__ import annotations

import jax

from dropjax import backend as backend_lib
from dropjax.config import TrainConfig
from dropjax.training import state as state_lib, step as step_lib

NUM_CLASSES, IMAGE_SHAPE = 10, (32, 32, 3)


def initial_state(cfg: TrainConfig, train: bool):
  """``(model, tx, state)``: ``cfg``'s ResNet from the backend's training
  (``train=True``) or inference layers, its optimizer and initial state."""
  model = state_lib.make_model(cfg, NUM_CLASSES, backend_lib.resolve().layers(train=train))
  tx = state_lib.make_optimizer(cfg, 100)
  return model, tx, state_lib.create_state(jax.random.PRNGKey(0), model, tx, IMAGE_SHAPE)


def inference_model(cfg: TrainConfig):
  """``(logits_fn, variables)`` of ``cfg``'s ResNet in inference mode."""
  model, _, state = initial_state(cfg, train=False)
  return step_lib.make_logits_fn(model), state.variables
