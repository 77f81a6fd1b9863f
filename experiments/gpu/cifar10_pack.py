"""Ship CIFAR-10 to a lent GPU machine in parts that fit one device call each.

The device tool carries at most 64 MiB per call, the checkout's working tree included
(tracked files and untracked ones git does not ignore: ~40 MiB on 2026-12-06, the
packaged models and result rows, and growing), and the raw "CIFAR-10 binary version" is
184 MB.  ``pack`` compresses each batch file losslessly (its images as WebP-lossless
mosaics of 64 x 64 images, about 56% of the raw size, ~16.3 MiB per batch; the labels as
bytes), in ``--pieces`` pieces per batch (consecutive records), and groups the pieces
into part files -- by default one piece per batch, or more when a whole batch would not
fit, and the fewest parts whose largest fits beside what travels anyway
(:func:`travel_mib`, measured when packing).  ``unpack`` decodes whichever parts are
present, keeps the pieces of a batch not yet complete under ``DEST/cifar10/pieces/``, and
rebuilds each official ``cifar10/cifar-10-batches-bin/*.bin`` byte for byte once all its
pieces are there, checked against the SHA-256 of the original recorded at packing; a
batch already unpacked and verified is skipped -- so each call can carry one part and
unpack it into the same (ignored) folder on the device machine.

Needs only numpy and Pillow (with WebP), both on the device machine's image; imports
nothing of dropjax.

    python experiments/gpu/cifar10_pack.py pack --data_dir .data --out .gpu/pack
    python experiments/gpu/cifar10_pack.py pack --data_dir .data --out .gpu/pack --max_mib 12
    python experiments/gpu/cifar10_pack.py unpack --parts .gpu/pack --dest .gpu/data
    python experiments/gpu/cifar10_pack.py unpack --parts .gpu/pack --dest .gpu/data --require_all
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import subprocess
import sys

import numpy as np

BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
           "test_batch")
BIN_DIR = os.path.join("cifar10", "cifar-10-batches-bin")
META_FILE = "batches.meta.txt"
RECORD_BYTES = 1 + 32 * 32 * 3          # label byte + R, G, B planes (32 x 32 each)
MOSAIC_COLS = 64                         # images per mosaic row
MOSAIC_IMAGES = MOSAIC_COLS * MOSAIC_COLS
WEBP_METHOD = 4                          # encoder effort 0-6 (4: 56% of raw, ~3 s/mosaic)
DEVICE_CALL_MIB = 64.0                   # what one device call carries, working tree included
MARGIN_MIB = 2.0                         # headroom for files the checkout gains before the calls
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _records(raw: bytes, name: str) -> np.ndarray:
  if len(raw) % RECORD_BYTES:
    raise ValueError(f"{name}: {len(raw)} bytes is not a whole number of "
                     f"{RECORD_BYTES}-byte records")
  return np.frombuffer(raw, np.uint8).reshape(-1, RECORD_BYTES)


def encode_images(x: np.ndarray) -> tuple[bytes, np.ndarray]:
  """(N, 32, 32, 3) uint8 -> WebP-lossless mosaics (bytes, int64 offsets (M + 1,))."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  blobs = []
  for a in range(0, len(x), MOSAIC_IMAGES):
    chunk = x[a:a + MOSAIC_IMAGES]
    pad = (-len(chunk)) % MOSAIC_COLS
    chunk = np.concatenate([chunk, np.zeros((pad, 32, 32, 3), np.uint8)])
    rows = len(chunk) // MOSAIC_COLS
    mosaic = chunk.reshape(rows, MOSAIC_COLS, 32, 32, 3).transpose(0, 2, 1, 3, 4)
    buf = io.BytesIO()
    Image.fromarray(mosaic.reshape(rows * 32, MOSAIC_COLS * 32, 3)).save(
        buf, "WEBP", lossless=True, quality=100, method=WEBP_METHOD)
    blobs.append(buf.getvalue())
  offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
  return b"".join(blobs), offsets


