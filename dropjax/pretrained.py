"""Trained models as small, verified, loadable directories (``pretrained/NAME``).

A packaged model is a directory that every command reads like a training
workdir (``evaluate.py --workdir pretrained/NAME``, ``certify.py``,
``python -m dropjax.explain``)::

    config.json        the run's TrainConfig
    variables.msgpack  params + batch_stats (flax.serialization; no optimizer state);
                       over ``part_kib`` KiB (ResNet-56/110) it is written as parts
                       variables.msgpack.part000, .part001, ... to be concatenated
    MANIFEST.json      name, step, SHA-256 and size of variables.msgpack, the run's
                       test accuracies, the accuracy on the first test images
                       (``check_examples``), provenance (command, hardware, wall time)
    metrics.jsonl, final_eval.json   the run's training rows and final test numbers

:func:`load` verifies the SHA-256 before it deserializes anything, so a damaged
or edited file is an error naming the file, never a silently different model.

    python -m dropjax.pretrained --workdir runs/gtsrb-resnet20-random \\
        --out pretrained/gtsrb-resnet20-random --command "python train.py ..."
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
from typing import Callable

import flax.serialization
import jax
import numpy as np

from dropjax import files
from dropjax.config import TrainConfig
from dropjax.training import checkpoint as ckpt_lib

VARIABLES_FILE = "variables.msgpack"
PART_SUFFIX = ".part{:03d}"  # variables.msgpack.part000, ... (manifest "parts": how many)
MANIFEST_FILE = "MANIFEST.json"
COPIED_FILES = ("metrics.jsonl", "final_eval.json")
IMAGE_SHAPE = (32, 32, 3)  # both datasets: 32x32 RGB
# Where the repository keeps its packaged models (a checkout or an editable install).
REPO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "pretrained")


def sha256(path: str) -> str:
  """SHA-256 (hex) of the bytes of the file ``path``."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def is_packaged(workdir: str) -> bool:
  """Whether ``workdir`` is a packaged model (has ``variables.msgpack`` or its first part)."""
  return any(os.path.isfile(os.path.join(workdir, VARIABLES_FILE + tail))
             for tail in ("", PART_SUFFIX.format(0)))


def variables_files(workdir: str, manifest: dict) -> list[str]:
  """The files whose concatenation is the packaged ``variables.msgpack``: the file
  itself, or the manifest's ``parts`` parts in order."""
  path = os.path.join(workdir, VARIABLES_FILE)
  if "parts" not in manifest:
    return [path]
  return [path + PART_SUFFIX.format(i) for i in range(manifest["parts"])]


def resolve(name_or_path: str) -> str:
  """A directory path, or the name of a model under the repository's ``pretrained/``."""
  if os.path.isdir(name_or_path):
    return name_or_path
  path = os.path.join(REPO_DIR, name_or_path)
  if os.path.isdir(path):
    return path
  known = sorted(os.listdir(REPO_DIR)) if os.path.isdir(REPO_DIR) else []
  raise FileNotFoundError(f"no packaged model {name_or_path!r} (a directory, or one of "
                          f"{known} under {REPO_DIR})")


def trained_with(cfg: TrainConfig, root: str | None = None) -> list[str]:
  """The packaged models under ``root`` (default: the repository's ``pretrained/``),
  as sorted paths, whose run followed the recipe of ``cfg``
  (:meth:`dropjax.config.TrainConfig.recipe`: equal but for where and how it ran),
  e.g. to skip training a preset that is packaged already.  A packaged model is a
  finished run; a directory whose ``config.json`` cannot be read is passed over."""
  found = []
  for path in sorted(glob.glob(os.path.join(root or REPO_DIR, "*", MANIFEST_FILE))):
    workdir = os.path.dirname(path)
    try:
      packaged = ckpt_lib.load_config(workdir)
    except (OSError, ckpt_lib.CheckpointError):
      continue
    if packaged.recipe() == cfg.recipe():
      found.append(workdir)
  return found


