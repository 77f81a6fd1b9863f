"""experiments/gpu/cifar10_pack.py: CIFAR-10 shipped to a GPU machine in parts, byte exact."""
import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "gpu", "cifar10_pack.py")
_spec = importlib.util.spec_from_file_location("cifar10_pack", _PATH)
pack_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack_lib)


@pytest.fixture()
def cifar_dir(tmp_path):
  """Six small batch files in the official layout (random images, 70 records each)."""
  folder = tmp_path / "src" / pack_lib.BIN_DIR
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i, name in enumerate(pack_lib.BATCHES):
    n = 70 + i  # not a multiple of the mosaic width: exercises the padding
    rec = rng.integers(0, 256, (n, pack_lib.RECORD_BYTES), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, n)
    rec.tofile(folder / f"{name}.bin")
  (folder / pack_lib.META_FILE).write_text("\n".join(f"class{c}" for c in range(10)))
  return tmp_path / "src", folder


def test_parts_unpack_incrementally_to_the_identical_files(cifar_dir, tmp_path):
  src, folder = cifar_dir
  paths = pack_lib.pack(str(src), str(tmp_path / "pack"), parts=3, max_mib=48)
  assert len(paths) == 3
  dest = tmp_path / "dest"
  for i, path in enumerate(paths):  # one part per "call", into the same folder
    only = tmp_path / f"call{i}"
    only.mkdir()
    os.symlink(path, only / os.path.basename(path))
    missing = pack_lib.unpack(str(only), str(dest), require_all=False)
    assert len(missing) == len(pack_lib.BATCHES) - 2 * (i + 1)
  for name in pack_lib.BATCHES + (pack_lib.META_FILE,):
    fname = name if name == pack_lib.META_FILE else f"{name}.bin"
    assert (dest / pack_lib.BIN_DIR / fname).read_bytes() == (folder / fname).read_bytes()


def test_missing_batches_and_damaged_parts_are_errors(cifar_dir, tmp_path):
  src, _ = cifar_dir
  paths = pack_lib.pack(str(src), str(tmp_path / "pack"), parts=2, max_mib=48)
  only = tmp_path / "one"
  only.mkdir()
  os.symlink(paths[0], only / os.path.basename(paths[0]))
  with pytest.raises(FileNotFoundError, match="data_batch_4"):
    pack_lib.unpack(str(only), str(tmp_path / "d1"), require_all=True)
  with np.load(paths[1]) as store:
    arrays = dict(store)
  labels = arrays["data_batch_4.1of1_labels"].copy()
  labels[0] = (labels[0] + 1) % 10
  arrays["data_batch_4.1of1_labels"] = labels
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  np.savez(damaged / os.path.basename(paths[1]), **arrays)
  with pytest.raises(ValueError, match="data_batch_4.*damaged"):
    pack_lib.unpack(str(damaged), str(tmp_path / "d2"), require_all=False)
  with pytest.raises(ValueError, match="max_mib"):
    pack_lib.pack(str(src), str(tmp_path / "p2"), parts=1, max_mib=0.01)
  with pytest.raises(FileNotFoundError, match="prepare.py"):
    pack_lib.pack(str(tmp_path / "nowhere"), str(tmp_path / "p3"), parts=3, max_mib=48)


def test_the_fewest_parts_that_fit_are_chosen(cifar_dir, tmp_path):
  mib = [(f"b{i}", 10.0) for i in range(6)]
  assert len(pack_lib.group_pieces(mib, 60)) == 1
  assert len(pack_lib.group_pieces(mib, 30)) == 2
  assert pack_lib.group_pieces(mib, 25) == [["b0", "b1"], ["b2", "b3"], ["b4", "b5"]]
  assert len(pack_lib.group_pieces(mib, 10)) == 6
  with pytest.raises(ValueError, match="piece b0 alone"):
    pack_lib.group_pieces(mib, 9.9)
  assert pack_lib.pieces_needed(16.3, 22.5) == 1
  assert pack_lib.pieces_needed(16.3, 12.0) == 2
  with pytest.raises(ValueError, match="no room"):
    pack_lib.pieces_needed(16.3, -1.0)
  # pack(parts=None) chooses from the packed sizes: two batches' worth per part here.
  src, _ = cifar_dir
  one = max(pack_lib._mib(a) for n in pack_lib.BATCHES for a in pack_lib.pack_batch(
      (src / pack_lib.BIN_DIR / f"{n}.bin").read_bytes(), n).values())
  out = tmp_path / "auto"
  out.mkdir()
  (out / "cifar10_part1of4.npz").write_bytes(b"stale")  # another split's: removed
  paths = pack_lib.pack(str(src), str(out), parts=None, max_mib=2.2 * one)
  assert [os.path.basename(p) for p in paths] == [f"cifar10_part{i}of3.npz" for i in (1, 2, 3)]
  assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)


