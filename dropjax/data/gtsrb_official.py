"""Reads the official GTSRB release (archives or extracted folders).

Official layout (Stallkamp et al. 2011), as zips or extracted, anywhere under
one folder:

* ``GTSRB_Final_Training_Images.zip``: ``GTSRB/Final_Training/Images/000CC/``
  per class ``CC``, files ``TTTTT_FFFFF.ppm`` (track, frame) and ``GT-000CC.csv``.
* ``GTSRB_Final_Test_Images.zip``: ``GTSRB/Final_Test/Images/NNNNN.ppm``.
* ``GTSRB_Final_Test_GT.zip``: ``GT-final_test.csv`` (with ``ClassId``).

CSV files are ``;``-separated with a ``Filename`` and a ``ClassId`` column.
Images are resized as a whole (no ROI crop, aspect ratio not kept) to 32x32
with bilinear interpolation.  This module needs only numpy and Pillow; the
tfds builder in :mod:`dropjax.data.gtsrb_tfds` wraps it.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import re
import zipfile
from typing import Callable, Iterator

import numpy as np

IMAGE_SIZE = 32
NUM_CLASSES = 43
_ANCHORS = ("Final_Training/", "Final_Test/")


def _normalize(path: str) -> str:
  path = path.replace("\\", "/")
  for anchor in _ANCHORS:
    i = path.find(anchor)
    if i >= 0:
      return path[i:]
  return os.path.basename(path)


def index_files(manual_dir: str) -> dict[str, Callable[[], bytes]]:
  """Maps normalized paths (``Final_Training/...``) to byte readers."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"GTSRB manual download dir {manual_dir} does not exist")
  files: dict[str, Callable[[], bytes]] = {}
  for root, _, names in os.walk(manual_dir):
    for name in sorted(names):
      path = os.path.join(root, name)
      if name.lower().endswith(".zip"):
        zf = zipfile.ZipFile(path)
        for member in zf.namelist():
          if not member.endswith("/"):
            files[_normalize(member)] = (lambda zf=zf, m=member: zf.read(m))
      else:
        rel = os.path.relpath(path, manual_dir)
        files[_normalize(rel)] = (lambda p=path: pathlib.Path(p).read_bytes())
  return files


def _read_csv(data: bytes) -> list[dict[str, str]]:
  return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig")), delimiter=";"))


def decode_ppm(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
  """Decodes an image file and resizes it to ``(size, size, 3)`` uint8 RGB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.open(io.BytesIO(data)).convert("RGB")
  img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def iter_examples(manual_dir: str, split: str) -> Iterator[tuple[str, dict]]:
  """Yields ``(key, {"image", "label", "track"})`` for ``split`` in train/test.

  ``track`` is a global track id (0..#tracks-1, in class then track order) for
  training images and -1 for test images.
  """
  files = index_files(manual_dir)
  if split == "train":
    csvs = sorted(k for k in files if re.fullmatch(
        r"Final_Training/Images/\d{5}/GT-\d{5}\.csv", k))
    if not csvs:
      raise FileNotFoundError(
          f"no Final_Training/Images/000CC/GT-000CC.csv found under {manual_dir} "
          "(expected GTSRB_Final_Training_Images.zip or its contents)")
    track_ids: dict[tuple[int, str], int] = {}
    for csv_key in csvs:
      folder = csv_key.rsplit("/", 1)[0]
      for row in _read_csv(files[csv_key]()):
        label = int(row["ClassId"])
        track = (label, row["Filename"].split("_")[0])
        tid = track_ids.setdefault(track, len(track_ids))
        key = f"{folder}/{row['Filename']}"
        yield key, {"image": decode_ppm(files[key]()), "label": label, "track": tid}
  elif split == "test":
    gt = files.get("GT-final_test.csv")
    if gt is None:
      raise FileNotFoundError(
          f"GT-final_test.csv not found under {manual_dir} "
          "(expected GTSRB_Final_Test_GT.zip or the extracted csv)")
    for row in _read_csv(gt()):
      key = f"Final_Test/Images/{row['Filename']}"
      if key not in files:
        raise FileNotFoundError(f"test image {key} listed in GT-final_test.csv is missing")
      yield key, {"image": decode_ppm(files[key]()), "label": int(row["ClassId"]),
                  "track": -1}
  else:
    raise ValueError(f"unknown GTSRB split {split!r}; use 'train' or 'test'")
