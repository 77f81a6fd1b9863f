"""Evaluate a trained checkpoint under attack, with the test-time defense.

Examples::

    python evaluate.py --workdir runs/quick --norm linf
    python evaluate.py --workdir runs/quick --norm l2 --losses ce cw --restarts 2
    python evaluate.py --workdir runs/quick --norm none --drop_rates 0 0.2 0.4 0.6 0.8 0.9
    python evaluate.py --workdir runs/quick --norm l0 --drop_rates 0.5 0.9 --eps 0.01 0.03

Rows (one per example) go to ``<out>/<setting>/rows.jsonl`` and one summary
row per setting to ``<out>/summary.jsonl`` (``<out>`` defaults to
``<workdir>/eval``).  Re-running the same command resumes a killed run.
"""
from __future__ import annotations

import argparse
import sys

from dropjax import backend


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
  a("--out", default=None, help="output directory (default: <workdir>/eval)")
  a("--norm", default="linf", choices=["linf", "l2", "l0", "none"],
    help="threat model; 'none' only measures clean accuracy (drop-rate sweeps, Fig. 2)")
  a("--eps", type=float, nargs="+", default=None,
    help="budget(s), a sweep if several. L-inf/L2: on the [0,1] pixel scale (e.g. "
    "0.0627 = 16/255); L0: fraction of the pixels D (paper: 0.03). Default: the "
    "paper's preset for the dataset")
  a("--step_size", type=float, default=None,
    help="attack step ([0,1] scale; L0: multiple of the mean |gradient|); default: preset")
  a("--steps", type=int, default=20, help="PGD steps")
  a("--eot_samples", type=int, default=10,
    help="masks per EOT gradient (0: attack the undefended model, plain PGD)")
  a("--losses", nargs="+", default=["ce"], choices=["ce", "cw"],
    help="attack loss(es); several give a best-of attack (strongest per example)")
  a("--targeted", action="store_true", help="targeted attack towards a random wrong class")
  a("--restarts", type=int, default=1, help="random restarts per loss (best-of)")
  a("--no_random_start", action="store_true", help="start PGD at the clean image")
  a("--drop_rates", type=float, nargs="+", default=None,
    help="test-time drop rate(s), a sweep if several (default: the model's training "
    "rate; 0.5 for random-rate models; 0 for normal training)")
  a("--num_masks", type=int, default=10, help="masks averaged by the defense")
  a("--max_drop", type=float, default=0.01,
    help="entropy threshold: allowed drop of clean validation accuracy (rejections "
    "count as errors)")
  a("--num_examples", type=int, default=1000, help="test examples (0: all)")
  a("--batch_size", type=int, default=100, help="examples per chunk (resume unit)")
  a("--seed", type=int, default=0, help="seed of masks and attack randomness")
  a("--data_dir", default=None, help="override the run's data dir")
  a("--source", default=None, choices=["auto", "local", "tfds"], help="override the data source")
  a("--no_progress", action="store_true", help="disable progress bars")
  return p


def main(argv=None) -> int:
  backend.configure_process()  # XLA:CPU flag and allocator, before JAX starts
  args = parser().parse_args(argv)
  from dropjax import evaluation  # pylint: disable=g-import-not-at-top
  from dropjax.data.local import DataError  # pylint: disable=g-import-not-at-top
  from dropjax.training.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  ev = evaluation.EvalConfig(
      norm=args.norm, eps=args.eps, step_size=args.step_size, steps=args.steps,
      eot_samples=args.eot_samples, losses=tuple(args.losses), targeted=args.targeted,
      restarts=args.restarts, random_start=not args.no_random_start,
      drop_rates=args.drop_rates, num_masks=args.num_masks, max_drop=args.max_drop,
      num_examples=args.num_examples or None, batch_size=args.batch_size, seed=args.seed)
  try:
    rows = evaluation.evaluate(args.workdir, ev, args.out, data_dir=args.data_dir,
                               source=args.source,
                               progress=False if args.no_progress else None)
  except (ValueError, DataError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  keys = ("clean_accuracy_plain", "clean_accuracy_avg", "robust_accuracy_avg",
          "robust_accuracy_avg_with_rejection", "adv_rejection_rate_avg",
          "attack_images_per_s")
  for r in rows:
    print(r["setting"], " ".join(f"{k}={r[k]:.4f}" for k in keys if k in r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
