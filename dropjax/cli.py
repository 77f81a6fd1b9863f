"""Command-line parsing for ``train.py`` (flags generated from :class:`TrainConfig`)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from dropjax import config as config_lib


def _parse_bool(text: str) -> bool:
  low = text.lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(field):
  hint = typing.get_type_hints(config_lib.TrainConfig)[field.name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  base = args[0] if args else hint
  return {bool: _parse_bool, int: int, float: float, str: str}.get(base, str)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """One flag per :class:`TrainConfig` field; defaults shown, value None = unset."""
  for field in dataclasses.fields(config_lib.TrainConfig):
    meta = dict(field.metadata)
    help_text = meta.pop("help")
    kwargs = {"type": meta.pop("type", _field_type(field)), "default": None,
              "help": f"{help_text} (default: {field.default!r})", **meta}
    if kwargs["type"] is _parse_bool:
      kwargs.update(nargs="?", const=True, metavar="BOOL")
    parser.add_argument(f"--{field.name}", **kwargs)


def train_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Train a CIFAR ResNet with pixel dropping (Hosseini et al.). "
      "Re-running with the same --workdir resumes from its last checkpoint.",
      epilog="presets: " + ", ".join(sorted(config_lib.PRESETS)))
  p.add_argument("--workdir", required=True,
                 help="run directory: config.json, checkpoints/, metrics.jsonl, final_eval.json")
  p.add_argument("--preset", default=None, choices=sorted(config_lib.PRESETS),
                 help="named settings of the paper (explicit flags override them)")
  p.add_argument("--stop_after_steps", type=int, default=None,
                 help="stop after N steps of this invocation (resume later with the "
                 "same command)")
  p.add_argument("--no_progress", action="store_true", help="disable the progress bar")
  add_config_flags(p)
  return p


def config_from_args(args: argparse.Namespace) -> config_lib.TrainConfig:
  names = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
  if "lr_boundaries" in overrides:
    overrides["lr_boundaries"] = tuple(overrides["lr_boundaries"])
  return config_lib.from_preset(args.preset, **overrides)


def init_distributed(cfg: config_lib.TrainConfig) -> None:
  """``jax.distributed.initialize`` (gloo collectives when running on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {k: getattr(cfg, k) for k in ("coordinator_address", "num_processes", "process_id")
            if getattr(cfg, k) is not None}
  jax.distributed.initialize(**kwargs)


def fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 2


def run_train(args: argparse.Namespace) -> int:
  from dropjax.data.local import DataError  # pylint: disable=g-import-not-at-top
  from dropjax.training.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    cfg = config_from_args(args)
    if cfg.distributed:
      init_distributed(cfg)
    from dropjax.training import loop  # pylint: disable=g-import-not-at-top
    result = loop.train(cfg, args.workdir, stop_after_steps=args.stop_after_steps,
                        progress=False if args.no_progress else None)
  except (ValueError, DataError, CheckpointError) as e:
    return fail(str(e))
  result.pop("state")
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()))
  return 0
