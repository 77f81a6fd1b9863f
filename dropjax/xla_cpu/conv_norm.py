"""A convolution, inference batch norm, residual and ReLU in one native pass.

In inference (``use_running_average``) a batch norm is a per-channel affine
map, ``scale * (z - mean) / sqrt(var + eps) + bias``, so a block's
``relu(norm(conv(x)) + residual)`` is

    y = max(conv(x, w) * s + t + residual, 0),   s = scale / sqrt(var + eps),
                                                 t = bias - mean * s.

Composed from modules, XLA:CPU runs the native convolution and then one fused
elementwise loop that reads the convolution's output (and the residual) and
writes the activation again: 28% of an inference forward on the 2-core Xeon
(``benchmarks/README.md``, profile section).  Here the native kernel applies
``s``, ``t``, the residual and the ReLU to each tile of sums before it stores
it (``conv_forward.cc``, target :data:`dropjax.xla_cpu.native.FUSED_TARGET`),
so the activation is written once.

:func:`make_conv_norm_act` returns the layer :func:`dropjax.backend.resolve`
passes to the model's inference layers (``ModelLayers.conv_norm_act``); it
reads the convolution's and the norm's variables from the two modules and
falls back to the plain composition (:func:`dropjax.models.conv_norm_act`)
wherever the fused form does not apply (initialization, training-mode batch
norm, non-float32, convolutions the native kernel does not take, and modules
other than ``nn.Conv`` computing ``lax.conv_general_dilated`` and a batch norm:
a subclass or a user's own convolution is called as it is).  Values
equal the composition's up to float rounding.  Gradients (an attack's input
gradient, or any parameter's) come from a custom VJP that forms only the
cotangents asked for; reverse mode only, like :mod:`dropjax.xla_cpu.conv`.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from dropjax import models
from dropjax.xla_cpu import conv as conv_lib
from dropjax.xla_cpu import native
from dropjax.xla_cpu.batch_norm import BatchNorm, channel_sum

_NO_RESIDUAL = (0,)  # shape of the empty array that stands for "no residual"


def reference(x, w, scale, shift, residual, strides, pads, relu: bool):
  """The fused layer's values by XLA's ops: ``max(conv(x, w) * scale + shift
  + residual, 0)`` (residual ignored when empty, max only if ``relu``)."""
  y = conv_lib.xla_conv(x, w, strides, pads) * scale + shift
  if residual.size:
    y = y + residual
  return jnp.maximum(y, 0) if relu else y


@functools.lru_cache(maxsize=None)
def _fused_fn(strides, pads, relu: bool, avx512: bool):
  """``f(x, w, scale, shift, residual)`` by the native kernel, batchable by ``vmap``."""
  (sh, sw), ((pt, _), (pl, _)) = strides, pads
  attrs = dict(sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pl=np.int64(pl),
               isa=np.int64(512 if avx512 else 2), relu=np.int64(relu))

  def call(x, w, scale, shift, residual):
    out = jax.ShapeDtypeStruct(conv_lib.output_shape(x.shape, w.shape, strides, pads),
                               jnp.float32)
    return jax.ffi.ffi_call(native.FUSED_TARGET, out, vmap_method="sequential")(
        x, w, scale, shift, residual, **attrs)

  fn = jax.custom_batching.custom_vmap(call)

  @fn.def_vmap
  def _batched(axis_size, in_batched, x, w, scale, shift, residual):
    x_b, w_b, scale_b, shift_b, res_b = in_batched
    if w_b or scale_b or shift_b:  # per-example kernels or statistics: XLA's ops
      axes = tuple(0 if b else None for b in in_batched)
      ref = functools.partial(reference, strides=strides, pads=pads, relu=relu)
      return jax.vmap(ref, axes)(x, w, scale, shift, residual), True
    # One kernel for all (EOT masks): fold the vmapped axis into the images.
    if not x_b:
      x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    if residual.size == 0:
      residual = jnp.zeros(_NO_RESIDUAL, jnp.float32)
    else:
      if not res_b:
        residual = jnp.broadcast_to(residual, (axis_size,) + residual.shape)
      residual = residual.reshape((-1,) + residual.shape[2:])
    y = fn(x.reshape((-1,) + x.shape[2:]), w, scale, shift, residual)
    return y.reshape((axis_size, x.shape[1]) + y.shape[1:]), True

  return fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def conv_affine(x, w, scale, shift, residual, strides, pads, relu: bool,
                opts: conv_lib.ConvOptions):
  """``max(conv(x, w) * scale + shift + residual, 0)`` by the native kernel.

  ``x`` (B, H, W, Ci) float32, ``w`` HWIO, ``scale``/``shift`` (Co,),
  ``residual`` the output's shape (B, Ho, Wo, Co) or empty (shape (0,)) for
  none; ``relu``: apply the max.  ``strides`` (sh, sw) >= 1, ``pads``
  ((top, bottom), (left, right)) >= 0.  Needs
  :func:`dropjax.xla_cpu.native.load`; ``opts`` choose the tiles and the
  backward pass's kernels.
  """
  return _fused_fn(strides, pads, relu, opts.native_avx512)(x, w, scale, shift, residual)


def _marker(needed: bool):
  # The residuals' structure records which cotangents the backward pass forms.
  return jnp.zeros((0,), jnp.float32) if needed else None


def _conv_affine_fwd(x, w, scale, shift, residual, strides, pads, relu, opts):
  xv, wv, sv, tv, rv = (a.value for a in (x, w, scale, shift, residual))
  y = _fused_fn(strides, pads, relu, opts.native_avx512)(xv, wv, sv, tv, rv)
  need_dx, need_dw, need_ds = x.perturbed, w.perturbed, scale.perturbed
  keep_x = xv if (need_dw or need_ds) else None
  shape_of_x = jnp.zeros((0,) + xv.shape, xv.dtype) if need_dx else None
  markers = (_marker(need_dw), _marker(need_ds), _marker(shift.perturbed),
             _marker(residual.perturbed and rv.size > 0))
  return y, (wv, sv, y if relu else None, keep_x, shape_of_x, markers)


def _conv_affine_bwd(strides, pads, relu, opts, residuals, dy):
  w, scale, y, x, shape_of_x, (dw_m, ds_m, dt_m, dr_m) = residuals
  if isinstance(dy, SymbolicZero):
    return None, None, None, None, None
  g = dy if y is None else jnp.where(y > 0, dy, 0)  # relu' (0 at 0, as jax.nn.relu)
  d_residual = g if dr_m is not None else None
  d_shift = channel_sum(g) if dt_m is not None else None
  d_scale = None
  if ds_m is not None:
    z = conv_lib.convolve(x, w, strides, pads, None, opts)
    d_scale = channel_sum(g * z)
  dx, dw = None, None
  if shape_of_x is not None or dw_m is not None:
    dx, dw = conv_lib.conv_vjp(g * scale, w, None if shape_of_x is None else shape_of_x.shape[1:],
                               x if dw_m is not None else None, strides, pads, opts)
  return dx, dw, d_scale, d_shift, d_residual


conv_affine.defvjp(_conv_affine_fwd, _conv_affine_bwd, symbolic_zeros=True)


def _as_pair(v) -> tuple[int, int]:
  if v is None:
    return (1, 1)
  if isinstance(v, int):
    return (v, v)
  return tuple(int(a) for a in v)


def _plain_modules(conv, norm) -> bool:
  """Whether ``conv`` is a ``flax.linen.Conv`` computing ``lax.conv_general_dilated``
  (not a subclass, a masked or a user's own convolution) and ``norm`` a
  ``flax.linen.BatchNorm`` or dropjax's: the layers whose values the fused
  kernel reproduces from their variables alone."""
  # pylint: disable-next=unidiomatic-typecheck
  if type(conv) is not nn.Conv or type(norm) not in (nn.BatchNorm, BatchNorm):
    return False
  fn = conv.conv_general_dilated
  return (conv.mask is None and conv.conv_general_dilated_cls is None
          and (fn is None or fn is lax.conv_general_dilated
               or getattr(fn, "same_values_as_lax", False)))


def _fusable(conv, norm, x, residual) -> bool:
  """Whether the modules are a convolution and an inference batch norm the
  fused kernel computes exactly (up to rounding)."""
  if not _plain_modules(conv, norm):
    return False
  if conv.is_initializing() or not getattr(norm, "use_running_average", False):
    return False
  if x.dtype != jnp.float32 or x.ndim != 4:
    return False
  if any(getattr(m, "dtype", None) not in (None, jnp.float32) for m in (conv, norm)):
    return False
  if (conv.use_bias or conv.feature_group_count != 1 or _as_pair(conv.kernel_dilation) != (1, 1)
      or _as_pair(conv.input_dilation) != (1, 1)):
    return False
  # flax.linen.BatchNorm's options (dropjax's BatchNorm always has both, on the last axis).
  if not (getattr(norm, "use_scale", True) and getattr(norm, "use_bias", True)
          and getattr(norm, "axis", -1) in (-1, 3)):
    return False
  return residual is None or residual.dtype == jnp.float32


def _explicit_pads(padding, x_shape, w_shape, strides):
  """``((top, bottom), (left, right))`` >= 0 for a flax ``padding``, or ``None``
  where the kernel does not apply (circular padding, negative pads, ...)."""
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None
  elif not (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in padding)):
    return None
  pads = conv_lib.padding_pairs(padding, x_shape, w_shape, strides)
  return None if any(p < 0 for pair in pads for p in pair) else pads


def make_conv_norm_act(opts: conv_lib.ConvOptions) -> Callable:
  """The fused ``conv_norm_act(conv, norm, x, residual=None, relu=True)`` layer
  (signature of :func:`dropjax.models.conv_norm_act`) for convolution options
  ``opts`` (``opts.native_forward`` must be set: the kernels are loaded)."""
  if not opts.native_forward:
    raise ValueError("the fused conv-norm layer needs the native forward kernel")

  def conv_norm_act(conv, norm, x, residual=None, relu: bool = True):
    if not _fusable(conv, norm, x, residual):
      return models.conv_norm_act(conv, norm, x, residual, relu)
    w = conv.variables["params"]["kernel"]
    strides = _as_pair(conv.strides)
    pads = _explicit_pads(conv.padding, x.shape, w.shape, strides)
    if pads is None or w.dtype != jnp.float32:
      return models.conv_norm_act(conv, norm, x, residual, relu)
    if residual is not None and residual.shape != conv_lib.output_shape(x.shape, w.shape,
                                                                         strides, pads):
      return models.conv_norm_act(conv, norm, x, residual, relu)
    params, stats = norm.variables["params"], norm.variables["batch_stats"]
    s = params["scale"] * lax.rsqrt(stats["var"] + norm.epsilon)
    t = params["bias"] - stats["mean"] * s
    res = jnp.zeros(_NO_RESIDUAL, jnp.float32) if residual is None else residual
    return conv_affine(x, w, s, t, res, strides, pads, bool(relu), opts)

  return conv_norm_act
