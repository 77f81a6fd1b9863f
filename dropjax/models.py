"""CIFAR ResNets of He et al. (2016), Sec. 4.2, in Flax.

Exactly the architecture of the widely used PyTorch reference
(``resnet20/32/44/56/110``): a 3x3 stem conv with 16 filters, three stages of
``n`` basic blocks with 16/32/64 filters (depth ``6n + 2``), batch norm
(eps 1e-5, PyTorch momentum 0.1 == Flax momentum 0.9) before every ReLU,
option-A (parameter-free) shortcuts, global average pooling and a dense head.
Every 3x3 convolution pads one pixel on each side explicitly, like PyTorch's
``padding=1`` (XLA's ``'SAME'`` pads stride-2 convolutions asymmetrically),
so published PyTorch weights map one-to-one.  Convolutions carry no bias.

The model maps images ``(B, H, W, 3)`` (any float dtype; the project feeds
values in ``[-1, 1]``) to logits ``(B, num_classes)`` in float32, with no
built-in preprocessing.  How it sees dropped pixels is its ``input_encoding``:
``"values"`` (the paper: a dropped value is simply 0), ``"doubled"``
(randomized ablation, Levine & Feizi 2020: the stem takes ``2C`` channels
:func:`encode_doubled`, so ablated pixels differ from every real value) or
``"mean"`` (their other variant: an ablated pixel takes the training set's
mean, :func:`encode_mean`); for the last two the keep-mask is passed as ``keep``.

As in flax's ``examples/imagenet``, the layers are module attributes:
``conv`` (default ``nn.Conv``), ``norm`` (default ``nn.BatchNorm``),
``conv_norm_act`` (how a convolution, its batch norm, a residual and a ReLU
are applied together; default :func:`conv_norm_act`, the plain composition)
and ``block_input`` (applied to each residual block's input; default none).
The code that owns the devices passes faster equivalents where it has them
(:func:`dropjax.backend.resolve`); the parameters and their names are the
same whatever is passed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# PyTorch's kaiming_normal_ (fan_in, gain sqrt(2)), the He et al. init.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
PAD1 = ((1, 1), (1, 1))
INPUT_ENCODINGS = ("values", "doubled", "mean")


def encode_doubled(x, keep=None):
  """Levine & Feizi's ablation encoding: ``[v * M, (1 - v) * M]`` on the [0, 1]
  scale, ``v = (x + 1) / 2``.

  ``x`` (B, H, W, C) in [-1, 1]; ``keep`` 0/1 of shape (B, H, W, 1) or
  (B, H, W, C) (``None``: every pixel kept).  Returns (B, H, W, 2C): a kept
  pixel is ``[v, 1 - v]`` (its channels sum to 1), an ablated one ``[0, 0]``.
  """
  v = (x + 1) / 2
  if keep is None:
    return jnp.concatenate([v, 1 - v], axis=-1)
  keep = keep.astype(x.dtype)
  return jnp.concatenate([v * keep, (1 - v) * keep], axis=-1)


def encode_mean(x, keep, fill):
  """Levine & Feizi's mean encoding: an ablated pixel takes the dataset's mean.

  ``x`` (B, H, W, C) in [-1, 1]; ``keep`` 0/1 of shape (B, H, W, 1) or
  (B, H, W, C) (``None``: every pixel kept); ``fill`` C values in the units
  of X.  Returns (B, H, W, C): ``x`` where kept, ``fill`` where ablated.
  """
  if fill is None or len(fill) != x.shape[-1]:
    raise ValueError(f"the mean encoding needs one fill value per channel ({x.shape[-1]}), "
                     f"got {fill}")
  if keep is None:
    return x
  return jnp.where(keep.astype(bool), x, jnp.asarray(fill, x.dtype))


def conv_norm_act(conv: nn.Module, norm: nn.Module, x, residual=None, relu: bool = True):
  """``relu(norm(conv(x)) + residual)``: a convolution module, then its batch
  norm module, plus an optional ``residual`` (the output's shape), then a ReLU
  if ``relu``.  The model applies every convolution through this function (a
  module attribute), so a backend can pass one that computes the same values
  in one pass (:mod:`dropjax.xla_cpu.conv_norm`); the modules own the
  parameters either way."""
  y = norm(conv(x))
  if residual is not None:
    y = y + residual
  return nn.relu(y) if relu else y


@dataclasses.dataclass(frozen=True)
class ModelLayers:
  """What :class:`dropjax.models.CifarResNet` is built from.

  Attributes:
    conv: a ``flax.linen.Conv``-like module class (or partial).
    norm: a ``flax.linen.BatchNorm``-like module class (or partial).
    conv_norm_act: ``f(conv, norm, x, residual=None, relu=True)`` with the
      values of :func:`conv_norm_act` (the default).
    block_input: applied to each residual block's input (an identity in
      value); ``None`` for none.
  """
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  conv_norm_act: Callable = conv_norm_act
  block_input: Callable | None = None

  def as_kwargs(self) -> dict[str, Any]:
    return {"conv": self.conv, "norm": self.norm, "conv_norm_act": self.conv_norm_act,
            "block_input": self.block_input}


class BasicBlock(nn.Module):
  """Two 3x3 convs with an option-A shortcut: ``relu(bn(conv(relu(bn(conv(x))))) + x)``."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  conv_norm_act: Callable = conv_norm_act

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      # Option A: subsample by taking every other pixel, pad channels with zeros.
      shortcut = x[:, ::self.strides, ::self.strides, :]
      extra = self.filters - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0),
                                    (extra // 2, extra - extra // 2)))
    # relu(bn(conv(x))), then relu(bn(conv(y)) + shortcut).
    y = self.conv_norm_act(self.conv(self.filters, (3, 3), (self.strides, self.strides)),
                           self.norm(), x)
    return self.conv_norm_act(self.conv(self.filters, (3, 3)), self.norm(), y,
                              residual=shortcut)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs.

  Attributes:
    depth: 6n + 2 (20, 32, 44, 56, 110, ...).
    num_classes: output size (10 for CIFAR-10, 43 for GTSRB).
    width: filters of the first stage (16 in He et al.); stages use w, 2w, 4w.
    dtype: compute dtype (``jnp.bfloat16`` for GPU/TPU); params stay float32.
    bn_axis_name: ``pmap`` axis over which batch-norm statistics are averaged.
    conv: convolution module (``nn.Conv`` signature).
    norm: batch-norm module (``nn.BatchNorm`` signature).
    conv_norm_act: applies a conv, its norm, a residual and a ReLU
      (:func:`conv_norm_act`, the default, or a fused equivalent).
    block_input: function applied to each residual block's input; it must
      return its argument's values (e.g. a compiler fusion barrier).
    input_encoding: ``"values"`` (``x * keep``; 3-channel stem),
      ``"doubled"`` (:func:`encode_doubled`; 6-channel stem) or ``"mean"``
      (:func:`encode_mean` with ``fill``; 3-channel stem).
    fill: ``"mean"`` encoding: the per-channel value of an ablated pixel, in
      the units of X (the training set's mean: ``2 * mean - 1``).
  """
  depth: int = 20
  num_classes: int = 10
  width: int = 16
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  conv_norm_act: Callable = conv_norm_act
  block_input: Callable | None = None
  input_encoding: str = "values"
  fill: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, keep=None):
    """``x`` (B, H, W, C) in [-1, 1]; ``keep`` an optional 0/1 keep-mask
    (B, H, W, 1) or (B, H, W, C) of the pixels shown (``None``: all)."""
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {self.depth}")
    if x.ndim != 4:
      raise ValueError(f"expected images of shape (B, H, W, C), got {x.shape}")
    if self.input_encoding not in INPUT_ENCODINGS:
      raise ValueError(f"unknown input encoding {self.input_encoding!r}; choose one of "
                       f"{INPUT_ENCODINGS}")
    if self.input_encoding == "doubled":
      x = encode_doubled(x, keep)
    elif self.input_encoding == "mean":
      x = encode_mean(x, keep, self.fill)
    elif keep is not None:
      x = x * keep.astype(x.dtype)
    n = (self.depth - 2) // 6
    conv = functools.partial(self.conv, padding=PAD1, use_bias=False,
                             kernel_init=he_normal, dtype=self.dtype)
    norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype,
                             axis_name=self.bn_axis_name if train else None)
    x = x.astype(self.dtype)
    x = self.conv_norm_act(conv(self.width, (3, 3), name="stem"), norm(name="stem_bn"), x)
    for stage in range(3):
      for block in range(n):
        strides = 2 if stage > 0 and block == 0 else 1
        if self.block_input is not None:
          x = self.block_input(x)
        x = BasicBlock(self.width * 2 ** stage, strides, conv, norm, self.conv_norm_act,
                       name=f"stage{stage + 1}_block{block + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=he_normal, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # f32 (f64 in x64 tests)


def resnet(depth: int, num_classes: int, *, width: int = 16, half_precision: bool = False,
           bn_axis_name: str | None = None, conv: ModuleDef = nn.Conv,
           norm: ModuleDef = nn.BatchNorm, conv_norm_act: Callable = conv_norm_act,
           block_input: Callable | None = None, input_encoding: str = "values",
           fill: tuple[float, ...] | None = None) -> CifarResNet:
  """Builds a CIFAR ResNet; ``half_precision`` computes in bfloat16."""
  return CifarResNet(depth=depth, num_classes=num_classes, width=width,
                     dtype=jnp.bfloat16 if half_precision else jnp.float32,
                     bn_axis_name=bn_axis_name, conv=conv, norm=norm,
                     conv_norm_act=conv_norm_act, block_input=block_input,
                     input_encoding=input_encoding,
                     fill=None if fill is None else tuple(float(v) for v in fill))
