"""A drop-in ``lax.conv_general_dilated`` that is faster on XLA:CPU.

:func:`make_conv_general_dilated` returns it for one set of
:class:`ConvOptions` (chosen by :func:`dropjax.backend.resolve`, never read
from the environment here).

Three places where XLA:CPU is slow for the CIFAR ResNet shapes
(``benchmarks/README.md``):

* **convolutions and their input gradients**: the AVX2 kernel of
  :mod:`dropjax.xla_cpu.native` (``conv_forward.cc``) runs them 1.1-2.2x faster than
  XLA's convolution for 16-64 channels and ~6x faster for the 3-channel stem
  (:func:`native_conv`, ``ConvOptions.native_forward``); on a CPU with
  AVX-512F both native kernels run AVX-512 tiles (``ConvOptions.native_avx512``),
  bit-identical to their AVX2 ones.  An input gradient of a stride-1 convolution is the
  stride-1 convolution of the output gradient with the flipped kernel, and the
  polyphase input gradient below is made of stride-1 convolutions too, so all
  of them use it (otherwise XLA's convolution).

* **weight gradient**: XLA:CPU transposes the input and the output gradient
  to channel-major layouts and runs a forward convolution (about half the
  forward speed, plus the transposes).  Here the AVX2 kernel of
  :mod:`dropjax.xla_cpu.native` reads the NHWC operands as they are
  (:func:`weight_grad`), when ``ConvOptions.native_weight_grad`` is set and
  the output channels are a multiple of 8; otherwise XLA's weight gradient.
* **input gradient of a strided convolution**: XLA's form (a convolution of
  a dilated input) runs ~3x slower than the same sums written as one small
  stride-1 convolution per phase (:func:`input_grad_polyphase`,
  ``ConvOptions.polyphase``).

Gradients are formed only for the arguments being differentiated (symbolic
zeros), so an attack, which differentiates the input only, never runs the
weight-gradient kernel.  It applies to float32, NHWC input, HWIO kernel, no
dilation, no feature groups, non-negative padding, and falls back to
``lax.conv_general_dilated`` otherwise.  Results equal XLA's up to float
rounding (summation order); the native kernel's sums are deterministic.
Reverse mode only (``jax.grad``/``vjp``), like :mod:`dropjax.xla_cpu.batch_norm`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from dropjax.xla_cpu import fusion, native

_NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class ConvOptions:
  """Which fast paths a convolution takes (all off: XLA's convolution and gradients).

  Attributes:
    native_forward: forward convolutions and stride-1 input gradients by the
      native kernel (needs :func:`dropjax.xla_cpu.native.load`).
    native_weight_grad: weight gradients by the native kernel (output
      channels a multiple of 8; needs the kernels loaded).
    polyphase: input gradients of strided convolutions as one stride-1
      convolution per phase.
    input_barrier: the input passes a :func:`dropjax.xla_cpu.fusion.fusion_barrier`
      first (training: keeps XLA:CPU from fusing the producer chain into the
      weight-gradient transposes).
    native_avx512: the native kernels run their AVX-512 tiles (the CPU must
      have AVX-512F: :func:`dropjax.xla_cpu.native.has_avx512`); their results
      are bit-identical to the AVX2 tiles'.
  """
  native_forward: bool = False
  native_weight_grad: bool = False
  polyphase: bool = True
  input_barrier: bool = False
  native_avx512: bool = False


def padding_pairs(padding, lhs_shape, rhs_shape, strides):
  """``((top, bottom), (left, right))`` for a ``padding`` string or pairs."""
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
  return len(pads) == 2 and all(p >= 0 for pair in pads for p in pair)


def xla_conv(x, w, strides, pads, precision=None):
  """XLA's NHWC / HWIO convolution with explicit ``pads``."""
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


def output_shape(x_shape, w_shape, strides, pads) -> tuple[int, int, int, int]:
  """(B, Ho, Wo, Co) of the convolution of NHWC ``x_shape`` with HWIO ``w_shape``."""
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  return (x_shape[0], (x_shape[1] + pt + pb - w_shape[0]) // sh + 1,
          (x_shape[2] + pl + pr - w_shape[1]) // sw + 1, w_shape[3])


@functools.lru_cache(maxsize=None)
def _native_conv_fn(strides, pads, avx512: bool):
  """``f(x, w)``: the native convolution with ``strides``, ``pads``, batchable by ``vmap``."""
  (sh, sw), ((pt, _), (pl, _)) = strides, pads
  isa = np.int64(512 if avx512 else 2)

  def call(x, w):
    out = jax.ShapeDtypeStruct(output_shape(x.shape, w.shape, strides, pads), jnp.float32)
    return jax.ffi.ffi_call(native.FORWARD_TARGET, out, vmap_method="sequential")(
        x, w, sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pl=np.int64(pl), isa=isa)

  fn = jax.custom_batching.custom_vmap(call)

  @fn.def_vmap
  def _batched(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if w_batched:  # a kernel per batch element (e.g. per-example weights): XLA's
      x_axis = 0 if x_batched else None
      return jax.vmap(lambda a, b: xla_conv(a, b, strides, pads), (x_axis, 0))(x, w), True
    # One kernel for all: fold the vmapped axis into the images (EOT masks).
    y = fn(x.reshape((-1,) + x.shape[2:]), w)
    return y.reshape((axis_size, x.shape[1]) + y.shape[1:]), True

  return fn


def native_conv(x: jax.Array, w: jax.Array, strides, pads, *, avx512: bool = False) -> jax.Array:
  """Convolution by the native kernel: ``x`` (B, H, W, Ci), ``w`` HWIO, float32.

  ``strides`` = (sh, sw) >= 1, ``pads`` = ((top, bottom), (left, right)), all
  >= 0.  Returns (B, (H + top + bottom - KH) // sh + 1, ..., Co) float32, equal
  to ``lax.conv_general_dilated`` up to float rounding; every output is one
  sum in a fixed order (deterministic).  It computes in full float32 whatever
  ``precision`` the caller asked XLA for.  ``avx512``: the AVX-512 tiles
  (same values bit for bit; an error on a CPU without AVX-512F).  Needs
  :func:`dropjax.xla_cpu.native.load`.
  """
  strides = tuple(int(s) for s in strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if any(p < 0 for pair in pads for p in pair) or any(s < 1 for s in strides):
    raise ValueError(f"native_conv needs strides >= 1 and non-negative padding, "
                     f"got {strides}, {pads}")
  return _native_conv_fn(strides, pads, bool(avx512))(x, w)


def convolve(x, w, strides, pads, precision, opts: ConvOptions):
  """The convolution: native when ``opts`` say so, else XLA's."""
  if opts.native_forward:
    return native_conv(x, w, strides, pads, avx512=opts.native_avx512)
  return xla_conv(x, w, strides, pads, precision)


def weight_grad(x: jax.Array, dy: jax.Array, kernel_shape, strides, pads, *,
                avx512: bool = False) -> jax.Array:
  """Native weight gradient: ``x`` (B, H, W, Ci), ``dy`` (B, Ho, Wo, Co) f32 -> HWIO.

  ``pads`` are the forward convolution's ((top, bottom), (left, right)); only
  top and left matter (``dy``'s shape fixes the rest).  ``avx512``: the
  AVX-512 tiles (bit-identical results; an error on a CPU without AVX-512F).
  """
  call = jax.ffi.ffi_call(native.TARGET,
                          jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                          vmap_method="sequential")
  return call(x, dy, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
              ph=np.int64(pads[0][0]), pw=np.int64(pads[1][0]),
              isa=np.int64(512 if avx512 else 2))


def _phase_taps(stride: int, pad: int, size: int) -> list[list[tuple[int, int]]]:
  """Per input phase ``a`` (index ``i = stride*m + a``): the taps ``t`` that reach
  it and the offset ``d`` of the output they come from (``o = m + d``)."""
  return [[(t, (a + pad - t) // stride) for t in range(size) if (a + pad - t) % stride == 0]
          for a in range(stride)]


def _polyphase_ok(x_shape, w_shape, strides) -> bool:
  """Can the polyphase input gradient be used for these shapes?"""
  if strides == (1, 1):
    return False
  if x_shape[1] % strides[0] or x_shape[2] % strides[1]:
    return False
  return all(strides[i] <= w_shape[i] for i in range(2))


def input_grad_polyphase(dy: jax.Array, w: jax.Array, strides, pads, x_shape,
                         opts: ConvOptions = ConvOptions()) -> jax.Array:
  """Input gradient of a strided convolution as ``s_h * s_w`` stride-1 convolutions.

  Input pixel ``(s_h*m + a, s_w*n + b)`` receives contributions only from the
  kernel taps congruent to its phase ``(a, b)``, so the gradient splits into
  one small stride-1 convolution of ``dy`` per phase, interleaved afterwards.
  XLA:CPU lowers the usual form (a convolution with a dilated input) to a
  much slower kernel (``benchmarks/README.md``); the sums are the same.
  Needs ``H % s_h == W % s_w == 0``; ``dy`` (B, Ho, Wo, Co), ``w`` HWIO ->
  (B, H, W, Ci).
  """
  b, h, wd, ci = x_shape
  (sh, sw), ho, wo = strides, dy.shape[1], dy.shape[2]
  mh, mw = h // sh, wd // sw
  rows = _phase_taps(sh, pads[0][0], w.shape[0])
  cols = _phase_taps(sw, pads[1][0], w.shape[1])
  w_t = jnp.swapaxes(w, 2, 3)  # (kh, kw, co, ci): dy's channels in, x's out
  phases = []
  for taps_r in rows:
    row = []
    for taps_c in cols:
      if not taps_r or not taps_c:
        row.append(jnp.zeros((b, mh, mw, ci), dy.dtype))
        continue
      r0, r1 = min(d for _, d in taps_r), max(d for _, d in taps_r)
      c0, c1 = min(d for _, d in taps_c), max(d for _, d in taps_c)
      k = jnp.zeros((r1 - r0 + 1, c1 - c0 + 1) + w_t.shape[2:], w.dtype)
      for t, d in taps_r:
        for u, e in taps_c:
          k = k.at[d - r0, e - c0].set(w_t[t, u])
      # out[m] = sum_j dy[m + r0 + j] k[j]: padding (-r0, mh - ho + r1), where a
      # negative amount is a crop (done by slicing: negative conv padding
      # gave wrong results on XLA:CPU).
      lo_hi = ((-r0, mh - ho + r1), (-c0, mw - wo + c1))
      src = dy[:, max(0, r0):ho - max(0, -lo_hi[0][1]), max(0, c0):wo - max(0, -lo_hi[1][1])]
      conv_pads = tuple((max(0, lo), max(0, hi)) for lo, hi in lo_hi)
      row.append(convolve(src, k, (1, 1), conv_pads, None, opts))
    phases.append(jnp.stack(row))
  out = jnp.stack(phases)  # (sh, sw, B, mh, mw, ci)
  return out.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, wd, ci)


def _input_grad(dy, w, strides, pads, precision, x_shape, opts: ConvOptions):
  kh, kw = w.shape[:2]
  flipped_pads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
                  (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  if (tuple(strides) == (1, 1) and opts.native_forward
      and all(p >= 0 for pair in flipped_pads for p in pair)):
    # dx = dy convolved with the kernel rotated by 180 degrees, channels swapped.
    return native_conv(dy, jnp.swapaxes(w[::-1, ::-1], 2, 3), (1, 1), flipped_pads,
                       avx512=opts.native_avx512)
  if opts.polyphase and _polyphase_ok(x_shape, w.shape, strides):
    return input_grad_polyphase(dy, w, strides, pads, x_shape, opts)
  _, vjp = jax.vjp(lambda v: xla_conv(v, w, strides, pads, precision),
                   jnp.zeros(x_shape, dy.dtype))
  return vjp(dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, opts):
  return convolve(x, w, strides, pads, precision, opts)


def _conv_fwd(x, w, strides, pads, precision, opts):
  # symbolic_zeros: x and w arrive as CustomVJPPrimal(value, perturbed); the
  # residual's structure records which gradients the backward pass must form,
  # so an attack (gradient w.r.t. x only) never runs the weight-gradient kernel.
  # An empty (0, *x.shape) array carries x's shape when only dx is needed.
  x_val, w_val = x.value, w.value
  out = convolve(x_val, w_val, strides, pads, precision, opts)
  shape_of_x = jnp.zeros((0,) + x_val.shape, x_val.dtype) if x.perturbed else None
  return out, (w_val, shape_of_x, x_val if w.perturbed else None)


def conv_vjp(dy: jax.Array, w: jax.Array, x_shape, x: jax.Array | None, strides, pads,
             opts: ConvOptions, precision=None) -> tuple[jax.Array | None, jax.Array | None]:
  """The convolution's ``(dx, dw)`` for output gradient ``dy`` (B, Ho, Wo, Co).

  ``dx`` (shape ``x_shape``) when ``x_shape`` is given, ``dw`` (HWIO) when the
  input ``x`` is; ``None`` for the other.  By the fast paths of ``opts``.
  """
  dx = None if x_shape is None else _input_grad(dy, w, strides, pads, precision, x_shape, opts)
  if x is None:
    dw = None
  elif opts.native_weight_grad and w.shape[-1] % 8 == 0:
    dw = weight_grad(x, dy, w.shape, strides, pads, avx512=opts.native_avx512)
  else:
    dw = jax.vjp(lambda v: xla_conv(x, v, strides, pads, precision), w)[1](dy)[0]
  return dx, dw


def _conv_bwd(strides, pads, precision, opts, residuals, dy):
  w, shape_of_x, x = residuals
  if isinstance(dy, SymbolicZero):
    return None, None
  return conv_vjp(dy, w, None if shape_of_x is None else shape_of_x.shape[1:], x, strides,
                  pads, opts, precision)


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def make_conv_general_dilated(opts: ConvOptions) -> Callable:
  """``lax.conv_general_dilated`` with the fast paths of ``opts`` where they apply.

  The returned function has ``lax.conv_general_dilated``'s signature (pass it
  as ``flax.linen.Conv(conv_general_dilated=...)``).  Unsupported cases
  (module docstring), and every case when no fast path is on, are XLA's
  convolution exactly.
  """
  fast = opts.native_forward or opts.native_weight_grad or opts.polyphase

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, batch_group_count=1, precision=None,
                           preferred_element_type=None):
    if opts.input_barrier:
      lhs = fusion.fusion_barrier(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    pads = padding_pairs(padding, lhs.shape, rhs.shape, strides)
    if fast and _supported(lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, batch_group_count, preferred_element_type):
      return _conv(lhs, rhs, strides, pads, precision, opts)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)

  # Marks a convolution with lax.conv_general_dilated's values (up to rounding),
  # which dropjax.xla_cpu.conv_norm's fused layer may compute in its place.
  conv_general_dilated.same_values_as_lax = True
  return conv_general_dilated