def decode_images(data: bytes, offsets: np.ndarray, count: int) -> np.ndarray:
  """Inverse of :func:`encode_images`: the first ``count`` images, (count, 32, 32, 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  parts = []
  for a, b in zip(offsets[:-1], offsets[1:]):
    m = np.asarray(Image.open(io.BytesIO(data[a:b])).convert("RGB"))
    rows = m.shape[0] // 32
    parts.append(m.reshape(rows, 32, MOSAIC_COLS, 32, 3).transpose(0, 2, 1, 3, 4)
                 .reshape(-1, 32, 32, 3))
  x = np.concatenate(parts)
  if len(x) < count:
    raise ValueError(f"the mosaics hold {len(x)} images, {count} expected")
  return np.ascontiguousarray(x[:count])


def travel_mib(repo: str = REPO) -> float:
  """MiB that every device call carries besides its ``carry`` paths: the files of the
  checkout ``repo`` that git tracks (as they are in the working tree) or leaves untracked
  without ignoring them.  Symbolic links travel as links and count nothing here."""
  listed = subprocess.run(
      ["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      capture_output=True, check=True).stdout.decode()
  total = 0
  for rel in set(listed.split("\0")) - {""}:
    path = os.path.join(repo, rel)
    if os.path.isfile(path) and not os.path.islink(path):
      total += os.path.getsize(path)
  return total / 2**20


def piece_name(batch: str, index: int, pieces: int) -> str:
  """The name of piece ``index`` (0-based) of ``pieces`` of ``batch``."""
  return f"{batch}.{index + 1}of{pieces}"


def pack_batch(raw: bytes, name: str, pieces: int = 1) -> dict[str, dict[str, np.ndarray]]:
  """The batch file ``raw`` as ``pieces`` pieces of consecutive records:
  ``{piece name: arrays}``, each piece's arrays keyed by its name and holding the whole
  batch's SHA-256 and piece count."""
  r = _records(raw, name)
  out = {}
  for i, rec in enumerate(np.array_split(r, pieces)):
    key = piece_name(name, i, pieces)
    data, offsets = encode_images(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    out[key] = {f"{key}_labels": rec[:, 0].copy(), f"{key}_webp": np.frombuffer(data, np.uint8),
                f"{key}_offsets": offsets, f"{key}_sha256": np.array(sha256(raw)),
                f"{key}_pieces": np.array(pieces)}
  return out


def decode_piece(store, key: str) -> bytes:
  """The records of piece ``key`` of a part file, as bytes of the batch file."""
  labels = store[f"{key}_labels"]
  x = decode_images(store[f"{key}_webp"].tobytes(), store[f"{key}_offsets"], len(labels))
  records = np.concatenate([labels[:, None], x.transpose(0, 3, 1, 2).reshape(len(x), -1)], 1)
  return records.astype(np.uint8).tobytes()


def _mib(arrays: dict[str, np.ndarray]) -> float:
  return sum(a.nbytes for a in arrays.values()) / 2**20


def group_pieces(piece_mib: list[tuple[str, float]], max_mib: float) -> list[list[str]]:
  """Consecutive pieces (``(name, MiB)`` in order) grouped into the fewest parts of at
  most ``max_mib`` each (greedy, which is optimal for consecutive groups); a
  ValueError naming the piece that alone is too large."""
  groups, size = [], 0.0
  for name, mib in piece_mib:
    if mib > max_mib:
      raise ValueError(f"piece {name} alone is {mib:.1f} MiB, over --max_mib {max_mib:.1f}: "
                       "use more --pieces")
    if groups and size + mib <= max_mib:
      groups[-1].append(name)
      size += mib
    else:
      groups.append([name])
      size = mib
  return groups


def pieces_needed(batch_mib: float, max_mib: float) -> int:
  """The fewest pieces per batch for pieces of at most ``max_mib`` (a batch packs to
  ``batch_mib``; pieces of it are a little larger than their share, so 5% is kept)."""
  if max_mib <= 0:
    raise ValueError(f"--max_mib {max_mib:.1f}: no room is left in a device call's "
                     f"{DEVICE_CALL_MIB:.0f} MiB (move large files the GPU runs do not need "
                     "out of the working tree, or git-ignore untracked ones)")
  return max(1, int(np.ceil(1.05 * batch_mib / max_mib)))


def pack(data_dir: str, out: str, parts: int | None, max_mib: float,
         pieces: int | None = None) -> list[str]:
  """Writes the part files under ``out``.  ``pieces`` per batch, None: one, or as many
  as a part of at most ``max_mib`` needs (:func:`pieces_needed`); ``parts`` None: the
  fewest that fit (:func:`group_pieces`), else that many groups of consecutive pieces."""
  src = os.path.join(data_dir, BIN_DIR)
  missing = [b for b in BATCHES if not os.path.isfile(os.path.join(src, b + ".bin"))]
  if missing:
    raise FileNotFoundError(f"no CIFAR-10 binary batches {missing} under {src} "
                            "(run: python ../shared/datasets/prepare.py .data)")
  with open(os.path.join(src, META_FILE), "rb") as f:
    meta = f.read()
  raws = {}
  for name in BATCHES:
    with open(os.path.join(src, name + ".bin"), "rb") as f:
      raws[name] = f.read()
  def packed_in(count: int) -> dict[str, dict[str, np.ndarray]]:
    return {k: v for name in BATCHES for k, v in pack_batch(raws[name], name, count).items()}
  packed = packed_in(pieces or 1)
  if pieces is None and (count := pieces_needed(max(map(_mib, packed.values())), max_mib)) > 1:
    packed = packed_in(count)  # whole batches do not fit: pack again, in pieces
  if parts is None:
    groups = group_pieces([(k, _mib(a)) for k, a in packed.items()], max_mib)
  else:
    if not 1 <= parts <= len(packed):
      raise ValueError(f"--parts must be in 1..{len(packed)}, got {parts}")
    groups = [list(g) for g in np.array_split(np.array(list(packed)), parts)]
  os.makedirs(out, exist_ok=True)
  for old in glob.glob(os.path.join(out, "cifar10_part*.npz")):
    os.remove(old)  # parts of another split would unpack beside these
  written = []
  for i, names in enumerate(groups):
    arrays = {"meta": np.frombuffer(meta, np.uint8), "pieces": np.array(names)}
    for name in names:
      arrays.update(packed[name])
    path = os.path.join(out, f"cifar10_part{i + 1}of{len(groups)}.npz")
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)
    mib = os.path.getsize(path) / 2**20
    print(f"{path}: {', '.join(names)} ({mib:.1f} MiB)")
    if mib > max_mib:
      raise ValueError(f"{path} is {mib:.1f} MiB, over --max_mib {max_mib:.1f}: use more "
                       "--parts or --pieces")
    written.append(path)
  return written


