"""Train a dropped-pixel CIFAR ResNet.  ``python train.py --help`` lists every flag.

Examples::

    python train.py --preset quick --workdir runs/quick            # minutes on a CPU
    python train.py --preset cifar10-resnet20-fixed --workdir runs/c10-r20-fixed
    python train.py --dataset gtsrb --drop random --epochs 30 --workdir runs/gtsrb-random

Re-running the same command resumes from the last checkpoint in ``--workdir``.
"""
from __future__ import annotations

import sys

from dropjax import backend
from dropjax import cli


def main(argv=None) -> int:
  backend.configure_process()  # XLA:CPU flag and allocator, before JAX starts
  args = cli.train_parser().parse_args(argv)
  return cli.run_train(args)


if __name__ == "__main__":
  sys.exit(main())
