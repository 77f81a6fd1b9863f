import io
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropjax.data import augment, datasets, gtsrb_official, local, load_dataset
from dropjax.data.local import DataError

KEY = jax.random.PRNGKey(0)


def write_cifar_bin(path, n, seed=0):
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, 10, n).astype(np.uint8)
  imgs = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
  rec = np.concatenate([labels[:, None], imgs.reshape(n, -1)], axis=1)
  rec.tofile(path)
  return imgs.transpose(0, 2, 3, 1), labels


@pytest.fixture
def cifar_dir(tmp_path):
  folder = tmp_path / local.CIFAR10_DIR
  folder.mkdir(parents=True)
  written = [write_cifar_bin(folder / f, 6, seed=i)
             for i, f in enumerate(local.CIFAR10_TRAIN_FILES + local.CIFAR10_TEST_FILES)]
  return tmp_path, written


def test_cifar_binary_reader_layout(cifar_dir):
  root, written = cifar_dir
  d = local.load_cifar10(str(root))
  assert d["x_train"].shape == (30, 32, 32, 3) and d["x_train"].dtype == np.uint8
  np.testing.assert_array_equal(d["x_train"][:6], written[0][0])  # CHW -> HWC
  np.testing.assert_array_equal(d["y_test"], written[5][1])


def test_cifar_corrupt_and_missing(cifar_dir, tmp_path):
  root, _ = cifar_dir
  bad = root / local.CIFAR10_DIR / "data_batch_3.bin"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(DataError, match="data_batch_3.bin"):
    local.load_cifar10(str(root))
  os.remove(bad)
  with pytest.raises(DataError, match="missing.*data_batch_3.bin"):
    local.load_cifar10(str(root))
  with pytest.raises(DataError, match="not found"):
    local.load_cifar10(str(tmp_path / "nothing"))


