"""Checks of the public functions' input contracts, with messages a user can act on.

dropjax's images are float arrays in ``[-1, 1]`` of shape ``(..., H, W, C)``
(``dropjax.data.augment.to_float`` maps uint8 images there) and its labels are
integer class indices.  The masks, attacks, defense and evaluation call these
checks on their inputs.  They run only on concrete arrays: inside ``jax.jit``
the values are not known when the function is traced, so there the checks of
values are skipped (shapes and dtypes are still checked).  To check inside a
jitted program, call the function once outside ``jit`` or check the arrays
before the call (``check_images(x)``, ``check_labels(y, num_classes)``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Images are compared against [-1, 1] with this slack (float rounding of scaled uint8).
_RANGE_SLACK = 1e-5


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_images(x, name: str = "images", *, min_ndim: int = 3) -> None:
  """Raises ``ValueError`` unless ``x`` is a float array (..., H, W, C), finite, in [-1, 1]."""
  shape, dtype = jnp.shape(x), jnp.result_type(x)
  if len(shape) < min_ndim:
    raise ValueError(f"{name} must have shape (..., H, W, C), got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array in [-1, 1], got dtype {dtype} (uint8 "
                     "images: scale them with dropjax.data.augment.to_float)")
  if not is_concrete(x):
    return
  a = np.asarray(jax.device_get(x), np.float32)
  if a.size == 0:
    return
  if not np.isfinite(a).all():
    raise ValueError(f"{name} contain {int((~np.isfinite(a)).sum())} non-finite values "
                     "(NaN or inf)")
  lo, hi = float(a.min()), float(a.max())
  if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
    hint = (" (they look like [0, 255] pixel values)" if hi > 2
            else " (they look like [0, 1] values: use 2 * x - 1)" if lo >= 0 else "")
    raise ValueError(f"{name} must lie in [-1, 1], got min {lo:.4g} and max {hi:.4g}{hint}; "
                     "dropjax.data.augment.to_float maps uint8 images to [-1, 1]")


def check_labels(y, num_classes: int | None = None, *, batch: int | None = None,
                 name: str = "labels") -> None:
  """Raises ``ValueError`` unless ``y`` is an integer (B,) array of classes in
  ``[0, num_classes)`` (values checked when concrete and ``num_classes`` given)."""
  shape, dtype = jnp.shape(y), jnp.result_type(y)
  if len(shape) != 1:
    raise ValueError(f"{name} must have shape (B,), got shape {shape}")
  if batch is not None and shape[0] != batch:
    raise ValueError(f"{name} shape {shape} does not match the batch of {batch} images")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must be integer class indices, got dtype {dtype}")
  if num_classes is None or not is_concrete(y):
    return
  a = np.asarray(jax.device_get(y))
  if a.size and (a.min() < 0 or a.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}), got min {a.min()} and max "
                     f"{a.max()}")
