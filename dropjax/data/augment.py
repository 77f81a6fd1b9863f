"""On-device preprocessing and keyed augmentation (pure functions).

Images arrive as uint8 ``(B, H, W, C)`` and are scaled to float32 ``[-1, 1]``
on the device by :func:`to_float`.  Augmentations take the PRNG key first and
act per example (one key per example, so results do not depend on how a batch
is split over devices).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def to_float(x: Array, dtype=jnp.float32) -> Array:
  """uint8 ``[0, 255]`` -> ``dtype`` in ``[-1, 1]``."""
  return x.astype(dtype) / 127.5 - 1.0


def random_crop(key: Array, x: Array, pad: int, pad_value: float = -1.0) -> Array:
  """Pads one image ``(H, W, C)`` by ``pad`` and crops a random ``H x W`` window.

  ``pad_value`` -1 is black in ``[-1, 1]``, like zero padding of [0, 1] images.
  """
  if pad == 0:
    return x
  h, w, c = x.shape
  padded = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=pad_value)
  dy, dx = jax.random.randint(key, (2,), 0, 2 * pad + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))


def random_flip(key: Array, x: Array) -> Array:
  """Flips one image ``(H, W, C)`` left-right with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), x[:, ::-1, :], x)


def augment_one(key: Array, x: Array, *, crop_pad: int, hflip: bool) -> Array:
  """Random crop (and flip if ``hflip``) of one image ``(H, W, C)``."""
  k_crop, k_flip = jax.random.split(key)
  x = random_crop(k_crop, x, crop_pad)
  return random_flip(k_flip, x) if hflip else x


def augment_batch(keys: Array, x: Array, *, crop_pad: int = 4, hflip: bool = True) -> Array:
  """Per-example augmentation: ``keys`` ``(B,)``-batch of keys, ``x`` ``(B, H, W, C)``."""
  return jax.vmap(lambda k, xi: augment_one(k, xi, crop_pad=crop_pad, hflip=hflip))(keys, x)
