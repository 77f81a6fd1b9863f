"""A TensorFlow Datasets builder for GTSRB (not in the tfds catalog).

GTSRB cannot be downloaded automatically (it sits behind a web form), so this
builder reads the official archives from the tfds *manual* download dir::

    ~/tensorflow_datasets/downloads/manual/   (or --manual_dir)
      GTSRB_Final_Training_Images.zip
      GTSRB_Final_Test_Images.zip
      GTSRB_Final_Test_GT.zip

Build once with ``dropjax.data.gtsrb_tfds.build(data_dir, manual_dir)`` (or
``tfds build``); afterwards ``tfds.load("gtsrb", data_dir=...)`` works.
Features: ``image`` (32, 32, 3) uint8, ``label`` (43 classes), ``track``
(int64 global track id, -1 for test images).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from dropjax.data import gtsrb_official


class Gtsrb(tfds.core.GeneratorBasedBuilder):
  """German Traffic Sign Recognition Benchmark, resized to 32x32."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official split, whole images resized to 32x32."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip "
      "and GTSRB_Final_Test_GT.zip from https://benchmark.ini.rub.de/ and "
      "place them (or their extracted contents) in the manual dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    size = gtsrb_official.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description="GTSRB traffic signs (Stallkamp et al., 2011), 43 classes.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.ClassLabel(num_classes=gtsrb_official.NUM_CLASSES),
            "track": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://benchmark.ini.rub.de/gtsrb_news.html",
    )

  def _split_generators(self, dl_manager):
    manual = str(dl_manager.manual_dir)
    return {split: self._generate_examples(manual, split) for split in ("train", "test")}

  def _generate_examples(self, manual_dir, split):
    yield from gtsrb_official.iter_examples(manual_dir, split)


def build(data_dir: str, manual_dir: str) -> Gtsrb:
  """Prepares the tfds dataset ``gtsrb`` in ``data_dir`` from ``manual_dir``."""
  builder = Gtsrb(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
