"""The architecture against published accuracies: He et al.'s CIFAR ResNets as
trained in PyTorch (Idelbayev's pytorch_resnet_cifar10, option-A shortcuts),
loaded into dropjax's model (``dropjax.published``) and scored on the CIFAR-10
test set by dropjax's data pipeline.

    pip install -r requirements-bench.txt      # PyTorch, only to unpickle the .th files
    python experiments/published_resnets.py resnet20-12fca82f.th resnet56-4bfd9763.th \
        --out experiments/results/published_resnets/accuracy.jsonl

The checkpoints are the repository's ``pretrained_models/*.th`` (the hash prefix in
each name is the first 8 hex digits of the file's SHA-256, checked here).  Each
records the test accuracy it reached (``best_prec1``, on the same 10,000 images).
Writes one row per checkpoint: its recorded accuracy, the accuracy here, the
difference, SHA-256, the machine.  A wrong layer order, padding or shortcut in
dropjax's model would show as a large difference; the accuracy of the 30-epoch
models trained here (RESULTS.md) is then a statement about training, not the model.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dropjax import backend as backend_lib  # noqa: E402

backend_lib.configure_process()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from dropjax import files, models, pretrained, published  # noqa: E402
from dropjax.data import load_dataset  # noqa: E402
from dropjax.data.local import DataError  # noqa: E402


def read_checkpoint(path: str) -> tuple[dict, dict]:
  """(state dict as numpy arrays, the other entries) of a PyTorch ``.th`` file."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit("reading PyTorch checkpoints needs PyTorch: "
                     "pip install -r requirements-bench.txt") from e
  # weights_only: the files are plain tensors and numbers; refuse anything else.
  ckpt = torch.load(path, map_location="cpu", weights_only=True)
  state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
  if not isinstance(state, dict):
    raise ValueError(f"{path}: not a state dict (got {type(ckpt).__name__})")
  extra = {k: float(v) for k, v in ckpt.items() if k != "state_dict" and np.isscalar(v)}
  return {k: v.numpy() for k, v in state.items()}, extra


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoints", nargs="+", help="PyTorch .th files of the reference")
  p.add_argument("--num_examples", type=int, default=10_000,
                 help="first CIFAR-10 test images scored (all 10,000 by default)")
  p.add_argument("--batch_size", type=int, default=500, help="images per forward pass")
  p.add_argument("--data_dir", default=os.environ.get("DROPJAX_DATA_DIR"),
                 help="local data root (.data; default $DROPJAX_DATA_DIR)")
  p.add_argument("--out", default=None, help="append one JSON row per checkpoint here")
  args = p.parse_args(argv)
  if args.num_examples < 1 or args.batch_size < 1:
    p.error("--num_examples and --batch_size must be >= 1")
  missing = [c for c in args.checkpoints if not os.path.isfile(c)]
  if missing:
    p.error(f"no such checkpoint: {', '.join(missing)}")
  try:
    return run(args)
  except (DataError, ValueError, pickle.UnpicklingError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def run(args) -> int:
  data = load_dataset("cifar10", source="local", data_dir=args.data_dir, val_size=0)
  test = data.test.take(args.num_examples)
  x = published.reference_input(test.x)
  rows = []
  for path in args.checkpoints:
    digest = pretrained.sha256(path)
    m = re.search(r"-([0-9a-f]{8})\.th$", os.path.basename(path))
    if m and not digest.startswith(m[1]):
      raise ValueError(f"{path}: SHA-256 {digest[:8]}... does not match its name")
    state, extra = read_checkpoint(path)
    variables = published.variables_from_state_dict(state)
    depth, num_classes = published.architecture(variables)
    model = models.resnet(depth, num_classes)
    apply = jax.jit(lambda v, xb: model.apply(v, xb).argmax(-1))
    t0 = time.perf_counter()
    pred = np.concatenate([np.asarray(apply(variables, x[i:i + args.batch_size]))
                           for i in range(0, len(x), args.batch_size)])
    seconds = time.perf_counter() - t0
    acc = float(np.mean(pred == test.y))
    row = {"checkpoint": os.path.basename(path), "sha256": digest, "depth": depth,
           "num_examples": len(test), "test_accuracy_percent": 100 * acc,
           "recorded_accuracy_percent": extra.get("best_prec1"),
           "difference_points": (100 * acc - extra["best_prec1"]) if "best_prec1" in extra
           else None, "seconds": seconds, "jax": jax.__version__, "machine": machine()}
    print(f"ResNet-{depth} ({row['checkpoint']}): {row['test_accuracy_percent']:.2f}% on "
          f"{len(test)} CIFAR-10 test images here; recorded in the checkpoint: "
          f"{row['recorded_accuracy_percent'] or float('nan'):.2f}%")
    rows.append(row)
  if args.out:
    old = files.read_jsonl(args.out) if os.path.exists(args.out) else []
    files.write_jsonl(args.out, old + rows)
    print(args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
