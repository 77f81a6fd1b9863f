"""A drop-in ``lax.conv_general_dilated`` whose weight gradient runs natively on CPU.

XLA:CPU computes a convolution's weight gradient from channel-major
transposed copies of the input and of the output gradient, at roughly half
the speed of the forward convolution, plus the transposes themselves
(``benchmarks/README.md``).  :func:`conv_general_dilated` has the same
forward pass and input gradient as ``lax.conv_general_dilated`` (both XLA's)
and computes the weight gradient with the AVX2 kernel of
:mod:`dropjax.native`, which reads the NHWC operands as they are.

It applies to the case the CIFAR ResNets use — float32, NHWC input, HWIO
kernel, no dilation, no feature groups, non-negative padding, output channels
a multiple of 8 — and falls back to ``lax.conv_general_dilated`` for anything
else or when the kernel is unavailable (:func:`native_available`).  The
results equal XLA's up to float rounding (summation order); the kernel's own
sums are deterministic.  Reverse mode only (``jax.grad``/``vjp``), like
:mod:`dropjax.batch_norm`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dropjax import native

_NHWC = ("NHWC", "HWIO", "NHWC")


def native_available() -> bool:
  """Whether the native weight-gradient kernel can run in this process."""
  return jax.default_backend() == "cpu" and native.conv_weight_grad_target() is not None


def _pairs(padding, lhs_shape, rhs_shape, strides):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _supported(lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, preferred_element_type) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return False
  if preferred_element_type not in (None, jnp.float32):
    return False
  if feature_group_count != 1 or batch_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  if dimension_numbers is None:
    return False
  if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return False
  if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
    return False
  return rhs.shape[-1] % 8 == 0 and native_available()


def _forward(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


def weight_grad(x: jax.Array, dy: jax.Array, kernel_shape, strides, pads) -> jax.Array:
  """Native weight gradient: ``x`` (B, H, W, Ci), ``dy`` (B, Ho, Wo, Co) f32 -> HWIO.

  ``pads`` are the forward convolution's ((top, bottom), (left, right)); only
  top and left matter (``dy``'s shape fixes the rest).
  """
  call = jax.ffi.ffi_call(native.TARGET,
                          jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                          vmap_method="sequential")
  return call(x, dy, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
              ph=np.int64(pads[0][0]), pw=np.int64(pads[1][0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
  return _forward(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision):
  return _forward(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda v: _forward(v, w, strides, pads, precision), x)
  (dx,) = input_vjp(dy)
  return dx, weight_grad(x, dy, w.shape, strides, pads)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """``lax.conv_general_dilated`` with the native weight gradient where it applies."""
  strides = tuple(int(s) for s in window_strides)
  pads = _pairs(padding, lhs.shape, rhs.shape, strides)
  if _supported(lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, preferred_element_type):
    return _conv(lhs, rhs, strides, pads, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
