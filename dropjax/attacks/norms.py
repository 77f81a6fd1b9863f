"""Steps and exact projections for the L-inf, L2 and L0 threat models.

Images ``x`` and the clean reference ``x0`` are ``(B, H, W, C)`` in ``[-1, 1]``;
``eps`` and ``step`` are already in those units (see :mod:`dropjax.attacks.pgd`
for the conversion from the [0, 1] pixel scale).  Every projection returns a
point that satisfies its norm constraint *and* the box ``[-1, 1]``.

L0 counts **pixels** (``unit="pixel"``: a pixel counts once however many of
its channels change) or single **values** (``unit="value"``).  The projection
onto ``{delta : ||delta||_0 <= k, x0 + delta in [-1, 1]}`` is exact: each
pixel's proposal ``z_p`` is clipped to the box (``c_p``), and the ``k`` pixels
with the largest gain ``||z_p||^2 - ||z_p - c_p||^2`` keep ``c_p``; all others
are reset to ``x0`` (Croce & Hein, "Sparse and imperceivable adversarial
attacks", 2019).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NORMS = ("linf", "l2", "l0")
L0_UNITS = ("pixel", "value")
_TINY = 1e-12


def _per_example(fn, x):
  return fn(x.reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def l2_norm(x: Array) -> Array:
  """Per-example L2 norm, shape (B, 1, 1, 1)."""
  return jnp.sqrt(_per_example(jnp.sum, jnp.square(x)))


def clip_box(x: Array) -> Array:
  return jnp.clip(x, -1.0, 1.0)


def linf_step(x, g, step):
  return x + step * jnp.sign(g)


def linf_project(x, x0, eps):
  return clip_box(x0 + jnp.clip(x - x0, -eps, eps))


def l2_step(x, g, step):
  """Steepest-ascent step of L2 length ``step`` (X units) along ``g``, per example."""
  return x + step * g / (l2_norm(g) + _TINY)


def l2_project(x, x0, eps):
  """Projection onto the L2 ball of radius ``eps`` (X units) around ``x0``, per
  example, then onto the box [-1, 1]; ``x``, ``x0``: (B, H, W, C) float."""
  delta = x - x0
  delta = delta * jnp.minimum(1.0, eps / (l2_norm(delta) + _TINY))
  # Clipping x0 + delta (x0 in the box) only shrinks |delta_i|: stays in the ball.
  return clip_box(x0 + delta)


def l0_step(x, g, step):
  """Gradient step normalized by the mean absolute gradient (per example)."""
  return x + step * g / (_per_example(jnp.mean, jnp.abs(g)) + _TINY)


def l0_project(x, x0, k: int, unit: str = "pixel"):
  """Exact projection onto ``||x - x0||_0 <= k`` (pixels or values) and the box."""
  b, h, w, c = x.shape
  z = x - x0
  clipped = clip_box(x) - x0
  gain = jnp.square(z) - jnp.square(z - clipped)
  if unit == "pixel":
    gain = jnp.sum(gain, axis=-1)  # (B, H, W)
  gain = gain.reshape(b, -1)
  k = min(int(k), gain.shape[1])
  if k <= 0:
    return x0
  _, idx = jax.lax.top_k(gain, k)
  keep = jax.vmap(lambda i: jnp.zeros(gain.shape[1], bool).at[i].set(True))(idx)
  keep = keep.reshape((b, h, w, 1) if unit == "pixel" else (b, h, w, c))
  return x0 + jnp.where(keep, clipped, 0.0)


def l0_count(delta: Array, unit: str = "pixel") -> Array:
  """Per-example number of changed pixels (or values): shape (B,)."""
  nz = delta != 0
  if unit == "pixel":
    nz = jnp.any(nz, axis=-1)
  return jnp.sum(nz.reshape(delta.shape[0], -1), axis=1)


def random_start(key, x0, norm: str, eps, k: int = 0, unit: str = "pixel"):
  """A random point of the threat model around ``x0`` (already projected)."""
  if norm == "linf":
    return linf_project(x0 + jax.random.uniform(key, x0.shape, minval=-eps, maxval=eps), x0, eps)
  if norm == "l2":
    k_dir, k_rad = jax.random.split(key)
    d = jax.random.normal(k_dir, x0.shape)
    r = jax.random.uniform(k_rad, (x0.shape[0],) + (1,) * (x0.ndim - 1))
    return l2_project(x0 + eps * r * d / (l2_norm(d) + _TINY), x0, eps)
  return l0_project(x0 + jax.random.uniform(key, x0.shape, minval=-2.0, maxval=2.0), x0, k, unit)
