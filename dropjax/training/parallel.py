"""Running the pure train step on all devices: ``jit`` over a mesh, or ``pmap``.

* ``jit`` (default, what JAX recommends today): the state is replicated and the
  batch is sharded over a 1-D ``("data",)`` mesh of all (global) devices; XLA
  inserts the gradient all-reduce.  Each process contributes its own rows of
  the global batch through ``jax.make_array_from_process_local_data``, so the
  same code runs on one CPU, one GPU or a multi-host TPU slice.
* ``pmap``: the state is replicated per local device, each device gets
  ``B / n`` rows, and the step averages gradients, batch-norm statistics and
  metrics with ``lax.pmean`` (single-process only).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
PMAP_AXIS = "batch"


def check_batch_size(batch_size: int, num_devices: int, num_processes: int = 1) -> None:
  if batch_size % num_devices:
    raise ValueError(
        f"batch size {batch_size} is not divisible by the {num_devices} devices; "
        f"use a multiple of {num_devices}")
  if batch_size % num_processes:
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{num_processes} processes")


class JitRunner:
  """Data-parallel ``jit`` over a 1-D mesh of all devices."""

  def __init__(self, train_step, batch_size: int):
    self.mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    check_batch_size(batch_size, self.mesh.size, jax.process_count())
    self.replicated = NamedSharding(self.mesh, P())
    self.data = NamedSharding(self.mesh, P(DATA_AXIS))
    self.batch_size = batch_size
    self.local_batch_size = batch_size // jax.process_count()
    self._step = jax.jit(train_step, in_shardings=(self.replicated, self.data, self.replicated),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=0)

  def put_state(self, state):
    """Host (or device) state -> replicated global arrays."""
    if jax.process_count() == 1:
      return jax.device_put(state, self.replicated)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(self.replicated, np.asarray(a)), state)

  def put_batch(self, local_batch: dict):
    """This process's rows ``(B / num_processes, ...)`` -> global sharded arrays."""
    return {k: jax.make_array_from_process_local_data(
        self.data, v, (self.batch_size, *v.shape[1:])) for k, v in local_batch.items()}

  def step(self, state, batch, key):
    return self._step(state, batch, key)

  def host_state(self, state):
    return jax.device_get(state)

  def checkpoint_state(self, state):
    return state  # global arrays; orbax writes them collectively


class PmapRunner:
  """``pmap`` over local devices, with ``lax.pmean`` inside the step."""

  def __init__(self, train_step, batch_size: int):
    if jax.process_count() > 1:
      raise ValueError("--parallel pmap is single-process here; use --parallel jit "
                       "for multi-host runs")
    self.devices = jax.local_devices()
    check_batch_size(batch_size, len(self.devices))
    self.batch_size = self.local_batch_size = batch_size
    self._step = jax.pmap(train_step, axis_name=PMAP_AXIS, in_axes=(0, 0, None),
                          donate_argnums=0)

  def put_state(self, state):
    n = len(self.devices)
    return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (n, *np.shape(a))), state)

  def put_batch(self, local_batch: dict):
    n = len(self.devices)
    return jax.tree.map(lambda v: v.reshape(n, v.shape[0] // n, *v.shape[1:]), local_batch)

  def step(self, state, batch, key):
    state, metrics = self._step(state, batch, key)
    return state, jax.tree.map(lambda m: m[0], metrics)

  def host_state(self, state):
    return jax.device_get(jax.tree.map(lambda a: a[0], state))

  def checkpoint_state(self, state):
    return self.host_state(state)


def make_runner(mode: str, train_step, batch_size: int):
  """The runner that applies ``train_step`` on the devices: ``"jit"``
  (:class:`JitRunner`, data-parallel over a mesh of all devices) or ``"pmap"``
  (:class:`PmapRunner`); ``batch_size``: the global batch."""
  if mode == "jit":
    return JitRunner(train_step, batch_size)
  if mode == "pmap":
    return PmapRunner(train_step, batch_size)
  raise ValueError(f"unknown parallel mode {mode!r}; use jit or pmap")
