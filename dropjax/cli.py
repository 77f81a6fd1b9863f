"""One command-line mechanism for every dropjax command.

Each command's flags are generated from a config dataclass
(:func:`add_config_flags`: one ``--name`` per field, its help from the field's
metadata, the field's default shown), and every command runs through
:func:`run_command`, the one error path: a user error (a bad value, missing
data, a corrupt checkpoint) prints ``error: ...`` on one line and exits 2.

Commands: ``train.py`` (:class:`dropjax.config.TrainConfig`), ``evaluate.py``
(:class:`dropjax.evaluation.EvalConfig`), ``certify.py``
(:class:`dropjax.certification.CertifyRunConfig`), ``python -m dropjax.explain``
(:class:`dropjax.explain.ExplainConfig`) and ``python -m dropjax.plots``
(:class:`dropjax.plots.PlotsConfig`).
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import glob
import logging
import os
import sys
import types
import typing
from typing import Any, Callable

RUNS_DIR = "runs"  # default home of training runs (relative to the working directory)


def _parse_bool(text: str) -> bool:
  low = text.lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_kind(cls, field) -> tuple[Callable, bool]:
  """``(parse, is_sequence)`` from the field's type hint."""
  hint = typing.get_type_hints(cls)[field.name]
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  origin = typing.get_origin(hint)
  if hint in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
    elems = [a for a in typing.get_args(hint) if a is not Ellipsis]
    return ({int: int, float: float}.get(elems[0], str) if elems else str), True
  return {bool: _parse_bool, int: int, float: float, str: str}.get(hint, str), False


def add_config_flags(parser: argparse.ArgumentParser, cls, *, exclude=()) -> None:
  """One flag per field of dataclass ``cls`` (value ``None`` = not given).

  Field metadata: ``help`` (required), and optionally ``type`` (element
  parser), ``choices``, ``positional`` (a positional, one or more values) and
  ``required``; sequence fields take one or more values.
  """
  for field in dataclasses.fields(cls):
    if field.name in exclude:
      continue
    meta = dict(field.metadata)
    help_text = meta.pop("help")
    parse, is_seq = _field_kind(cls, field)
    kwargs: dict[str, Any] = {"type": meta.pop("type", parse), "default": None}
    default = field.default if field.default is not dataclasses.MISSING else None
    if meta.pop("positional", False):
      parser.add_argument(field.name, nargs="+", help=help_text, **{**kwargs, **meta})
      continue
    if meta.pop("required", False):
      kwargs["required"] = True
    elif default is not None:
      help_text = f"{help_text} (default: {_show(default)})"
    if is_seq:
      kwargs["nargs"] = "+"
    if kwargs["type"] is _parse_bool:
      kwargs.update(nargs="?", const=True, metavar="BOOL")
    parser.add_argument(f"--{field.name}", help=help_text, **{**kwargs, **meta})


def _show(default) -> str:
  if isinstance(default, (tuple, list)):
    return " ".join(map(str, default))
  return repr(default) if isinstance(default, str) else str(default)


def config_overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
  """The fields of ``cls`` given on the command line (sequences as tuples)."""
  out = {}
  for field in dataclasses.fields(cls):
    value = getattr(args, field.name, None)
    if value is not None:
      out[field.name] = tuple(value) if isinstance(value, list) else value
  return out


def user_errors() -> tuple[type[BaseException], ...]:
  """Errors that are the user's to fix: reported in one line, exit status 2."""
  from dropjax.data.local import DataError  # pylint: disable=g-import-not-at-top
  from dropjax.training.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  return (ValueError, FileNotFoundError, DataError, CheckpointError)


def fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 2


# Exit status of a command whose stdout reader went away (as a shell reports SIGPIPE).
EXIT_STDOUT_CLOSED = 128 + 13