def read_manifest(workdir: str) -> dict:
  """The ``MANIFEST.json`` of the packaged model in ``workdir`` (``CheckpointError``
  if there is none)."""
  path = os.path.join(workdir, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise ckpt_lib.CheckpointError(f"{path} not found: {workdir} is not a packaged model")
  with open(path) as f:
    return json.load(f)


def read_variables(workdir: str, template: dict) -> dict:
  """The packaged variables, checked against the manifest's SHA-256, in the
  structure of ``template`` (``{"params", "batch_stats"}``)."""
  manifest = read_manifest(workdir)
  paths = variables_files(workdir, manifest)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ckpt_lib.CheckpointError(
        f"{missing[0]} not found: {len(missing)} of the {len(paths)} files of the packaged "
        f"variables in {workdir} are missing")
  data = b"".join(pathlib.Path(p).read_bytes() for p in paths)
  path = paths[0] if len(paths) == 1 else os.path.join(workdir, VARIABLES_FILE + ".part*")
  digest = hashlib.sha256(data).hexdigest()
  if digest != manifest["sha256"]:
    raise ckpt_lib.CheckpointError(
        f"{path} has SHA-256 {digest[:16]}..., the manifest says {manifest['sha256'][:16]}...: "
        "the file is damaged or was replaced")
  try:
    return flax.serialization.from_bytes(template, data)
  except Exception as e:  # msgpack/flax raise several types for a wrong structure
    raise ckpt_lib.CheckpointError(f"{path} does not hold this model's variables "
                                   f"({type(e).__name__}: {str(e)[:120]})") from e


@dataclasses.dataclass
class Pretrained:
  """A loaded model: its config, variables and inference function."""
  config: TrainConfig
  variables: dict
  logits_fn: Callable  # logits_fn(variables, x (B, 32, 32, 3) in [-1, 1]) -> (B, classes)
  manifest: dict


def load(name_or_path: str, backend=None) -> Pretrained:
  """Loads a packaged model (a path, or a name under ``pretrained/``) in one call."""
  from dropjax import backend as backend_lib  # pylint: disable=g-import-not-at-top
  from dropjax.data.datasets import DATASETS  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from dropjax.training import state as state_lib, step as step_lib
  workdir = resolve(name_or_path)
  cfg = ckpt_lib.load_config(workdir)
  backend = backend or backend_lib.resolve()
  model = state_lib.make_model(cfg, DATASETS[cfg.dataset].num_classes,
                               backend.layers(train=False))
  template = model.init(jax.random.PRNGKey(0), np.zeros((1, *IMAGE_SHAPE), np.float32))
  variables = read_variables(workdir, {"params": template["params"],
                                       "batch_stats": template["batch_stats"]})
  return Pretrained(cfg, variables, step_lib.make_logits_fn(model), read_manifest(workdir))


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(__file__)), check=False)
    return out.stdout.strip() or None
  except OSError:
    return None


def clean_accuracy(pre: Pretrained, images: np.ndarray, labels: np.ndarray,
                   batch_size: int = 500) -> float:
  """Accuracy of the undropped model on uint8 images (N, 32, 32, 3)."""
  from dropjax import inference  # pylint: disable=g-import-not-at-top
  predict = inference.make_predict(pre.logits_fn)
  return inference.accuracy(predict, pre.variables, images, labels, batch_size,
                            jax.random.PRNGKey(0))


@dataclasses.dataclass
class ExportConfig:
  """``python -m dropjax.pretrained``: package a finished training run."""
  workdir: str = dataclasses.field(default=None, metadata={
      "help": "finished training run (config.json, checkpoints/, final_eval.json)",
      "required": True})
  out: str = dataclasses.field(default=None, metadata={
      "help": "directory to write (e.g. pretrained/<name>)", "required": True})
  command: str = dataclasses.field(default="", metadata={
      "help": "the training command, recorded in the manifest"})
  hardware: str = dataclasses.field(default="", metadata={
      "help": "where it was trained (CPU model, cores), recorded in the manifest"})
  wall_time: str = dataclasses.field(default="", metadata={
      "help": "training wall time, recorded in the manifest"})
  check_examples: int = dataclasses.field(default=500, metadata={
      "help": "test images whose clean accuracy is recorded for the load test"})
  part_kib: int = dataclasses.field(default=1536, metadata={
      "help": "variables larger than this many KiB are written as parts of at most this "
              "size (a repository that takes no file over 2 MB keeps ResNet-56/110); "
              "0: always one file"})


