"""Training configuration as data, with named presets for the paper's runs.

Every field of :class:`TrainConfig` is a ``train.py`` flag of the same name
(help text from the field's metadata).  Presets (``--preset NAME``) set the
paper's settings; explicit flags override them.

Weight decay defaults to 1e-4 (coupled L2, added to the gradient as in
PyTorch's SGD), the value He et al. (2016) use for the CIFAR ResNets this
project reproduces; 5e-4 is the common choice for wider networks.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from dropjax.masks import DROP_MODES, DropSpec
from dropjax.models import INPUT_ENCODINGS
from dropjax.units import BUDGET_READINGS

OBJECTIVES = ("standard", "uniform_original", "uniform_noisy")
SCHEDULES = ("cosine", "step")
PARALLEL = ("jit", "pmap")
ADV_TRAINING = ("none", "pgd")
ADV_NORMS = ("linf", "l2")


def _f(default, help_text: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help_text, **kw})


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a training run."""
  # Data.
  dataset: str = _f("cifar10", "dataset: cifar10 or gtsrb")
  source: str = _f("auto", "data source: auto (local copy if --data_dir or "
                   "$DROPJAX_DATA_DIR is set, else tfds), local or tfds")
  data_dir: str | None = _f(None, "local data root (holding cifar10/ and gtsrb/) "
                            "or tfds data dir; default $DROPJAX_DATA_DIR")
  val_size: int | None = _f(None, "images held out for validation (GTSRB: whole "
                            "tracks); default 5000 for CIFAR-10, 3900 for GTSRB")
  train_examples: int | None = _f(None, "train on a seeded random subset of N "
                                  "training images (quick runs); default all")
  # Model.
  depth: int = _f(20, "ResNet depth 6n+2: 20, 56, 110, ...")
  width: int = _f(16, "filters of the first stage (He et al.: 16)")
  half_precision: bool = _f(False, "bfloat16 compute with float32 params (GPU/TPU)")
  # Pixel dropping.
  drop: str = _f("none", "pixel dropping during training: none (normal "
                 "training), fixed (rate --drop_rate), random (r ~ U[0,1] "
                 "per image per step) or ablate (exactly --keep whole pixels "
                 "per image per step: randomized ablation, for certify.py)")
  drop_rate: float = _f(0.9, "drop rate r for --drop fixed")
  per_pixel: bool = _f(False, "drop all channels of a pixel together (the "
                       "paper drops single values)")
  keep: int = _f(75, "--drop ablate: pixels kept per image, of H*W = 1024 "
                 "(Levine & Feizi's CIFAR-10 setting: 75)")
  input_encoding: str = _f("values", "how the model sees dropped pixels: values (a "
                           "dropped value is 0, the paper) or doubled (Levine & Feizi: "
                           "channels [v, 1-v] on the [0,1] scale for kept pixels, [0, 0] "
                           "for ablated ones; 6-channel stem; needs --drop ablate) or mean "
                           "(Levine & Feizi's other variant: an ablated pixel takes the "
                           "training set's per-channel mean; needs --drop ablate)")
  objective: str = _f("standard", "training objective: standard, "
                      "uniform_original (paper's 'what if' (b): original "
                      "images pushed to uniform) or uniform_noisy ((c): noisy "
                      "subsampled images pushed to uniform)")
  aux_weight: float = _f(1.0, "weight of the auxiliary uniform-target term")
  aux_eps: float = _f(16 / 255, "noise size for uniform_noisy, as the paper states "
                      "it (read per --budget_reading)")
  # Adversarial training (the baseline pixel dropping is compared with).
  adv_training: str = _f("none", "adversarial training (Madry et al. 2018): none, or pgd "
                         "(every batch is replaced by PGD adversarial examples found "
                         "against the model in training mode; needs --drop none)",
                         choices=ADV_TRAINING)
  adv_norm: str = _f("linf", "--adv_training pgd: threat model, linf or l2", choices=ADV_NORMS)
  adv_eps: float = _f(16 / 255, "--adv_training pgd: budget, read per --budget_reading "
                      "(default 16/255 in X units = Madry et al.'s 8/255 on the [0,1] scale)")
  adv_steps: int = _f(7, "--adv_training pgd: PGD steps per batch (Madry et al.: 7)")
  adv_step_size: float | None = _f(None, "--adv_training pgd: step size, read per "
                                   "--budget_reading; default 2.5 * adv_eps / adv_steps")
  budget_reading: str = _f("literal", "units of --aux_eps and --adv_eps: literal (in units of the "
                           "images X in [-1,1], as the paper writes it) or doubled (on "
                           "the [0,1] pixel scale, x2 in X units)", choices=BUDGET_READINGS)
  # Augmentation.
  crop_pad: int = _f(4, "random-crop padding in pixels (0 disables)")
  hflip: bool | None = _f(None, "random horizontal flips; default on for "
                          "CIFAR-10, off for GTSRB (flips change sign meaning)")
  # Optimisation.
  epochs: int = _f(180, "training epochs")
  batch_size: int = _f(128, "global batch size (divisible by the device count)")
  lr: float = _f(0.1, "peak learning rate")
  schedule: str = _f("cosine", "learning-rate schedule: cosine or step")
  lr_boundaries: tuple = _f((0.5, 0.75), "step schedule: fractions of training "
                            "at which the lr is multiplied by 0.1", nargs="+",
                            type=float)
  warmup_epochs: float = _f(0.0, "linear warm-up epochs")
  momentum: float = _f(0.9, "SGD momentum")
  nesterov: bool = _f(False, "Nesterov momentum")
  weight_decay: float = _f(1e-4, "coupled L2 weight decay (He et al.: 1e-4)")
  seed: int = _f(0, "seed of init, data order, masks and augmentation")
  # Devices.
  parallel: str = _f("jit", "jit (batch sharded over a 1-D mesh of all "
                     "devices) or pmap (lax.pmean of gradients and BN stats)")
  distributed: bool = _f(False, "call jax.distributed.initialize() (multi-host "
                         "TPU pods / multi-node GPU; reads the usual env vars)")
  coordinator_address: str | None = _f(None, "multi-host: host:port of process 0")
  num_processes: int | None = _f(None, "multi-host: number of processes")
  process_id: int | None = _f(None, "multi-host: index of this process")
  # Bookkeeping.
  checkpoint_every: int = _f(0, "save a checkpoint every N steps (0: every epoch)")
  keep_checkpoints: int = _f(3, "keep the last k checkpoints")
  log_every: int = _f(50, "write training metrics every N steps")
  eval_batch_size: int = _f(500, "batch size for validation/test evaluation")
  eval_every_epochs: int = _f(1, "validation accuracy every N epochs (0: only at the end)")
  tensorboard: bool = _f(False, "also write TensorBoard summaries to the workdir")

  def validate(self) -> "TrainConfig":
    """Raises ValueError with a clear message for inconsistent settings."""
    from dropjax.data.datasets import DATASETS  # pylint: disable=g-import-not-at-top
    checks = [
        (self.dataset in DATASETS,
         f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}"),
        (self.source in ("auto", "local", "tfds"), f"unknown source {self.source!r}"),
        (self.depth >= 8 and (self.depth - 2) % 6 == 0,
         f"depth must be 6n+2 (20, 56, 110), got {self.depth}"),
        (self.width > 0, "width must be positive"),
        (self.drop in DROP_MODES, f"drop must be one of {DROP_MODES}, got {self.drop!r}"),
        (0.0 <= self.drop_rate <= 1.0, f"drop_rate must be in [0, 1], got {self.drop_rate}"),
        (self.keep >= 1, f"keep must be >= 1, got {self.keep}"),
        (self.budget_reading in BUDGET_READINGS,
         f"budget_reading must be one of {BUDGET_READINGS}, got {self.budget_reading!r}"),
        (self.input_encoding in INPUT_ENCODINGS,
         f"input_encoding must be one of {INPUT_ENCODINGS}, got {self.input_encoding!r}"),
        (self.input_encoding == "values" or self.drop == "ablate",
         f"--input_encoding {self.input_encoding} encodes ablated pixels: it needs --drop ablate"),
        (self.objective == "standard" or self.drop != "ablate",
         "the auxiliary objectives are defined for pixel dropping, not ablation"),
        (self.objective in OBJECTIVES,
         f"objective must be one of {OBJECTIVES}, got {self.objective!r}"),
        (self.objective == "standard" or self.drop != "none",
         "the auxiliary objectives need pixel dropping (--drop fixed or random)"),
        (self.adv_training in ADV_TRAINING,
         f"adv_training must be one of {ADV_TRAINING}, got {self.adv_training!r}"),
        (self.adv_training == "none" or (self.drop == "none" and self.objective == "standard"),
         "--adv_training pgd is the adversarial-training baseline: it needs --drop none "
         "and --objective standard"),
        (self.adv_norm in ADV_NORMS, f"adv_norm must be one of {ADV_NORMS}, got {self.adv_norm!r}"),
        (self.adv_eps >= 0, f"adv_eps must be >= 0, got {self.adv_eps}"),
        (self.adv_steps >= 1, f"adv_steps must be >= 1, got {self.adv_steps}"),
        (self.adv_step_size is None or self.adv_step_size > 0,
         f"adv_step_size must be positive, got {self.adv_step_size}"),
        (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
        (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
        (self.lr > 0, f"lr must be positive, got {self.lr}"),
        (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
        (all(0 < b < 1 for b in self.lr_boundaries), "lr_boundaries must lie in (0, 1)"),
        (self.weight_decay >= 0, "weight_decay must be >= 0"),
        (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
        (self.crop_pad >= 0, "crop_pad must be >= 0"),
        (self.parallel in PARALLEL, f"parallel must be one of {PARALLEL}, got {self.parallel!r}"),
        (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
        (self.log_every >= 1, "log_every must be >= 1"),
        (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
        (self.train_examples is None or self.train_examples >= 1, "train_examples must be >= 1"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    return self

  def replace(self, **kw) -> "TrainConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["lr_boundaries"] = list(self.lr_boundaries)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown config keys {sorted(unknown)}")
    d = dict(d)
    if "lr_boundaries" in d:
      d["lr_boundaries"] = tuple(d["lr_boundaries"])
    return cls(**d)

  def recipe(self) -> dict[str, Any]:
    """What the run trains: :meth:`to_dict` without :data:`EXECUTION_FIELDS`."""
    return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @property
  def drop_spec(self) -> DropSpec:
    """The training-time :class:`dropjax.masks.DropSpec` (``drop``, ``drop_rate``,
    ``per_pixel``; ``keep`` for ``ablate``)."""
    if self.drop == "ablate":
      return DropSpec.ablation(self.keep)
    return DropSpec(self.drop, self.drop_rate if self.drop == "fixed" else 0.0, self.per_pixel)

  @property
  def adv_step(self) -> float:
    """The PGD step of adversarial training, as stated (``budget_reading`` units)."""
    if self.adv_step_size is not None:
      return self.adv_step_size
    return 2.5 * self.adv_eps / self.adv_steps

  @property
  def model_takes_mask(self) -> bool:
    """Whether the model must be told which pixels are kept (``doubled`` and
    ``mean`` encodings)."""
    return self.input_encoding in ("doubled", "mean")

  @property
  def input_fill(self) -> tuple[float, ...] | None:
    """``mean`` encoding: the dataset's per-channel mean in the units of X."""
    if self.input_encoding != "mean":
      return None
    from dropjax.data.datasets import DATASETS  # pylint: disable=g-import-not-at-top
    return tuple(2 * m - 1 for m in DATASETS[self.dataset].channel_mean)

  @property
  def use_hflip(self) -> bool:
    from dropjax.data.datasets import DATASETS  # pylint: disable=g-import-not-at-top
    return DATASETS[self.dataset].hflip if self.hflip is None else self.hflip


# Fields that define the model and its checkpoint layout; a workdir's saved
# config must agree on them to resume or evaluate.
ARCHITECTURE_FIELDS = ("dataset", "depth", "width", "input_encoding")
# Fields that say where and how a run executes (data location, devices, bookkeeping),
# not what it trains: two configs that differ only in these follow the same recipe.
EXECUTION_FIELDS = ("source", "data_dir", "parallel", "distributed", "coordinator_address",
                    "num_processes", "process_id", "checkpoint_every", "keep_checkpoints",
                    "log_every", "eval_batch_size", "eval_every_epochs", "tensorboard")

_DROP_PRESETS = {"normal": dict(drop="none"),
                 "fixed": dict(drop="fixed", drop_rate=0.9),
                 "random": dict(drop="random")}
_DATASET_PRESETS = {
    # The paper's Table 1: ResNet-20 for GTSRB, ResNet-20/56/110 for CIFAR-10.
    "cifar10": dict(dataset="cifar10", epochs=180),
    "gtsrb": dict(dataset="gtsrb", epochs=30),
}


_DEPTH_PRESETS = {
    # He et al. (Sec. 4.2): for ResNet-110 an initial lr of 0.1 "is slightly too large
    # to start converging", so they train at 0.01 until the training error is below 80%
    # (about 400 iterations, one epoch at batch 128), then at 0.1.  Here: a linear
    # warm-up to 0.1 over the first epoch.
    110: dict(warmup_epochs=1.0),
}


def _build_presets() -> dict[str, dict[str, Any]]:
  presets = {}
  for ds, depths in (("cifar10", (20, 56, 110)), ("gtsrb", (20,))):
    for depth in depths:
      for mode, drop in _DROP_PRESETS.items():
        presets[f"{ds}-resnet{depth}-{mode}"] = {**_DATASET_PRESETS[ds], "depth": depth,
                                                 **_DEPTH_PRESETS.get(depth, {}), **drop}
  for mode in ("uniform_original", "uniform_noisy"):
    presets[f"cifar10-resnet20-fixed-{mode}"] = {
        **presets["cifar10-resnet20-fixed"], "objective": mode}
  # Randomized-ablation models for certification (Levine & Feizi: k = 75 on CIFAR-10).
  for ds, epochs in (("cifar10", 180), ("gtsrb", 30)):
    presets[f"{ds}-resnet20-ablate75"] = dict(dataset=ds, epochs=epochs, depth=20,
                                             drop="ablate", keep=75,
                                             input_encoding="doubled")
  # The adversarial-training baseline (Madry et al.): PGD-7 at the paper's GTSRB
  # L-inf budget (32/255 in X units), step 2.5 eps / 7.
  presets["gtsrb-resnet20-pgd-at"] = dict(dataset="gtsrb", epochs=30, depth=20, drop="none",
                                          adv_training="pgd", adv_norm="linf",
                                          adv_eps=32 / 255, adv_steps=7)
  # A few-minute CPU smoke run: real data, small subset, ResNet-8.
  presets["quick"] = dict(dataset="gtsrb", depth=8, drop="random", epochs=3,
                          train_examples=8192, batch_size=128, val_size=600,
                          eval_every_epochs=1)
  return presets


PRESETS = _build_presets()


def from_preset(name: str | None, **overrides) -> TrainConfig:
  """The preset ``name`` (or the defaults) with ``overrides`` applied, validated."""
  base = {}
  if name is not None:
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
  return TrainConfig(**{**base, **overrides}).validate()
