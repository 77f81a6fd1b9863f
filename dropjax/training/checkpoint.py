"""Orbax checkpoints of the train state, with clear errors and no lost work.

Orbax writes every checkpoint into a temporary directory and renames it only
when complete, so a kill mid-save never damages an earlier checkpoint.  A
checkpoint that cannot be restored raises :class:`CheckpointError` naming its
directory; it is never deleted or overwritten automatically.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from dropjax import files
from dropjax.config import ARCHITECTURE_FIELDS, TrainConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint or workdir is missing, corrupt or incompatible."""


def save_config(workdir: str, config: TrainConfig) -> None:
  if jax.process_index() != 0:
    return
  files.write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json())


def load_config(workdir: str) -> TrainConfig:
  """The config saved by ``train.py`` in ``workdir``."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir} does not exist")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} not found: {workdir} is not a dropjax training workdir")
  try:
    with open(path) as f:
      return TrainConfig.from_dict(json.load(f))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"corrupt or incompatible config {path}: {e}") from e


def check_compatible(saved: TrainConfig, config: TrainConfig, workdir: str) -> None:
  diff = {f: (getattr(saved, f), getattr(config, f)) for f in ARCHITECTURE_FIELDS
          if getattr(saved, f) != getattr(config, f)}
  if diff:
    raise CheckpointError(
        f"{os.path.join(workdir, CONFIG_FILE)} was written for a different model or "
        f"dataset (saved vs requested: {diff}); use a new --workdir")


def _first_line(error: Exception, limit: int = 160) -> str:
  """The gist of a storage error: its first line, without the JSON spec
  (kilobytes of TensorStore configuration) that orbax errors carry."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  for marker in (" {", ": {", "{\""):
    if marker in text:
      text = text[:text.index(marker)]
  return text[:limit].rstrip(" :,") or "unreadable data"


class Checkpointer:
  """Saves/restores :class:`TrainState` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, template, step: int | None = None):
    """Restores ``step`` (default latest) into the structure of ``template``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    path = os.path.join(self.directory, str(step))
    # Restore onto this process's first device, whatever topology saved it (a
    # pod-trained checkpoint loads on one CPU); callers then place the state.
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=sharding),
        template)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(
          f"checkpoint {path} could not be restored ({type(e).__name__}: {_first_line(e)}); "
          "it is corrupt or was written by an incompatible model, and was left untouched: "
          "delete that step directory to resume from an earlier one") from e

  def close(self) -> None:
    self.manager.close()