def test_batches_split_into_pieces_across_calls_unpack_identically(cifar_dir, tmp_path):
  src, folder = cifar_dir
  one = max(pack_lib._mib(a) for n in pack_lib.BATCHES for a in pack_lib.pack_batch(
      (src / pack_lib.BIN_DIR / f"{n}.bin").read_bytes(), n).values())
  # Parts smaller than a batch: each batch in pieces, a part ending inside a batch.
  paths = pack_lib.pack(str(src), str(tmp_path / "pack"), parts=None, max_mib=0.7 * one)
  with np.load(paths[0]) as store:
    first = [str(k) for k in store["pieces"]]
  assert first[0].startswith("data_batch_1.1of") and first[0] != "data_batch_1.1of1"
  dest = tmp_path / "dest"
  for i, path in enumerate(reversed(paths)):  # any order, one part per "call"
    only = tmp_path / f"call{i}"
    only.mkdir()
    os.symlink(path, only / os.path.basename(path))
    missing = pack_lib.unpack(str(only), str(dest), require_all=False)
    assert (len(missing) == 0) == (i == len(paths) - 1)
  for name in pack_lib.BATCHES:
    assert (dest / pack_lib.BIN_DIR / f"{name}.bin").read_bytes() == \
        (folder / f"{name}.bin").read_bytes()
  assert os.listdir(dest / "cifar10" / "pieces") == []  # assembled pieces removed
  assert sorted(os.listdir(dest / pack_lib.BIN_DIR)) == sorted(
      [f"{n}.bin" for n in pack_lib.BATCHES] + [pack_lib.META_FILE])
  # A damaged piece is caught when its batch is assembled.
  with np.load(paths[-1]) as store:
    arrays = dict(store)
  key = str(arrays["pieces"][-1])
  labels = arrays[f"{key}_labels"].copy()
  labels[0] = (labels[0] + 1) % 10
  arrays[f"{key}_labels"] = labels
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  np.savez(damaged / os.path.basename(paths[-1]), **arrays)
  for other in paths[:-1]:
    os.symlink(other, damaged / os.path.basename(other))
  with pytest.raises(ValueError, match="test_batch.*damaged"):
    pack_lib.unpack(str(damaged), str(tmp_path / "d2"), require_all=False)


def test_travel_counts_tracked_and_unignored_files_only(tmp_path):
  import subprocess
  repo = tmp_path / "repo"
  repo.mkdir()
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  (repo / ".gitignore").write_text("ignored/\n")            # 10 bytes, untracked
  (repo / "tracked.bin").write_bytes(b"t" * 2**20)
  (repo / "gone.bin").write_bytes(b"g" * 2**20)
  subprocess.run(["git", "-C", str(repo), "add", "tracked.bin", "gone.bin"], check=True)
  (repo / "gone.bin").unlink()                              # tracked, deleted: not sent
  (repo / "new.bin").write_bytes(b"n" * 2**19)              # untracked, not ignored
  (repo / "ignored").mkdir()
  (repo / "ignored" / "big.bin").write_bytes(b"i" * 2**22)  # ignored: only if carried
  os.symlink(repo / "tracked.bin", repo / "link.bin")       # travels as a link
  assert pack_lib.travel_mib(str(repo)) == pytest.approx(1.5 + 10 / 2**20)