def _stdout_closed() -> int:
  """Stdout's reader went away (a closed pipe: the parent script was killed).
  What the command saved stays saved; nothing more is written to stdout, and
  Python's flush at exit is pointed at /dev/null so it raises nothing."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())
  os.close(devnull)
  return EXIT_STDOUT_CLOSED


def make_parser(prog: str, description: str | None, cls, *,
                extra: Callable[[argparse.ArgumentParser], None] | None = None,
                epilog: str | None = None, exclude=()) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  if extra:
    extra(p)
  add_config_flags(p, cls, exclude=exclude)
  return p


def run_command(prog: str, description: str | None, cls, run: Callable, argv=None, *,
                extra: Callable[[argparse.ArgumentParser], None] | None = None,
                make_config: Callable[[argparse.Namespace, dict], Any] | None = None,
                epilog: str | None = None, exclude=()) -> int:
  """Parses ``argv`` into a ``cls`` config and calls ``run(config)`` (or
  ``run(config, args)`` when ``extra`` adds flags outside the config).

  ``make_config(args, overrides)`` builds the config (default ``cls(**overrides)``,
  validated when ``cls`` has ``validate``).  User errors print one line and
  return 2; a closed stdout (its reader gone) returns :data:`EXIT_STDOUT_CLOSED`
  without a traceback.
  """
  try:
    args = make_parser(prog, description, cls, extra=extra, epilog=epilog,
                       exclude=exclude).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    try:
      overrides = config_overrides(cls, args)
      cfg = make_config(args, overrides) if make_config else cls(**overrides)
      if hasattr(cfg, "validate"):
        cfg.validate()
      return run(cfg, args) if extra else run(cfg)
    except user_errors() as e:
      return fail(str(e))
  except BrokenPipeError:
    return _stdout_closed()


# --- train.py ---------------------------------------------------------------


def default_workdir(cfg, preset: str | None) -> str:
  """``runs/<preset>`` or ``runs/<dataset>-resnet<depth>-<drop>[...]`` for a config."""
  if preset:
    name = preset
  else:
    drop = {"none": "normal", "fixed": f"fixed{cfg.drop_rate:g}", "random": "random",
            "ablate": f"ablate{cfg.keep}"}[cfg.drop]
    name = f"{cfg.dataset}-resnet{cfg.depth}-{drop}"
    if cfg.input_encoding != "values":
      name += f"-{cfg.input_encoding}"
    if cfg.objective != "standard":
      name += f"-{cfg.objective}"
  if cfg.seed:
    name += f"-seed{cfg.seed}"
  return os.path.join(RUNS_DIR, name)


def _train_flags(p: argparse.ArgumentParser) -> None:
  from dropjax import config as config_lib  # pylint: disable=g-import-not-at-top
  p.add_argument("--workdir", default=None,
                 help="run directory: config.json, checkpoints/, metrics.jsonl, "
                 "final_eval.json (default: runs/<preset> or runs/<dataset>-resnet<depth>-"
                 "<drop>, printed)")
  p.add_argument("--preset", default=None, choices=sorted(config_lib.PRESETS),
                 help="named settings of the paper (explicit flags override them)")
  p.add_argument("--stop_after_steps", type=int, default=None,
                 help="stop after N steps of this invocation (resume later with the "
                 "same command)")
  p.add_argument("--stop_at", default=None,
                 help="wall-clock deadline (ISO 8601, e.g. 2026-12-04T12:05 local time, "
                 "or with a UTC offset): the first step that ends after it is checkpointed "
                 "and the run stops there (exit status 0, printed finished=False); the same "
                 "command resumes it exactly.  SIGTERM or SIGINT (Ctrl-C) does the same at "
                 "any time (exit status 128 + signal; a second signal stops at once)")
  p.add_argument("--no_progress", action="store_true", help="disable the progress bar")
  p.add_argument("--skip_if_packaged", action="store_true",
                 help="do not train when a packaged model under pretrained/ already followed "
                 "this run's recipe (every setting but where and how it runs): print its "
                 "directory and exit 0 (the GPU script uses it to spend no lease on a row "
                 "the CPU finished)")


def init_distributed(cfg) -> None:
  """``jax.distributed.initialize`` (gloo collectives when running on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {k: getattr(cfg, k) for k in ("coordinator_address", "num_processes", "process_id")
            if getattr(cfg, k) is not None}
  jax.distributed.initialize(**kwargs)


def _run_train(cfg, args) -> int:
  if args.skip_if_packaged:
    from dropjax import pretrained  # pylint: disable=g-import-not-at-top
    packaged = pretrained.trained_with(cfg)
    if packaged:
      print(f"not trained: packaged already as {', '.join(packaged)} (--skip_if_packaged)")
      return 0
  if cfg.distributed:
    init_distributed(cfg)
  from dropjax import deadlines  # pylint: disable=g-import-not-at-top
  from dropjax.training import loop  # pylint: disable=g-import-not-at-top
  stop = deadlines.StopRequest(args.stop_at)
  workdir = args.workdir or default_workdir(cfg, args.preset)
  if not args.workdir:
    print(f"workdir: {workdir}", file=sys.stderr)
  stop.catch_signals()
  result = loop.train(cfg, workdir, stop_after_steps=args.stop_after_steps, should_stop=stop,
                      progress=False if args.no_progress else None)
  result.pop("state")
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()))
  if result.get("stopped"):
    print(f"{stop.reason()}: stopped at step {result['step']} of {result['total_steps']}; "
          "the same command resumes it", file=sys.stderr)
    return stop.exit_status()
  return 0


def train_main(argv=None) -> int:
  """``train.py``: flags from :class:`dropjax.config.TrainConfig`."""
  from dropjax import config as config_lib  # pylint: disable=g-import-not-at-top
  return run_command(
      "train.py", "Train a CIFAR ResNet with pixel dropping (Hosseini et al.). Re-running "
      "with the same --workdir resumes from its last checkpoint.", config_lib.TrainConfig,
      _run_train, argv, extra=_train_flags,
      make_config=lambda args, kw: config_lib.from_preset(args.preset, **kw),
      epilog="presets: " + ", ".join(sorted(config_lib.PRESETS)))


