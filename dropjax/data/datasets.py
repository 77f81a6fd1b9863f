"""One function to load a dataset from tfds or from a local copy.

``load_dataset(name, source=..., data_dir=...)`` returns a :class:`Dataset` of
uint8 images ``(N, 32, 32, 3)`` and int32 labels for train / validation / test.
Scaling to ``[-1, 1]`` happens on the device (:func:`dropjax.data.augment.to_float`).

Sources:

* ``"local"``: standard-format copies under ``data_dir`` (or ``$DROPJAX_DATA_DIR``),
  see :mod:`dropjax.data.local`.
* ``"tfds"``: ``tfds.load`` (downloads CIFAR-10; GTSRB via the manual-dir
  builder in :mod:`dropjax.data.gtsrb_tfds`).
* ``"auto"`` (default): local when a data dir is given or set, else tfds.

The validation split is held out of the official training set,
deterministically from ``seed``: random images for CIFAR-10 and whole tracks
for GTSRB (frames of one track are near-duplicates).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from dropjax.data import local
from dropjax.data.local import DataError

DATA_DIR_ENV = "DROPJAX_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the loaders and the model need to know of a dataset, besides its images."""
  name: str
  num_classes: int
  tfds_name: str
  hflip: bool           # horizontal flips are label-preserving
  val_size: int         # default number of held-out validation images
  group_key: str | None = None  # hold out whole groups (tracks) for validation
  # Per-channel (R, G, B) mean of the official training images on the [0, 1] scale:
  # the fill of the "mean" input encoding (dropjax.models).
  channel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)


DATASETS = {
    # CIFAR-10's mean: all 50,000 training images (also Levine & Feizi's constant).
    "cifar10": DatasetSpec("cifar10", 10, "cifar10", hflip=True, val_size=5000,
                           channel_mean=(0.4914, 0.4822, 0.4465)),
    # Flipping traffic signs changes their meaning (keep left / keep right).
    # GTSRB's mean: all 39,209 official training images, resized to 32x32.
    "gtsrb": DatasetSpec("gtsrb", 43, "gtsrb", hflip=False, val_size=3900,
                         group_key="train_track", channel_mean=(0.3398, 0.3117, 0.3210)),
}


