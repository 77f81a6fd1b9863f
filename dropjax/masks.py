"""Pixel dropping: random Bernoulli masks applied to images.

The paper's core operation: sample ``M ~ Bernoulli(1 - r)`` and return
``M * x``.  Images are float arrays in ``[-1, 1]`` of shape ``(..., H, W, C)``
(a dropped value becomes 0, the mid-grey of that range).

Two granularities:

* ``per_pixel=False`` (the paper's definition): each of the ``H*W*C`` values is
  kept independently with probability ``1 - r``.
* ``per_pixel=True``: all ``C`` channels of a pixel are kept or dropped together.

The drop rate ``r`` is a scalar or an array whose shape is a prefix of the batch
dimensions of ``x`` (typically ``(B,)``: one rate per example).  All functions
take the PRNG key first and are pure, so they work under ``jit`` and ``vmap``.

The paper's three ways of dropping are one small spec, :class:`DropSpec`
(``none``, ``fixed`` rate ``r``, or ``random``: ``r ~ U[0, 1]`` per image), and
one function samples its rate and then its mask, :func:`spec_mask`; training,
inference, the defense, the attacks and the evaluation all call it.  The same
spec names randomized ablation (``ablate``: exactly ``keep`` of the ``H * W``
pixels kept, Levine & Feizi 2020; :func:`ablation_mask`), which training and
certification (:mod:`dropjax.certify`) use.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dropjax import contracts

Array = jax.Array


def _is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def _check_rate(rate, x_shape) -> None:
  """Raises ``ValueError`` for a bad drop rate (only for concrete values)."""
  if not _is_concrete(rate):
    shape = jnp.shape(rate)
  else:
    arr = np.asarray(rate)
    shape = arr.shape
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
      raise ValueError(f"drop rate must be real numbers, got dtype {arr.dtype}")
    if np.isnan(arr).any():
      raise ValueError("drop rate contains NaN")
    if (arr < 0).any() or (arr > 1).any():
      raise ValueError(
          f"drop rate must lie in [0, 1], got min {arr.min()} max {arr.max()}")
  batch_shape = tuple(x_shape[:-3])
  if len(shape) > len(batch_shape) or tuple(shape) != batch_shape[:len(shape)]:
    raise ValueError(
        f"drop rate shape {tuple(shape)} must be () or a prefix of the batch "
        f"shape {batch_shape} of images with shape {tuple(x_shape)} "
        "(..., H, W, C)")


def _check_images(x) -> None:
  contracts.check_images(x)


def _broadcast_rate(rate, ndim: int) -> Array:
  rate = jnp.asarray(rate, jnp.float32)
  return rate.reshape(rate.shape + (1,) * (ndim - rate.ndim))


def sample_mask(key: Array, shape, rate, *, per_pixel: bool = False,
                dtype=jnp.float32) -> Array:
  """Samples a keep-mask ``M ~ Bernoulli(1 - rate)``.

  Args:
    key: PRNG key.
    shape: image shape ``(..., H, W, C)``.
    rate: drop rate in ``[0, 1]``; scalar or prefix of the batch shape.
    per_pixel: drop all channels of a pixel together.
    dtype: dtype of the returned mask.

  Returns:
    Array of ``shape`` and ``dtype`` holding 0 (dropped) and 1 (kept). With
    ``per_pixel=True`` it is equal across the last (channel) axis.
  """
  shape = tuple(shape)
  if len(shape) < 3:
    raise ValueError(f"mask shape must be (..., H, W, C), got {shape}")
  _check_rate(rate, shape)
  draw_shape = shape[:-1] + (1,) if per_pixel else shape
  u = jax.random.uniform(key, draw_shape)
  # u in [0, 1): P(u >= r) = 1 - r; r = 0 keeps all, r = 1 drops all.
  keep = u >= _broadcast_rate(rate, len(shape))
  return jnp.broadcast_to(keep, shape).astype(dtype)


def drop_pixels(key: Array, x: Array, rate, *, per_pixel: bool = False) -> Array:
  """Returns ``M * x`` with ``M ~ Bernoulli(1 - rate)`` (see :func:`sample_mask`).

  Args:
    key: PRNG key.
    x: images, float, shape ``(..., H, W, C)``, values in ``[-1, 1]``.
    rate: drop rate, scalar or per-example array (prefix of ``x.shape[:-3]``).
    per_pixel: drop whole pixels instead of single values.

  Returns:
    Array with the shape and dtype of ``x``.
  """
  _check_images(x)
  return x * sample_mask(key, jnp.shape(x), rate, per_pixel=per_pixel,
                         dtype=jnp.result_type(x))


DROP_MODES = ("none", "fixed", "random", "ablate")


@dataclasses.dataclass(frozen=True)
class DropSpec:
  """How pixels are dropped: the paper's three settings, and randomized ablation.

  Attributes:
    mode: ``"none"`` (no dropping), ``"fixed"`` (rate ``rate``),
      ``"random"`` (a rate ``r ~ U[0, 1]`` per image, then the mask) or
      ``"ablate"`` (exactly ``keep`` whole pixels kept, :func:`ablation_mask`).
    rate: the drop rate of ``"fixed"`` (ignored otherwise), in ``[0, 1]``.
    per_pixel: drop all channels of a pixel together (the paper drops single
      values; ``"ablate"`` always keeps whole pixels).
    keep: pixels kept per image by ``"ablate"`` (ignored otherwise).
  """
  mode: str = "none"
  rate: float = 0.0
  per_pixel: bool = False
  keep: int = 0

  def __post_init__(self):
    if self.mode not in DROP_MODES:
      raise ValueError(f"unknown drop mode {self.mode!r}; choose one of {DROP_MODES}")
    if not 0.0 <= float(self.rate) <= 1.0:
      raise ValueError(f"drop rate must be in [0, 1], got {self.rate}")
    if self.mode == "ablate" and int(self.keep) < 1:
      raise ValueError(f"ablation must keep at least one pixel, got keep={self.keep}")

  @classmethod
  def fixed(cls, rate: float, per_pixel: bool = False) -> "DropSpec":
    """Fixed rate ``rate`` (0 keeps everything)."""
    return cls("fixed", float(rate), per_pixel)

  @classmethod
  def ablation(cls, keep: int) -> "DropSpec":
    """Exactly ``keep`` whole pixels kept per image (randomized ablation)."""
    return cls("ablate", 0.0, True, int(keep))

  @property
  def drops(self) -> bool:
    """Whether any value can be dropped."""
    return self.mode in ("random", "ablate") or (self.mode == "fixed" and self.rate > 0)

  def describe(self) -> str:
    return {"none": "no dropping", "fixed": f"r = {self.rate:g}",
            "random": "r ~ U[0, 1]", "ablate": f"k = {self.keep} pixels kept"}[self.mode]


def spec_rates(key: Array, spec: DropSpec, batch_shape=()) -> Array:
  """The drop rate of every image: ``batch_shape`` float32 (a scalar for ``()``)."""
  if spec.mode == "random":
    return jax.random.uniform(key, tuple(batch_shape))
  rate = spec.rate if spec.mode == "fixed" else 0.0
  return jnp.full(tuple(batch_shape), rate, jnp.float32)


def spec_mask(key: Array, spec: DropSpec, shape, dtype=jnp.float32) -> Array:
  """The keep-mask of :class:`DropSpec` ``spec`` for images of ``shape`` (..., H, W, C).

  Samples the rate first (``random``: one ``r ~ U[0, 1]`` per image, from the
  first half of ``split(key)``), then ``M ~ Bernoulli(1 - r)`` (:func:`sample_mask`,
  from the second half; ``fixed`` uses ``key`` itself).  ``none`` is all ones;
  ``ablate`` is :func:`ablation_mask` with ``spec.keep`` from ``key``.
  Returns ``shape`` of 0/1 in ``dtype``.
  """
  shape = tuple(shape)
  if spec.mode == "ablate":
    return ablation_mask(key, shape, spec.keep, dtype)
  if spec.mode == "none":
    if len(shape) < 3:
      raise ValueError(f"mask shape must be (..., H, W, C), got {shape}")
    return jnp.ones(shape, dtype)
  if spec.mode == "fixed":
    return sample_mask(key, shape, spec.rate, per_pixel=spec.per_pixel, dtype=dtype)
  k_rate, k_mask = jax.random.split(key)
  rates = spec_rates(k_rate, spec, shape[:-3])
  return sample_mask(k_mask, shape, rates, per_pixel=spec.per_pixel, dtype=dtype)


def spec_drop(key: Array, spec: DropSpec, x: Array) -> Array:
  """``x * spec_mask(key, spec, x.shape)``: images (..., H, W, C) -> same shape and dtype."""
  _check_images(x)
  if spec.mode == "none":
    return x
  return x * spec_mask(key, spec, jnp.shape(x), dtype=jnp.result_type(x))


# --- exact-k pixel ablation (randomized ablation, Levine & Feizi 2020) ------


def ablation_mask(key: Array, shape, keep: int, dtype=jnp.float32) -> Array:
  """Keeps exactly ``keep`` of the ``H * W`` pixels, chosen uniformly without
  replacement (all channels of a kept pixel kept).

  ``shape`` is ``(..., H, W, C)``; every leading index gets its own subset from
  ``key``.  Returns ``shape`` of 0/1 in ``dtype`` with exactly ``keep * C`` ones
  per image.
  """
  shape = tuple(shape)
  if len(shape) < 3:
    raise ValueError(f"mask shape must be (..., H, W, C), got {shape}")
  *lead, h, w, c = shape
  if not 0 <= keep <= h * w:
    raise ValueError(f"keep must be in [0, {h * w}] for {h}x{w} images, got {keep}")
  u = jax.random.uniform(key, (int(np.prod(lead, dtype=np.int64)), h * w))
  _, idx = jax.lax.top_k(u, keep)  # keep distinct positions, uniformly at random
  flat = jax.vmap(lambda i: jnp.zeros((h * w,), dtype).at[i].set(1))(idx)
  return jnp.broadcast_to(flat.reshape(*lead, h, w, 1), shape)


def ablate(key: Array, x: Array, keep: int) -> tuple[Array, Array]:
  """Randomized ablation of images ``x`` (..., H, W, C) in [-1, 1].

  Returns ``(x * M, M[..., :1])``: the images with all but ``keep`` pixels set
  to 0 (the mid-grey of [-1, 1]; :func:`ablation_mask`) and the keep-mask, one
  channel, float 0/1.  How a model shows ablated pixels (as 0 values, or in
  Levine & Feizi's doubled encoding, which needs the mask) is the model's input
  encoding (:class:`dropjax.models.CifarResNet`).
  """
  _check_images(x)
  m = ablation_mask(key, jnp.shape(x), keep, dtype=jnp.result_type(x))
  return x * m, m[..., :1]