def _verified(path: str, want: str) -> bool:
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return sha256(f.read()) == want


def _write(path: str, data: bytes) -> None:
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def unpack(parts_dir: str, dest: str, require_all: bool) -> list[str]:
  """Unpacks every part under ``parts_dir``; returns the batches still missing in dest."""
  folder = os.path.join(dest, BIN_DIR)
  piece_dir = os.path.join(dest, "cifar10", "pieces")  # beside the batch files' folder
  for d in (folder, piece_dir):
    os.makedirs(d, exist_ok=True)
  complete = set()  # batches verified in this call: hashed once, not once per piece
  for path in sorted(glob.glob(os.path.join(parts_dir, "cifar10_part*.npz"))):
    with np.load(path) as store:
      with open(os.path.join(folder, META_FILE), "wb") as f:
        f.write(store["meta"].tobytes())
      for key in (str(k) for k in store["pieces"]):
        batch, count = key.split(".")[0], int(store[f"{key}_pieces"])
        target, want = os.path.join(folder, batch + ".bin"), str(store[f"{key}_sha256"])
        if batch in complete:
          continue
        if _verified(target, want):
          complete.add(batch)
          continue
        _write(os.path.join(piece_dir, key), decode_piece(store, key))
        have = [os.path.join(piece_dir, piece_name(batch, i, count)) for i in range(count)]
        if not all(os.path.isfile(h) for h in have):
          print(f"{key}: unpacked from {os.path.basename(path)} (batch not complete yet)")
          continue
        raw = b""
        for h in have:
          with open(h, "rb") as f:
            raw += f.read()
        if sha256(raw) != want:
          raise ValueError(f"{batch}: the unpacked bytes do not match the original's "
                           f"SHA-256 ({want}); a part file is damaged")
        _write(target, raw)
        for h in have:
          os.remove(h)
        complete.add(batch)
        print(f"{target}: unpacked from {os.path.basename(path)} (verified)")
  missing = [b for b in BATCHES if not os.path.isfile(os.path.join(folder, b + ".bin"))]
  if missing and require_all:
    raise FileNotFoundError(f"CIFAR-10 batches {missing} are not under {folder}: carry "
                            f"their part files (under {parts_dir}) in an earlier or this call")
  return missing


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("pack", help="compress the six batch files into part files")
  a.add_argument("--data_dir", default=".data", help="holds cifar10/cifar-10-batches-bin/")
  a.add_argument("--out", default=".gpu/pack", help="directory for the part files")
  a.add_argument("--parts", type=int, default=None,
                 help="number of part files, groups of consecutive pieces (default: the "
                      "fewest that fit --max_mib)")
  a.add_argument("--pieces", type=int, default=None,
                 help="pieces per batch (default: 1, or as many as --max_mib needs)")
  a.add_argument("--max_mib", type=float, default=None,
                 help="largest allowed part file, MiB (default: the 64 MiB one device "
                      "call carries, less what it carries anyway -- this checkout's "
                      f"tracked and untracked-not-ignored files -- less {MARGIN_MIB:g})")
  b = sub.add_parser("unpack", help="rebuild and verify the batch files from the parts present")
  b.add_argument("--parts", default=".gpu/pack", help="directory holding part files")
  b.add_argument("--dest", default=".gpu/data", help="writes DEST/cifar10/cifar-10-batches-bin/")
  b.add_argument("--require_all", action="store_true",
                 help="fail unless all six batches are then present")
  args = p.parse_args(argv)
  try:
    if args.cmd == "pack":
      max_mib = args.max_mib
      if max_mib is None:
        tree = travel_mib()
        max_mib = DEVICE_CALL_MIB - tree - MARGIN_MIB
        print(f"every device call carries {tree:.1f} MiB of this checkout: parts of at "
              f"most {max_mib:.1f} MiB")
      pack(args.data_dir, args.out, args.parts, max_mib, args.pieces)
    else:
      missing = unpack(args.parts, args.dest, args.require_all)
      print("all six batches present" if not missing else f"still missing: {missing}")
  except (OSError, ValueError, subprocess.CalledProcessError) as e:
    print(f"cifar10_pack: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