def export(cfg: ExportConfig, data_dir: str | None = None) -> dict:
  """Writes the packaged model of the finished run ``cfg.workdir`` to ``cfg.out``."""
  from dropjax.evaluation.protocol import load_model  # pylint: disable=g-import-not-at-top
  if cfg.part_kib < 0:
    raise ValueError(f"part_kib must be >= 0 (0: one file), got {cfg.part_kib}")
  final = os.path.join(cfg.workdir, "final_eval.json")
  if not os.path.isfile(final):
    raise FileNotFoundError(f"{final} not found: package only finished runs")
  with open(final) as f:
    final_eval = json.load(f)
  train_cfg, variables, _, data = load_model(cfg.workdir, data_dir)
  variables = jax.device_get({"params": variables["params"],
                              "batch_stats": variables["batch_stats"]})
  os.makedirs(cfg.out, exist_ok=True)
  blob = flax.serialization.to_bytes(variables)
  path = os.path.join(cfg.out, VARIABLES_FILE)
  size = cfg.part_kib * 1024
  parts = ([blob] if not size or len(blob) <= size else
           [blob[i:i + size] for i in range(0, len(blob), size)])
  targets = [path] if len(parts) == 1 else [path + PART_SUFFIX.format(i)
                                            for i in range(len(parts))]
  for target, part in zip(targets, parts):
    files.write_atomic(target, part)
  for old in set(glob.glob(glob.escape(path) + "*")) - set(targets):
    os.remove(old)  # an earlier export's file or parts, whatever their split
  files.write_atomic(os.path.join(cfg.out, ckpt_lib.CONFIG_FILE), train_cfg.to_json())
  for name in COPIED_FILES:
    shutil.copyfile(os.path.join(cfg.workdir, name), os.path.join(cfg.out, name))
  manifest = {"name": os.path.basename(os.path.normpath(cfg.out)),
              "step": final_eval["step"], "sha256": hashlib.sha256(blob).hexdigest(),
              "bytes": len(blob), **({"parts": len(parts)} if len(parts) > 1 else {}),
              "dataset": train_cfg.dataset, "depth": train_cfg.depth,
              "drop": train_cfg.drop_spec.describe(), "epochs": train_cfg.epochs,
              "test_examples": final_eval.get("test_examples"),
              **{k: v for k, v in final_eval.items() if k.startswith("test_accuracy")},
              "command": cfg.command, "hardware": cfg.hardware, "wall_time": cfg.wall_time,
              "packaged_by_commit": _git_commit(),
              "packaged_on": datetime.date.today().isoformat()}
  files.write_atomic(os.path.join(cfg.out, MANIFEST_FILE),
                     json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  n = min(cfg.check_examples, len(data.test))
  pre = load(cfg.out)
  manifest["check_examples"] = n
  manifest["check_accuracy_clean"] = clean_accuracy(pre, data.test.x[:n], data.test.y[:n])
  files.write_atomic(os.path.join(cfg.out, MANIFEST_FILE),
                     json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return manifest


def main(argv=None) -> int:
  from dropjax import backend as backend_lib, cli  # pylint: disable=g-import-not-at-top
  backend_lib.configure_process()

  def run(cfg: ExportConfig) -> int:
    print(json.dumps(export(cfg), indent=2, sort_keys=True))
    return 0

  return cli.run_command("python -m dropjax.pretrained", __doc__, ExportConfig, run, argv)


if __name__ == "__main__":
  raise SystemExit(main())