# --- evaluate.py ------------------------------------------------------------


def latest_run(root: str = RUNS_DIR) -> str:
  """The training run under ``root`` whose latest checkpoint is the newest."""
  candidates = []
  for cfg_path in glob.glob(os.path.join(root, "**", "config.json"), recursive=True):
    wd = os.path.dirname(cfg_path)
    ckpts = glob.glob(os.path.join(wd, "checkpoints", "*"))
    if ckpts:
      candidates.append((max(os.path.getmtime(c) for c in ckpts), wd))
  if not candidates:
    raise FileNotFoundError(f"no trained run with a checkpoint under {root}/: train one "
                            "(python train.py ...) or pass --workdir")
  return max(candidates)[1]


def _trained_run_flags(out_name: str) -> Callable[[argparse.ArgumentParser], None]:
  """The flags of commands that read a trained run (evaluate, certify)."""

  def add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None,
                   help="training run directory (config.json + checkpoints/); default: "
                   "the run under runs/ with the newest checkpoint (printed)")
    p.add_argument("--out", default=None,
                   help=f"output directory (default: <workdir>/{out_name})")
    p.add_argument("--data_dir", default=None, help="override the run's data dir")
    p.add_argument("--source", default=None, choices=["auto", "local", "tfds"],
                   help="override the run's data source")
    p.add_argument("--no_progress", action="store_true", help="disable progress bars")

  return add


def _trained_run(args, verb: str) -> str:
  workdir = args.workdir or latest_run()
  if not args.workdir:
    print(f"{verb} the most recent run: {workdir}", file=sys.stderr)
  return workdir


EVAL_PRINTED = ("clean_accuracy_plain", "clean_accuracy_avg", "robust_accuracy_avg",
                "robust_accuracy_avg_with_rejection", "adv_rejection_rate_avg",
                "attack_images_per_s")


def _run_evaluate(ev, args) -> int:
  from dropjax import evaluation  # pylint: disable=g-import-not-at-top
  workdir = _trained_run(args, "evaluating")
  if ev.sanity:
    from dropjax.evaluation import sanity  # pylint: disable=g-import-not-at-top
    out = args.out or os.path.join(workdir, "eval")
    checks = sanity.run(workdir, ev, out, data_dir=args.data_dir, source=args.source,
                        progress=False if args.no_progress else None)
    for c in checks:
      nums = " ".join(f"{k}={v:.4f}" for k, v in c.items()
                      if isinstance(v, float) and k != "tolerance")
      print(f"{'PASS' if c['pass'] else 'FAIL'} {c['check']}: {nums} ({c['rule']})")
    return 0 if all(c["pass"] for c in checks) else 1
  rows = evaluation.evaluate(workdir, ev, args.out, data_dir=args.data_dir,
                             source=args.source,
                             progress=False if args.no_progress else None)
  for r in rows:
    print(r["setting"], " ".join(f"{k}={r[k]:.4f}" for k in EVAL_PRINTED if k in r))
  return 0


def evaluate_main(argv=None, description: str | None = None) -> int:
  """``evaluate.py``: flags from :class:`dropjax.evaluation.EvalConfig`."""
  from dropjax.evaluation import EvalConfig  # pylint: disable=g-import-not-at-top
  return run_command("evaluate.py", description, EvalConfig, _run_evaluate, argv,
                     extra=_trained_run_flags("eval"))


# --- certify.py -------------------------------------------------------------


CERTIFY_PRINTED = ("clean_accuracy_smoothed", "abstain_rate", "median_radius", "images_per_s")


def _run_certify(cfg, args) -> int:
  from dropjax import certification, plots  # pylint: disable=g-import-not-at-top
  workdir = _trained_run(args, "certifying")
  summary = certification.run(workdir, cfg, args.out, data_dir=args.data_dir,
                              source=args.source,
                              progress=False if args.no_progress else None)
  if summary is None:  # --stop_at: the finished chunks are kept
    print("stopped before the last chunk; the same command resumes", file=sys.stderr)
    return 0
  out_dir = args.out or os.path.join(workdir, "certify")
  curves = plots.certification_curves([out_dir])
  for path in plots.plot_certified_accuracy(curves, out_dir, certification.PLOT_NAME):
    print(path, file=sys.stderr)
  keys = [k for k in summary if k.startswith("certified_accuracy_r")] + list(CERTIFY_PRINTED)
  print(summary["setting"], " ".join(f"{k}={summary[k]:.4f}" for k in keys if k in summary))
  return 0


def certify_main(argv=None, description: str | None = None) -> int:
  """``certify.py``: flags from :class:`dropjax.certification.CertifyRunConfig`."""
  from dropjax.certification import CertifyRunConfig  # pylint: disable=g-import-not-at-top
  return run_command("certify.py", description, CertifyRunConfig, _run_certify, argv,
                     extra=_trained_run_flags("certify"))