def write_gtsrb_npz(root, n_train=60, n_test=10, tracks=6):
  os.makedirs(os.path.join(root, "gtsrb"), exist_ok=True)
  rng = np.random.RandomState(0)
  d = dict(x_train=rng.randint(0, 256, (n_train, 32, 32, 3)).astype(np.uint8),
           y_train=(np.arange(n_train) % 43).astype(np.uint8),
           x_test=rng.randint(0, 256, (n_test, 32, 32, 3)).astype(np.uint8),
           y_test=(np.arange(n_test) % 43).astype(np.uint8),
           train_track=np.repeat(np.arange(tracks), n_train // tracks).astype(np.int16))
  np.savez(os.path.join(root, local.GTSRB_FILE), **d)
  return d


def test_gtsrb_npz_and_track_holdout(tmp_path):
  d = write_gtsrb_npz(tmp_path)
  ds = load_dataset("gtsrb", source="local", data_dir=str(tmp_path), val_size=15, seed=3)
  assert ds.num_classes == 43 and len(ds.test) == 10
  assert len(ds.train) + len(ds.val) == 60
  # Whole tracks (10 images each) held out: 15 requested -> 20 images, 2 tracks.
  assert len(ds.val) == 20
  val_rows = {r.tobytes() for r in ds.val.x}
  train_rows = {r.tobytes() for r in ds.train.x}
  assert not val_rows & train_rows
  held = {int(t) for t, x in zip(d["train_track"], d["x_train"]) if x.tobytes() in val_rows}
  assert len(held) == 2
  again = load_dataset("gtsrb", source="local", data_dir=str(tmp_path), val_size=15, seed=3)
  np.testing.assert_array_equal(again.val.x, ds.val.x)
  other = load_dataset("gtsrb", source="local", data_dir=str(tmp_path), val_size=15, seed=4)
  assert not np.array_equal(other.val.x, ds.val.x)


def test_gtsrb_corrupt_npz(tmp_path):
  os.makedirs(tmp_path / "gtsrb")
  (tmp_path / local.GTSRB_FILE).write_bytes(b"not a zip")
  with pytest.raises(DataError, match="gtsrb32.npz"):
    load_dataset("gtsrb", source="local", data_dir=str(tmp_path))
  np.savez(tmp_path / local.GTSRB_FILE, x_train=np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(DataError, match="missing arrays"):
    load_dataset("gtsrb", source="local", data_dir=str(tmp_path))


def test_unknown_dataset_source_and_missing_dir(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    load_dataset("mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown source"):
    load_dataset("cifar10", source="web", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="does not exist"):
    load_dataset("cifar10", source="local", data_dir=str(tmp_path / "missing"))


def test_cifar_random_validation_split_deterministic(cifar_dir):
  root, _ = cifar_dir
  a = load_dataset("cifar10", data_dir=str(root), val_size=5, seed=1)
  b = load_dataset("cifar10", data_dir=str(root), val_size=5, seed=1)
  assert len(a.val) == 5 and len(a.train) == 25
  np.testing.assert_array_equal(a.val.x, b.val.x)


def test_tfds_path_with_mock_data(tmp_path, monkeypatch):
  import tempfile

  import tensorflow_datasets as tfds
  # tfds's DatasetInfo.initialize_from_bucket makes a tempfile.mkdtemp it never removes:
  # keep it under pytest's tmp_path.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  with tfds.testing.mock_data(num_examples=24):
    ds = load_dataset("cifar10", source="tfds", val_size=4)
  assert ds.train.x.shape == (20, 32, 32, 3) and ds.train.x.dtype == np.uint8
  assert ds.train.y.dtype == np.int32 and ds.num_classes == 10
  assert len(ds.test) == 24


def ppm_bytes(rgb):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PPM")
  return buf.getvalue()


def make_official_gtsrb(manual):
  """Tiny archive in the official layout: 2 classes x 2 tracks x 2 frames."""
  rng = np.random.RandomState(0)
  train = {}
  with zipfile.ZipFile(manual / "GTSRB_Final_Training_Images.zip", "w") as zf:
    for c in (0, 1):
      folder = f"GTSRB/Final_Training/Images/{c:05d}"
      rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
      for t in (0, 1):
        for f in (0, 1):
          name = f"{t:05d}_{f:05d}.ppm"
          img = rng.randint(0, 256, (40, 45, 3)).astype(np.uint8)
          train[(c, t, f)] = img
          zf.writestr(f"{folder}/{name}", ppm_bytes(img))
          rows.append(f"{name};45;40;5;5;40;35;{c}")
      zf.writestr(f"{folder}/GT-{c:05d}.csv", "\n".join(rows) + "\n")
  with zipfile.ZipFile(manual / "GTSRB_Final_Test_Images.zip", "w") as zf:
    for i in range(3):
      zf.writestr(f"GTSRB/Final_Test/Images/{i:05d}.ppm",
                  ppm_bytes(rng.randint(0, 256, (33, 31, 3)).astype(np.uint8)))
  with zipfile.ZipFile(manual / "GTSRB_Final_Test_GT.zip", "w") as zf:
    zf.writestr("GT-final_test.csv", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                + "".join(f"{i:05d}.ppm;31;33;1;1;30;30;{40 + i}\n" for i in range(3)))
  return train


def test_gtsrb_official_reader(tmp_path):
  train = make_official_gtsrb(tmp_path)
  ex = list(gtsrb_official.iter_examples(str(tmp_path), "train"))
  assert len(ex) == 8
  labels = [e["label"] for _, e in ex]
  tracks = [e["track"] for _, e in ex]
  assert labels == [0, 0, 0, 0, 1, 1, 1, 1]
  assert tracks == [0, 0, 1, 1, 2, 2, 3, 3]
  first = ex[0][1]["image"]
  assert first.shape == (32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, gtsrb_official.decode_ppm(ppm_bytes(train[(0, 0, 0)])))
  test = list(gtsrb_official.iter_examples(str(tmp_path), "test"))
  assert [e["label"] for _, e in test] == [40, 41, 42]


def test_gtsrb_tfds_builder_on_official_archive(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  make_official_gtsrb(manual)
  from dropjax.data import gtsrb_tfds
  gtsrb_tfds.build(str(tmp_path / "tfds"), str(manual))
  ds = load_dataset("gtsrb", source="tfds", data_dir=str(tmp_path / "tfds"), val_size=2)
  assert len(ds.train) + len(ds.val) == 8 and len(ds.test) == 3
  assert len(ds.val) == 2  # one whole track
  assert ds.train.x.shape[1:] == (32, 32, 3)
  assert sorted(ds.test.y.tolist()) == [40, 41, 42]


def test_gtsrb_official_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="GT-000CC.csv"):
    list(gtsrb_official.iter_examples(str(tmp_path), "train"))
  with pytest.raises(FileNotFoundError, match="GT-final_test.csv"):
    list(gtsrb_official.iter_examples(str(tmp_path), "test"))


def test_to_float_range():
  x = jnp.array([0, 127, 128, 255], jnp.uint8)
  y = augment.to_float(x)
  assert float(y[0]) == -1.0 and float(y[-1]) == 1.0
  assert not bool(jnp.any(y == 0))  # only dropped values are exactly 0


def test_random_crop_is_a_shifted_window():
  x = jax.random.uniform(KEY, (8, 8, 3), minval=-1, maxval=1)
  keys = jax.random.split(KEY, 50)
  crops = jax.vmap(lambda k: augment.random_crop(k, x, 2))(keys)
  padded = np.pad(np.asarray(x), ((2, 2), (2, 2), (0, 0)), constant_values=-1)
  windows = {padded[i:i + 8, j:j + 8].tobytes() for i in range(5) for j in range(5)}
  assert all(np.asarray(c).tobytes() in windows for c in crops)
  assert len({np.asarray(c).tobytes() for c in crops}) > 5


def test_flip_only_when_enabled():
  x = jax.random.uniform(KEY, (16, 8, 8, 3))
  keys = jax.random.split(KEY, 16)
  no = augment.augment_batch(keys, x, crop_pad=0, hflip=False)
  np.testing.assert_array_equal(no, x)
  yes = augment.augment_batch(keys, x, crop_pad=0, hflip=True)
  flipped = [not np.array_equal(a, b) for a, b in zip(yes, x)]
  assert 0 < sum(flipped) < 16
  for a, b, f in zip(yes, x, flipped):
    np.testing.assert_array_equal(a, b[:, ::-1] if f else b)


def test_dataset_specs():
  assert datasets.DATASETS["cifar10"].hflip and not datasets.DATASETS["gtsrb"].hflip
  assert datasets.DATASETS["gtsrb"].num_classes == 43


def test_real_datasets(real_data_dir):
  c = load_dataset("cifar10", data_dir=real_data_dir)
  assert len(c.train) + len(c.val) == 50000 and len(c.test) == 10000
  assert np.bincount(c.test.y).tolist() == [1000] * 10
  g = load_dataset("gtsrb", data_dir=real_data_dir)
  assert len(g.train) + len(g.val) == 39209 and len(g.test) == 12630
  assert g.train.y.max() == 42
  # The "mean" input encoding's fill: each dataset's per-channel mean over all of
  # its official training images (train + validation splits), to 4 decimals.
  for name, ds in (("cifar10", c), ("gtsrb", g)):
    total = (ds.train.x.reshape(-1, 3).astype(np.float64).sum(0)
             + ds.val.x.reshape(-1, 3).astype(np.float64).sum(0))
    mean = total / ((len(ds.train) + len(ds.val)) * 32 * 32) / 255
    np.testing.assert_allclose(datasets.DATASETS[name].channel_mean, mean, atol=6e-5)
