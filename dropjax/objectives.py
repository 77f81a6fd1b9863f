"""Per-example training losses, including the paper's two auxiliary objectives.

All losses return one value per example, shape ``(B,)``; reduce at the edge.

* :func:`cross_entropy`: softmax cross-entropy with integer labels.
* :func:`uniform_cross_entropy`: cross-entropy to the uniform distribution,
  ``-(1/C) sum_c log p_c``; its minimum ``log C`` is reached exactly when the
  prediction is uniform.

The paper's "what if" experiments (both train ``X∘M`` towards the true label):

* ``uniform_original`` (b): the *original* images ``X`` towards uniform.
* ``uniform_noisy`` (c): noisy subsampled images ``(X + εV)∘M``, ``V ∈ {±1}``
  elementwise, towards uniform (``ε`` given on the [0, 1] scale).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
  """``logits`` (B, C) float, ``labels`` (B,) int -> (B,) float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def uniform_cross_entropy(logits: Array) -> Array:
  """Cross-entropy to the uniform distribution: (B, C) -> (B,), minimum log C."""
  return -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def noisy_images(key: Array, x: Array, eps: float) -> Array:
  """``clip(x + eps*V)`` with ``V`` uniform on {-1, +1}; ``x`` and ``eps`` in
  units of X ∈ [-1, 1] (convert a stated value with :func:`dropjax.units.to_x_units`)."""
  v = jax.random.rademacher(key, x.shape, dtype=x.dtype)
  return jnp.clip(x + eps * v, -1.0, 1.0)
