"""Train a dropped-pixel CIFAR ResNet.  ``python train.py --help`` lists every flag.

Examples::

    python train.py --preset quick                            # minutes on a CPU
    python train.py --dataset cifar10                         # -> runs/cifar10-resnet20-normal
    python train.py --preset cifar10-resnet20-fixed --workdir runs/c10-r20-fixed
    python train.py --dataset gtsrb --drop random --epochs 30 --workdir runs/gtsrb-random

Re-running the same command resumes from the last checkpoint in the workdir.
"""
import sys

from dropjax import backend, cli


def main(argv=None) -> int:
  backend.configure_process()  # XLA:CPU flag and allocator, before JAX starts
  return cli.train_main(argv)


if __name__ == "__main__":
  sys.exit(main())