@dataclasses.dataclass(frozen=True)
class Split:
  """Images ``x`` (uint8 (N, H, W, C), pixel values 0..255) and their labels ``y``
  (int32 (N,), in [0, num_classes))."""
  x: np.ndarray  # uint8 (N, H, W, C)
  y: np.ndarray  # int32 (N,)

  def __len__(self):
    return len(self.y)

  def take(self, n: int | None) -> "Split":
    """The first ``n`` examples (all if None)."""
    return self if n is None else Split(self.x[:n], self.y[:n])

  def subset(self, n: int | None, seed: int) -> "Split":
    """``n`` examples drawn at random (seeded), in their original order.

    Splits may be sorted by class (GTSRB is), so a prefix is no sample.
    """
    if n is None or n >= len(self):
      return self
    idx = np.sort(np.random.default_rng([seed, n]).permutation(len(self))[:n])
    return Split(self.x[idx], self.y[idx])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset's train, validation (held out of the official training set) and test
  splits."""
  spec: DatasetSpec
  train: Split
  val: Split
  test: Split

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.x.shape[1:])


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
  return DATASETS[name]


def resolve_data_dir(data_dir: str | None) -> str | None:
  """``data_dir`` if given, else ``$DROPJAX_DATA_DIR``, else None."""
  return data_dir or os.environ.get(DATA_DIR_ENV) or None


def _load_local(spec: DatasetSpec, data_dir: str) -> dict:
  if not os.path.isdir(data_dir):
    raise DataError(f"data dir {data_dir} does not exist")
  if spec.name == "cifar10":
    return local.load_cifar10(data_dir)
  return local.load_gtsrb_npz(data_dir, spec.num_classes)


def _load_tfds(spec: DatasetSpec, data_dir: str | None) -> dict:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("loading through tfds needs tensorflow-datasets (pip install "
                    "'dropjax[tfds]'), or point --data_dir / $DROPJAX_DATA_DIR at a "
                    f"local copy ({e})") from e
  if spec.name == "gtsrb":
    from dropjax.data import gtsrb_tfds  # noqa: F401  registers the builder
  out = {}
  for split in ("train", "test"):
    # Batched iteration (batch_size=-1 aborts in some TF builds).
    try:
      ds = tfds.load(spec.tfds_name, split=split, data_dir=data_dir).batch(4096)
      parts = list(tfds.as_numpy(ds))
    except Exception as e:  # tfds raises many types (network, manual dir, ...)
      raise DataError(
          f"tfds could not load {spec.tfds_name!r} ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}). Offline? Point --data_dir or "
          f"${DATA_DIR_ENV} at a local copy (see README, 'Data').") from e
    if not parts:
      raise DataError(f"tfds dataset {spec.tfds_name!r} split {split!r} is empty")
    out[f"x_{split}"] = np.concatenate([p["image"] for p in parts]).astype(np.uint8)
    out[f"y_{split}"] = np.concatenate([p["label"] for p in parts]).astype(np.int32)
    if split == "train" and "track" in parts[0]:
      out["train_track"] = np.concatenate([p["track"] for p in parts]).astype(np.int64)
  return out


def validation_indices(n: int, val_size: int, seed: int,
                       groups: np.ndarray | None = None) -> np.ndarray:
  """Indices held out for validation, deterministic in ``seed``.

  With ``groups`` (e.g. GTSRB track ids) whole groups are taken, in a seeded
  random order, until at least ``val_size`` images are held out.
  """
  if not 0 <= val_size < n:
    raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
  rng = np.random.default_rng(seed)
  if val_size == 0:
    return np.zeros((0,), np.int64)
  if groups is None:
    return np.sort(rng.permutation(n)[:val_size])
  uniq = rng.permutation(np.unique(groups))
  sizes = np.array([np.sum(groups == g) for g in uniq])
  take = uniq[:int(np.searchsorted(np.cumsum(sizes), val_size)) + 1]
  return np.flatnonzero(np.isin(groups, take))


def load_dataset(name: str, *, source: str = "auto", data_dir: str | None = None,
                 val_size: int | None = None, seed: int = 0) -> Dataset:
  """Loads ``name`` ("cifar10" or "gtsrb") with a held-out validation split.

  Args:
    name: dataset name.
    source: "auto", "local" or "tfds".
    data_dir: local root (``.data``) for "local", tfds data dir for "tfds";
      defaults to ``$DROPJAX_DATA_DIR`` for "auto"/"local".
    val_size: validation images (default: the dataset's spec); 0 for none.
    seed: seed of the validation split.

  Raises:
    ValueError: unknown dataset or source.
    DataError: missing or corrupt local data.
  """
  spec = get_spec(name)
  if source not in ("auto", "local", "tfds"):
    raise ValueError(f"unknown source {source!r}; use auto, local or tfds")
  local_dir = resolve_data_dir(data_dir)
  if source == "local" or (source == "auto" and local_dir):
    if not local_dir:
      raise DataError(f"--source local needs --data_dir or ${DATA_DIR_ENV}")
    arrays = _load_local(spec, local_dir)
  else:
    arrays = _load_tfds(spec, data_dir)
  x, y = arrays["x_train"], arrays["y_train"]
  groups = arrays.get(spec.group_key) if spec.group_key else None
  val_size = spec.val_size if val_size is None else val_size
  val_size = min(val_size, len(y) // 2)
  val_idx = validation_indices(len(y), val_size, seed, groups)
  keep = np.ones(len(y), bool)
  keep[val_idx] = False
  return Dataset(spec=spec, train=Split(x[keep], y[keep]), val=Split(x[val_idx], y[val_idx]),
                 test=Split(arrays["x_test"], arrays["y_test"]))
