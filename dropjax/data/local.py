"""Readers for local dataset copies in their standard formats.

* CIFAR-10 "binary version": ``<root>/cifar10/cifar-10-batches-bin/`` with
  ``data_batch_{1..5}.bin`` and ``test_batch.bin``; each record is one label
  byte followed by 3072 bytes (1024 red, 1024 green, 1024 blue, row-major).
* GTSRB at 32x32: ``<root>/gtsrb/gtsrb32.npz`` with uint8 ``x_train``
  ``(N, 32, 32, 3)``, ``y_train``, ``x_test``, ``y_test`` and ``train_track``
  (global track id of every training image).

All readers return uint8 images ``(N, 32, 32, 3)`` (NHWC, RGB) and int32
labels, and raise :class:`DataError` naming the offending file.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

CIFAR10_DIR = os.path.join("cifar10", "cifar-10-batches-bin")
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_RECORD = 1 + 32 * 32 * 3
GTSRB_FILE = os.path.join("gtsrb", "gtsrb32.npz")
GTSRB_KEYS = ("x_train", "y_train", "x_test", "y_test", "train_track")


class DataError(RuntimeError):
  """A dataset is missing, incomplete or corrupt."""


def read_cifar10_bin(path: str, num_classes: int = 10):
  """Reads one CIFAR binary batch file -> (uint8 images NHWC, int32 labels)."""
  if not os.path.isfile(path):
    raise DataError(f"missing CIFAR-10 file {path}")
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size == 0 or raw.size % CIFAR10_RECORD:
    raise DataError(
        f"corrupt CIFAR-10 file {path}: {raw.size} bytes is not a multiple of "
        f"the record size {CIFAR10_RECORD}")
  rec = raw.reshape(-1, CIFAR10_RECORD)
  labels = rec[:, 0].astype(np.int32)
  if labels.max() >= num_classes:
    raise DataError(f"corrupt CIFAR-10 file {path}: label {labels.max()} >= {num_classes}")
  images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def load_cifar10(root: str):
  """Returns dict with x_train, y_train, x_test, y_test from ``root``."""
  folder = os.path.join(root, CIFAR10_DIR)
  if not os.path.isdir(folder):
    raise DataError(
        f"CIFAR-10 not found: expected the binary version in {folder} "
        "(run `python ../shared/datasets/prepare.py .data` or use --source tfds)")
  out = {}
  for split, files in (("train", CIFAR10_TRAIN_FILES), ("test", CIFAR10_TEST_FILES)):
    parts = [read_cifar10_bin(os.path.join(folder, f)) for f in files]
    out[f"x_{split}"] = np.concatenate([p[0] for p in parts])
    out[f"y_{split}"] = np.concatenate([p[1] for p in parts])
  return out


def load_gtsrb_npz(root: str, num_classes: int = 43):
  """Returns dict with x_train, y_train, x_test, y_test, train_track."""
  path = os.path.join(root, GTSRB_FILE)
  if not os.path.isfile(path):
    raise DataError(
        f"GTSRB not found: expected {path} (run `python ../shared/datasets/"
        "prepare.py .data`, or build the tfds dataset from the official archives)")
  try:
    with np.load(path) as z:
      missing = [k for k in GTSRB_KEYS if k not in z.files]
      if missing:
        raise DataError(f"corrupt GTSRB file {path}: missing arrays {missing}")
      d = {k: z[k] for k in GTSRB_KEYS}
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise DataError(f"corrupt GTSRB file {path}: {e}") from e
  for split in ("train", "test"):
    x, y = d[f"x_{split}"], d[f"y_{split}"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
      raise DataError(f"corrupt GTSRB file {path}: x_{split} is {x.dtype}{x.shape},"
                      " expected uint8 (N, 32, 32, 3)")
    if y.shape != (x.shape[0],) or (y.size and int(y.max()) >= num_classes):
      raise DataError(f"corrupt GTSRB file {path}: bad y_{split}")
    d[f"y_{split}"] = y.astype(np.int32)
  if d["train_track"].shape != d["y_train"].shape:
    raise DataError(f"corrupt GTSRB file {path}: train_track does not match y_train")
  d["train_track"] = d["train_track"].astype(np.int64)
  return d
