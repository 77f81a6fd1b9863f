"""Batched, padded inference over whole splits (no example is ever dropped).

The last partial batch is padded to the batch size (so one compiled program
serves every batch) and the padding is cut off the outputs.
"""
from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np

from dropjax import masks
from dropjax.data import augment


def padded_batches(arrays: dict[str, np.ndarray],
                   batch_size: int) -> Iterator[tuple[dict, int]]:
  """Yields ``(batch, n_valid)``; each batch has ``batch_size`` rows plus ``index``."""
  n = len(next(iter(arrays.values())))
  for lo in range(0, n, batch_size):
    hi = min(lo + batch_size, n)
    idx = np.arange(lo, lo + batch_size)
    idx_c = np.minimum(idx, hi - 1)
    batch = {k: v[idx_c] for k, v in arrays.items()}
    batch["index"] = idx.astype(np.int32)
    yield batch, hi - lo


def map_batches(fn: Callable[[dict], dict], arrays: dict[str, np.ndarray], batch_size: int,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
  """Applies ``fn(batch) -> dict of (B, ...) arrays`` and concatenates the outputs."""
  outs: dict[str, list] = {}
  for batch, n_valid in padded_batches(arrays, batch_size):
    for k, v in fn(batch).items():
      outs.setdefault(k, []).append(np.asarray(v)[:n_valid])
    if progress:
      progress(n_valid)
  return {k: np.concatenate(v) for k, v in outs.items()}


def make_predict(logits_fn: Callable, drop: masks.DropSpec = masks.DropSpec(), *,
                 pass_mask: bool = False) -> Callable:
  """Jitted ``predict(variables, batch, key) -> {"logits"}`` for uint8 batches.

  Each image is dropped as ``drop`` says (:func:`dropjax.masks.spec_mask`); the
  mask of example ``i`` comes from ``fold_in(key, index_i)`` so results do not
  depend on the batch size.  ``pass_mask``: also give the mask to the model as
  ``logits_fn(variables, x, keep)`` (models with the doubled input encoding).
  """

  @jax.jit
  def predict(variables, batch, key):
    x = augment.to_float(batch["image"])
    if not drop.drops:
      return {"logits": logits_fn(variables, x)}
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["index"])
    m = jax.vmap(lambda k: masks.spec_mask(k, drop, x.shape[1:], x.dtype))(keys)
    if pass_mask:
      return {"logits": logits_fn(variables, x * m, m)}
    return {"logits": logits_fn(variables, x * m)}

  return predict


def accuracy(predict: Callable, variables, images: np.ndarray, labels: np.ndarray,
             batch_size: int, key) -> float:
  """Top-1 accuracy of ``predict`` (see :func:`make_predict`) on a split."""
  out = map_batches(lambda b: predict(variables, b, key), {"image": images}, batch_size)
  return float(np.mean(np.argmax(out["logits"], -1) == labels))
