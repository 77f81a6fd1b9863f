"""CIFAR ResNets of He et al. (2016), Sec. 4.2, in Flax.

Exactly the architecture of the widely used PyTorch reference
(``resnet20/32/44/56/110``): a 3x3 stem conv with 16 filters, three stages of
``n`` basic blocks with 16/32/64 filters (depth ``6n + 2``), batch norm
(eps 1e-5, PyTorch momentum 0.1 == Flax momentum 0.9; :mod:`dropjax.batch_norm`,
the same layer as ``nn.BatchNorm`` with faster reductions) before every ReLU,
option-A (parameter-free) shortcuts, global average pooling and a dense head.
Every 3x3 convolution pads one pixel on each side explicitly, like PyTorch's
``padding=1`` (XLA's ``'SAME'`` pads stride-2 convolutions asymmetrically),
so published PyTorch weights map one-to-one.  Convolutions carry no bias.

The model maps images ``(B, H, W, 3)`` (any float dtype; the project feeds
values in ``[-1, 1]``) to logits ``(B, num_classes)`` in float32, with no
built-in preprocessing.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from dropjax import backend, fusion
from dropjax import conv as conv_lib
from dropjax.batch_norm import BatchNorm

# PyTorch's kaiming_normal_ (fan_in, gain sqrt(2)), the He et al. init.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
PAD1 = ((1, 1), (1, 1))


class BasicBlock(nn.Module):
  """Two 3x3 convs with an option-A shortcut."""
  filters: int
  strides: int
  norm: Any
  dtype: Any = jnp.float32
  conv_fn: Any = lax.conv_general_dilated

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=PAD1,
                             use_bias=False, kernel_init=he_normal,
                             dtype=self.dtype, conv_general_dilated=self.conv_fn)
    y = conv(self.filters, strides=(self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters)(y)
    y = self.norm()(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      # Option A: subsample by taking every other pixel, pad channels with zeros.
      shortcut = x[:, ::self.strides, ::self.strides, :]
      extra = self.filters - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0),
                                    (extra // 2, extra - extra // 2)))
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs.

  Attributes:
    depth: 6n + 2 (20, 32, 44, 56, 110, ...).
    num_classes: output size (10 for CIFAR-10, 43 for GTSRB).
    width: filters of the first stage (16 in He et al.); stages use w, 2w, 4w.
    dtype: compute dtype (``jnp.bfloat16`` for GPU/TPU); params stay float32.
    bn_axis_name: ``pmap`` axis over which batch-norm statistics are averaged.
  """
  depth: int = 20
  num_classes: int = 10
  width: int = 16
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {self.depth}")
    if x.ndim != 4:
      raise ValueError(f"expected images of shape (B, H, W, C), got {x.shape}")
    n = (self.depth - 2) // 6
    norm = functools.partial(
        BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5, dtype=self.dtype, axis_name=self.bn_axis_name if train else None)
    # On CPU, convolutions take faster gradients (dropjax.conv) and, in
    # training, read their input through a fusion barrier (dropjax.fusion).
    conv_fn = conv_lib.conv_general_dilated if backend.cpu_conv() else lax.conv_general_dilated
    if backend.barrier_conv_inputs(train):
      conv_fn = functools.partial(fusion.conv_general_dilated, conv_fn=conv_fn)
    x = x.astype(self.dtype)
    stem = nn.Conv(self.width, (3, 3), padding=PAD1, use_bias=False,
                   kernel_init=he_normal, dtype=self.dtype, name="stem",
                   conv_general_dilated=conv_fn)
    x = stem(x)
    x = nn.relu(norm(name="stem_bn")(x))
    stream_barrier = backend.barrier_block_inputs(train)
    for stage in range(3):
      for block in range(n):
        strides = 2 if stage > 0 and block == 0 else 1
        if stream_barrier:  # one materialized block input for its conv, shortcut and backward
          x = fusion.fusion_barrier(x, stem.variables["params"]["kernel"])
        x = BasicBlock(self.width * 2 ** stage, strides, norm, self.dtype, conv_fn,
                       name=f"stage{stage + 1}_block{block + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=he_normal, dtype=self.dtype,
                 name="head")(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # f32 (f64 in x64 tests)


def resnet(depth: int, num_classes: int, *, width: int = 16,
           half_precision: bool = False, bn_axis_name: str | None = None
           ) -> CifarResNet:
  """Builds a CIFAR ResNet; ``half_precision`` computes in bfloat16."""
  return CifarResNet(depth=depth, num_classes=num_classes, width=width,
                     dtype=jnp.bfloat16 if half_precision else jnp.float32,
                     bn_axis_name=bn_axis_name)
