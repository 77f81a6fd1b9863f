"""The evaluation cascade against the full run, on a trained model and real test images.

    python benchmarks/cascade_speed.py [--workdir pretrained/gtsrb-resnet20-random]
        [--norm linf] [--drop_rates 0.5 0.9] [--images 200] [--out FILE]

For each test-time drop rate, one ``evaluate.py`` setting under the paper's protocol
(its budget read literally; CE and CW x untargeted and targeted EOT-PGD, 20 steps x 10
masks; 5 scoring draws) is run twice into fresh directories in this process, first
``--cascade false`` (every attack on every example), then ``--cascade true`` (the
attacks after the first only on the examples not yet broken in every draw for every
metric).  Reported per run: attack seconds (each run compiles its own attacks: the full
run four at ``--batch_size`` examples, the cascade one there and three at
``--cascade_batch``), attack calls per example, robust accuracy of the 10-mask defense
with and without rejection, and the speed-up.  Chunk keys and the first attack are the
same in both runs; the cascade's later attacks run on other batches, so its robust
accuracy agrees with the full run's up to the attacks' randomness, not to the bit.
Needs the dataset (``DROPJAX_DATA_DIR``).  Prints one JSON object; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import backend as backend_lib  # noqa: E402

backend_lib.configure_process()

from benchmarks.common import machine, report  # noqa: E402
from dropjax import evaluation  # noqa: E402

KEPT = ("setting", "num_examples", "attacks_run_per_example", "attack_seconds_this_run",
        "attack_images_per_s", "robust_accuracy_avg", "robust_accuracy_avg_with_rejection",
        "robust_accuracy_plain")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="pretrained/gtsrb-resnet20-random",
                 help="trained run or packaged model")
  p.add_argument("--norm", default="linf", choices=("linf", "l2", "l0"), help="threat model")
  p.add_argument("--drop_rates", type=float, nargs="+", default=[0.5, 0.9],
                 help="test-time drop rates, one setting each")
  p.add_argument("--images", type=int, default=200, help="first test images per setting")
  p.add_argument("--batch_size", type=int, default=100, help="examples per chunk")
  p.add_argument("--cascade_batch", type=int, default=10,
                 help="examples per attack call of the cascade")
  p.add_argument("--out", default=None, help="also write the JSON here")
  args = p.parse_args(argv)

  rows = []
  for rate in args.drop_rates:
    runs = {}
    for cascade in ("false", "true"):
      ev = evaluation.EvalConfig(norm=args.norm, drop_rates=(rate,), num_examples=args.images,
                                 batch_size=args.batch_size, cascade=cascade,
                                 cascade_batch=args.cascade_batch)
      with tempfile.TemporaryDirectory() as out:
        [summary] = evaluation.evaluate(args.workdir, ev, out, progress=False)
      runs[cascade] = {k: summary.get(k) for k in KEPT}
      print(f"r={rate} cascade={cascade}: {runs[cascade]}", file=sys.stderr, flush=True)
    rows.append({"drop_rate": rate, "full": runs["false"], "cascade": runs["true"],
                 "speedup": runs["false"]["attack_seconds_this_run"]
                 / runs["true"]["attack_seconds_this_run"]})
  report({"benchmark": "cascade_speed", "workdir": args.workdir, "norm": args.norm,
          "images": args.images, "batch_size": args.batch_size,
          "cascade_batch": args.cascade_batch, "backend": backend_lib.resolve().describe(),
          "machine": machine(), "settings": rows}, args.out)


if __name__ == "__main__":
  main()
