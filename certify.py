"""Certify a trained run's L0 robustness by randomized ablation (Levine & Feizi 2020).

Examples::

    python certify.py --workdir runs/gtsrb-resnet20-ablate75      # k from the run
    python certify.py --workdir runs/gtsrb-resnet20-random --keep 75 --num_examples 200
    python certify.py --workdir RUN --n 1000 --n0 100              # a quick look

Each sample shows the base classifier exactly k of the H*W pixels; n0 samples
pick the top class, n samples bound its probability (Clopper-Pearson, 1 - alpha),
and the certified radius is the largest number of changed pixels the bound
covers.  Rows (one per example) go to ``<out>/<setting>/rows.jsonl``, a summary
row per setting to ``<out>/summary.jsonl`` and the plot of certified accuracy
vs radius to ``<out>/certified_accuracy.png`` (``<out>``: ``<workdir>/certify``).
Re-running the same command resumes a killed run.
"""
import sys

from dropjax import backend, cli


def main(argv=None) -> int:
  backend.configure_process()  # XLA:CPU flag and allocator, before JAX starts
  return cli.certify_main(argv, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
