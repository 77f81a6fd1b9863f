"""He et al.'s CIFAR ResNets as published in PyTorch, loaded as dropjax variables.

The widely used PyTorch reference of He et al. (2016), Sec. 4.2 (Y. Idelbayev,
``pytorch_resnet_cifar10``: ``resnet20`` ... ``resnet1202``, option-A
shortcuts; ResNet-20 at 91.7% CIFAR-10 test accuracy) names its tensors
``conv1``, ``bn1``, ``layer{s}.{b}.conv{1,2}`` / ``bn{1,2}`` and ``linear``.
:class:`dropjax.models.CifarResNet` has exactly these tensors under its own
names, so a published ``state_dict`` maps one-to-one onto dropjax variables:
convolution kernels OIHW -> HWIO, the dense kernel (out, in) -> (in, out),
batch norm ``weight / bias / running_mean / running_var`` -> ``scale / bias /
mean / var``.  Nothing here imports PyTorch: pass the state dict as arrays
(``{k: v.numpy() for k, v in torch.load(path)["state_dict"].items()}``).

Those weights were trained on inputs normalized per channel with ImageNet
statistics (:data:`REFERENCE_MEAN`, :data:`REFERENCE_STD` on the [0, 1] scale),
not on dropjax's X in [-1, 1]; :func:`reference_input` builds that input.  They
serve to check the architecture against a published accuracy
(``experiments/published_resnets.py``), not as a pixel-dropping model.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import numpy as np

from dropjax import models

# Per-channel input statistics of the reference's training, [0, 1] scale (RGB).
REFERENCE_MEAN = (0.485, 0.456, 0.406)
REFERENCE_STD = (0.229, 0.224, 0.225)

_BN_LEAF = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED = ("num_batches_tracked",)
_STEM = re.compile(r"(conv1|bn1)\.(\w+)$")
_BLOCK = re.compile(r"layer([123])\.(\d+)\.(conv|bn)([12])\.(\w+)$")
_HEAD = re.compile(r"linear\.(weight|bias)$")


def _target(name: str) -> tuple[str, tuple[str, ...], str]:
  """``(collection, path, kind)`` of one reference tensor name; ``kind`` says
  how its array is laid out ("conv", "dense" or "vector")."""
  if m := _HEAD.match(name):
    return "params", ("head", "kernel" if m[1] == "weight" else "bias"), (
        "dense" if m[1] == "weight" else "vector")
  if m := _STEM.match(name):
    layer, leaf = m[1], m[2]
    if layer == "conv1" and leaf == "weight":
      return "params", ("stem", "kernel"), "conv"
    if layer == "bn1" and leaf in _BN_LEAF:
      return ("batch_stats" if leaf.startswith("running") else "params",
              ("stem_bn", _BN_LEAF[leaf]), "vector")
  elif m := _BLOCK.match(name):
    stage, block, kind, index, leaf = m[1], int(m[2]), m[3], int(m[4]), m[5]
    scope = f"stage{stage}_block{block + 1}"
    if kind == "conv" and leaf == "weight":
      return "params", (scope, f"Conv_{index - 1}", "kernel"), "conv"
    if kind == "bn" and leaf in _BN_LEAF:
      return ("batch_stats" if leaf.startswith("running") else "params",
              (scope, f"BatchNorm_{index - 1}", _BN_LEAF[leaf]), "vector")
  raise ValueError(f"{name!r} is not a tensor of the PyTorch CIFAR ResNet reference")


def _layout(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    if array.ndim != 4:
      raise ValueError(f"a convolution kernel is OIHW (4-d), got shape {array.shape}")
    return np.transpose(array, (2, 3, 1, 0))
  if kind == "dense":
    if array.ndim != 2:
      raise ValueError(f"a linear weight is (out, in), got shape {array.shape}")
    return array.T
  if array.ndim != 1:
    raise ValueError(f"expected a vector, got shape {array.shape}")
  return array


def variables_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """dropjax variables of a published PyTorch CIFAR ResNet.

  Args:
    state_dict: tensor name -> array (numpy or anything ``np.asarray`` takes),
      as the reference saves it; a ``module.`` prefix (``DataParallel``) and
      ``num_batches_tracked`` buffers are accepted and ignored.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (float32 numpy leaves) for
    ``dropjax.models.resnet(depth, num_classes)``, depth ``6n + 2`` with ``n``
    the blocks per stage found, ``num_classes`` the head's outputs.

  Raises:
    ValueError: a name the reference does not have, a tensor of the wrong
      rank, or a tensor the architecture needs that is missing.
  """
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for name, value in state_dict.items():
    name = name.removeprefix("module.")
    if name.rsplit(".", 1)[-1] in _IGNORED:
      continue
    collection, path, kind = _target(name)
    tree = out[collection]
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    if path[-1] in tree:
      raise ValueError(f"{name!r} given twice")
    tree[path[-1]] = np.asarray(_layout(np.asarray(value, np.float32), kind))
  blocks = {k for k in out["params"] if k.startswith("stage")}
  if "head" not in out["params"] or "bias" not in out["params"]["head"] or len(blocks) % 3:
    raise ValueError("not a complete CIFAR ResNet: the head (linear.weight, linear.bias) or "
                     f"blocks are missing (blocks found: {sorted(blocks)})")
  depth, num_classes = architecture(out)
  want = _shapes(jax.eval_shape(functools.partial(
      models.resnet(depth, num_classes).init, jax.random.key(0)), np.zeros((1, 32, 32, 3))))
  got = _shapes(out)
  if got != want:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    raise ValueError(f"not a ResNet-{depth} with {num_classes} classes: missing {missing}, "
                     f"unexpected {extra}, wrong shapes {[(k, got[k], want[k]) for k in wrong]}")
  return out


def architecture(variables: Mapping) -> tuple[int, int]:
  """``(depth, num_classes)`` of CIFAR ResNet ``variables``: depth ``6n + 2``
  from the residual blocks (``n`` per stage), classes from the head."""
  blocks = sum(1 for k in variables["params"] if k.startswith("stage"))
  return 6 * (blocks // 3) + 2, variables["params"]["head"]["bias"].shape[0]


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}


def reference_input(images: np.ndarray) -> np.ndarray:
  """The input the published weights expect: uint8 images (B, H, W, 3) in
  [0, 255] -> float32 (B, H, W, 3), per channel ``(v - mean) / std`` with ``v``
  on the [0, 1] scale."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 RGB images (B, H, W, 3), got {images.dtype} "
                     f"{images.shape}")
  v = images.astype(np.float32) / 255.0
  return ((v - np.asarray(REFERENCE_MEAN, np.float32)) / np.asarray(REFERENCE_STD, np.float32))
