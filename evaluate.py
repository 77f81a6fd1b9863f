"""Evaluate a trained checkpoint under attack, with the test-time defense.

Examples::

    python evaluate.py --norm linf                   # the most recent run under runs/
    python evaluate.py --workdir runs/quick --norm l2 --losses ce cw --restarts 2
    python evaluate.py --workdir runs/quick --norm none --drop_rates 0 0.2 0.4 0.6 0.8 0.9
    python evaluate.py --workdir runs/quick --norm l0 --drop_rates 0.5 0.9 --eps 0.01 0.03

Rows (one per example) go to ``<out>/<setting>/rows.jsonl`` and one summary
row per setting to ``<out>/summary.jsonl`` (``<out>`` defaults to
``<workdir>/eval``).  Re-running the same command resumes a killed run.
"""
import sys

from dropjax import backend, cli


def main(argv=None) -> int:
  backend.configure_process()  # XLA:CPU flag and allocator, before JAX starts
  return cli.evaluate_main(argv, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
