"""Batch normalization with per-channel reductions XLA:CPU runs fast.

Numerically the same layer as ``flax.linen.BatchNorm`` (same parameter and
statistic names, biased batch variance ``E[x^2] - E[x]^2``, running averages
with ``momentum``), written so that every reduction over the batch and spatial
axes is a sum over a *wide* 2-D view of the activations.

Why: for an NHWC activation ``(B, H, W, C)`` with few channels (16 in the first
stage of a CIFAR ResNet), XLA:CPU lowers ``sum(x, axis=(0, 1, 2))`` to a
``reduce-window`` that runs at ~2-4 GB/s; summing the rows of the contiguous
view ``(B*H*W / k, k*C)`` (``k*C`` >= 128 lanes) and then folding the ``k``
copies is 5-10x faster (``benchmarks/README.md``, profile section).  Autodiff
of a broadcast produces the slow form again in the backward pass, so the
affine map and the moments carry custom VJPs whose reductions use the wide
form too.  With ``native_moments`` the two moments come from one native pass
over the activations instead (:mod:`dropjax.xla_cpu.native`): XLA:CPU writes
``x * x`` to memory before summing it.

The layer can also add a block's residual and apply its ReLU,
``relu(norm(x) + residual)`` (:func:`conv_norm_act` calls it so in training):
then, with ``native_norm_act``, the affine map, the residual and the ReLU are
one native pass, and their backward pass one more that masks the incoming
gradient and sums it and its product with ``x`` per channel; composed from
XLA's ops the backward pass writes the masked gradient, writes its product with
``x``, and reads both back (``benchmarks/README.md``).  The custom VJPs make the layer
reverse-mode only: ``jax.jvp`` through a training-mode forward pass is not
supported.  :func:`dropjax.backend.resolve` passes this layer to the model on
CPU only; elsewhere the model uses ``flax.linen.BatchNorm`` itself.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dropjax import models
from dropjax.xla_cpu import native

# Width (in elements) of the 2-D view a per-channel sum reduces over.
_LANES = 128


def channel_sum(x: jax.Array) -> jax.Array:
  """Sum of ``x`` (..., C) over every axis but the last, via a wide 2-D view.

  Returns shape (C,), dtype of ``x``.
  """
  c = x.shape[-1]
  rows = x.size // c
  k = max(1, _LANES // c)
  while rows % k:
    k //= 2
  return x.reshape(rows // k, k * c).sum(0).reshape(k, c).sum(0)


def native_channel_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel ``(sum x, sum x^2)`` of float32 ``x`` (..., C) by the native
  kernel, in one pass (float64 accumulation); each (C,) float32.  Needs
  :func:`dropjax.xla_cpu.native.load`."""
  c = x.shape[-1]
  out = jax.ShapeDtypeStruct((c,), jnp.float32)
  return tuple(jax.ffi.ffi_call(native.MOMENTS_TARGET, (out, out),
                                vmap_method="sequential")(x.reshape(-1, c)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def channel_moments(x: jax.Array, use_native: bool = False) -> tuple[jax.Array, jax.Array]:
  """Per-channel ``(E[x], E[x^2])`` over all axes but the last; each (C,).

  ``use_native``: float32 sums by the native one-pass kernel (needs
  :func:`dropjax.xla_cpu.native.load`).
  """
  n = x.size // x.shape[-1]
  if x.dtype == jnp.float32 and use_native:
    s, s2 = native_channel_sums(x)
    return s / n, s2 / n
  return channel_sum(x) / n, channel_sum(x * x) / n


def _moments_fwd(x, use_native):
  return channel_moments(x, use_native), x


def _moments_bwd(use_native, x, cts):
  d_mean, d_mean2 = cts
  n = x.size // x.shape[-1]
  return ((d_mean + 2.0 * x * d_mean2) / n).astype(x.dtype),


channel_moments.defvjp(_moments_fwd, _moments_bwd)


def native_norm_act_forward(x: jax.Array, a: jax.Array, b: jax.Array,
                            residual: jax.Array | None) -> jax.Array:
  """``max(x * a + b + residual, 0)`` of float32 ``x`` (..., C), ``a``, ``b``
  (C,) and ``residual`` (``x``'s shape, or ``None``) in one native pass
  (``x * a + b`` one FMA).  Needs :func:`dropjax.xla_cpu.native.load`."""
  res = jnp.zeros((0,), jnp.float32) if residual is None else residual
  return jax.ffi.ffi_call(native.NORM_ACT_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="sequential")(x, a, b, res)


def native_norm_act_grad(dh: jax.Array, h: jax.Array, x: jax.Array
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``g = where(h > 0, dh, 0)`` and per-channel ``(sum g, sum g * x)`` of
  float32 ``dh``, ``h``, ``x`` (..., C), in one native pass (float64
  accumulation); ``g`` has ``dh``'s shape, the sums are (C,) float32.  Needs
  :func:`dropjax.xla_cpu.native.load`."""
  # The operands go in unreshaped: a reshape would let XLA recompute ``h`` (an
  # elementwise fusion) into a new buffer instead of passing the forward's.
  sums = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
  return tuple(jax.ffi.ffi_call(
      native.NORM_ACT_GRAD_TARGET, (jax.ShapeDtypeStruct(dh.shape, jnp.float32), sums, sums),
      vmap_method="sequential")(dh, h, x))


def _native(relu, use_native, *arrays) -> bool:
  """Whether the native kernels compute the ReLU form (all operands float32)."""
  return relu and use_native and all(v is None or v.dtype == jnp.float32 for v in arrays)


def _affine_act(x, a, b, residual, relu, use_native):
  if _native(relu, use_native, x, a, b, residual):
    return native_norm_act_forward(x, a, b, residual)
  y = x * a + b
  if residual is not None:
    y = y + residual
  return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def channel_affine_act(x: jax.Array, a: jax.Array, b: jax.Array, residual: jax.Array | None,
                       relu: bool, use_native: bool = False) -> jax.Array:
  """``max(x * a + b + residual, 0)`` (no max unless ``relu``; no residual if
  ``None``) with ``a, b`` of shape (C,) broadcast over ``x`` (..., C) and
  ``residual`` of ``x``'s shape.  ``use_native``: a float32 ReLU form and its
  backward pass by the native kernels (:func:`native_norm_act_forward`,
  :func:`native_norm_act_grad`; the same values up to float rounding)."""
  return _affine_act(x, a, b, residual, relu, use_native)


def _affine_act_fwd(x, a, b, residual, relu, use_native):
  h = _affine_act(x, a, b, residual, relu, use_native)
  # The ReLU's mask is h > 0 (the output: kept anyway as the next layer's input).
  has_residual = None if residual is None else jnp.zeros((0,), jnp.float32)
  return h, (x, a, h if relu else None, has_residual)


def _affine_act_bwd(relu, use_native, res, dh):
  x, a, h, has_residual = res
  if _native(relu, use_native, x, dh):
    g, d_b, d_a = native_norm_act_grad(dh, h, x)
  else:
    g = jnp.where(h > 0, dh, 0) if relu else dh  # relu' (0 at 0, as jax.nn.relu)
    d_b, d_a = channel_sum(g), channel_sum(g * x)
  return ((g * a).astype(x.dtype), d_a.astype(a.dtype), d_b.astype(a.dtype),
          None if has_residual is None else g)


channel_affine_act.defvjp(_affine_act_fwd, _affine_act_bwd)


def channel_affine(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``x * a + b`` with ``a, b`` of shape (C,) broadcast over ``x`` (..., C)
  (:func:`channel_affine_act` without residual and ReLU)."""
  return channel_affine_act(x, a, b, None, False)


class BatchNorm(nn.Module):
  """Drop-in for ``nn.BatchNorm`` over the last axis (params ``scale``/``bias``,
  statistics ``mean``/``var`` in the ``batch_stats`` collection, float32).

  Attributes:
    use_running_average: normalize with the running statistics (inference).
    momentum: running-average decay (Flax convention: 0.9 == PyTorch's 0.1).
    epsilon: added to the variance.
    dtype: output dtype (statistics are always computed in float32).
    axis_name: ``pmap`` axis over which batch statistics are averaged.
    native_moments: training statistics by the native one-pass kernel.
    native_norm_act: a call with ``relu=True`` and its backward pass by the
      native one-pass kernels.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: str | None = None
  native_moments: bool = False
  native_norm_act: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None,
               relu: bool = False) -> jax.Array:
    """``relu(norm(x) + residual)``: ``x`` (..., C); ``residual`` ``None`` or of
    ``x``'s shape; the ReLU only if ``relu``.  Returns ``x``'s shape, ``dtype``."""
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, mean2 = channel_moments(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                                    self.native_moments)
      if self.axis_name is not None and not self.is_initializing():
        mean, mean2 = jax.lax.pmean((mean, mean2), self.axis_name)
      var = jnp.maximum(0.0, mean2 - mean * mean)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * mul
    return channel_affine_act(x.astype(self.dtype), mul.astype(self.dtype),
                              shift.astype(self.dtype), residual, bool(relu), self.native_norm_act)


def conv_norm_act(conv: nn.Module, norm: nn.Module, x: jax.Array,
                  residual: jax.Array | None = None, relu: bool = True) -> jax.Array:
  """The values of :func:`dropjax.models.conv_norm_act` (``relu(norm(conv(x)) +
  residual)``), with this module's :class:`BatchNorm` adding the residual and
  applying the ReLU itself (one native pass, and one for its backward pass,
  where ``native_norm_act``); other norm modules compose as there."""
  if type(norm) is not BatchNorm:  # pylint: disable=unidiomatic-typecheck
    return models.conv_norm_act(conv, norm, x, residual, relu)
  return norm(conv(x), residual=residual, relu=relu)


__all__ = ["BatchNorm", "channel_sum", "channel_moments", "channel_affine", "channel_affine_act",
           "conv_norm_act"]
