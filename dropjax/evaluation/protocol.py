"""The evaluation protocol: what is computed for a trained checkpoint.

For every *setting* (norm, eps, test-time drop rate) the test examples are
processed in chunks of ``batch_size``.  Chunk ``c`` draws all its randomness
from ``fold_in(PRNGKey(seed), c)`` (:func:`evaluate_chunk`), so a killed
evaluation resumes where it stopped and produces exactly the rows of an
uninterrupted run.  Where rows and summaries are stored is
:mod:`dropjax.evaluation.store`; a setting's summary is an aggregate of its
rows only (:func:`summarize`).

Per example: clean predictions (no mask, one mask, K-mask average),
entropies and rejection flags; with an attack, every configuration (loss x
mode x target x restart, :func:`attack_configs`) is run (with the cascade, those
after the first only on the examples not yet broken everywhere,
:func:`evaluate_chunk`), each output is scored by the defense's real decision in
``score_draws`` independent draws, and per metric the worst attack is kept
(:mod:`dropjax.evaluation.worst_case`); the largest perturbation (L-inf / L2 in
units of X and on the [0, 1] scale, L0 in pixels) and the budget in both units
(:mod:`dropjax.units`).  The entropy
thresholds are calibrated on the validation split by the paper's rule or the
stricter one (:func:`calibrate`), saved in the summary and kept in the output
directory, so a resumed or completed setting reuses them
(:func:`dropjax.evaluation.store.cached_calibration`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dropjax import backend as backend_lib
from dropjax import contracts, deadlines, defense, files, inference, pretrained, units
from dropjax.attacks import (APGDConfig, AttackConfig, SparseRSConfig, make_apgd, make_pgd,
                             make_sparse_rs, paper_attack)
from dropjax.attacks import norms as norms_lib
from dropjax.config import TrainConfig
from dropjax.data import augment, load_dataset
from dropjax.evaluation import worst_case
from dropjax.evaluation.store import (SettingStore, cached_calibration, committed_rows,
                                      committed_timing, digest, longest_kept_chunk_seconds,
                                      longest_chunk_seconds, update_summary)
from dropjax.masks import DropSpec
from dropjax.units import BUDGET_READINGS
from dropjax.training import checkpoint as ckpt_lib
from dropjax.training import state as state_lib, step as step_lib

ATTACK_NORMS = ("linf", "l2", "l0", "none")


def _f(default, help_text: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help_text, **kw})


ATTACK_MODES = ("untargeted", "targeted")
CASCADE_CHOICES = ("auto", "true", "false")
ATTACKS = ("pgd", "apgd", "sparse_rs")
ATTACK_LOSSES = {"pgd": ("ce", "cw", "rejection"), "apgd": ("ce", "dlr"),
                 "sparse_rs": ("margin", "rejection")}
# The paper's; APGD's; Sparse-RS's margin on the averaged probabilities.
DEFAULT_LOSSES = {"pgd": ("ce", "cw"), "apgd": ("ce", "dlr"), "sparse_rs": ("margin",)}


@dataclasses.dataclass
class EvalConfig:
  """One evaluation run (possibly a sweep over drop rates and eps).  Every
  field is an ``evaluate.py`` flag of the same name.  The defaults are the
  paper's protocol: its budgets read literally, its calibration rule, the
  worst case over CE / CW, untargeted and targeted, per example."""
  norm: str = _f("linf", "threat model; 'none' only measures clean accuracy (drop-rate "
                 "sweeps, Fig. 2)", choices=ATTACK_NORMS)
  eps: tuple | None = _f(None, "budget(s), a sweep if several, as the paper states them: "
                         "L-inf/L2 read per --budget_reading (e.g. 0.0627 = 16/255); L0: "
                         "fraction of the pixels D (paper: 0.03). Default: the paper's "
                         "budget for the dataset", type=float)
  budget_reading: str = _f("literal", "units of --eps and --step_size: literal (units of "
                           "the images X in [-1,1], as the paper writes them) or doubled "
                           "(the [0,1] pixel scale: twice the literal budget)",
                           choices=BUDGET_READINGS)
  attack: str = _f("pgd", "attack algorithm: pgd (the paper's EOT-PGD), apgd (Croce & "
                    "Hein's APGD with its published step-size schedule; L-inf and L2) or "
                    "sparse_rs (black-box L0 random search on the defended decision)",
                    choices=ATTACKS)
  queries: int = _f(1000, "sparse_rs: queries of the defended decision per image")
  step_size: float | None = _f(None, "PGD step (read like --eps; L0: multiple of the "
                               "mean |gradient|); default: the paper's. APGD sets its own")
  steps: int = _f(20, "attack iterations")
  eot_samples: int = _f(10, "masks per EOT gradient (0: attack the undefended model, "
                        "plain PGD)")
  losses: tuple | None = _f(None, "attack losses (pgd: ce, cw, rejection -- the "
                            "rejection-aware loss on the mask-averaged probabilities; apgd: "
                            "ce, dlr; sparse_rs: margin, rejection; default: pgd ce cw, "
                            "apgd ce dlr, sparse_rs margin); every loss x mode x "
                            "target x restart is run and the worst case kept per example "
                            "and metric", choices=("ce", "cw", "dlr", "margin", "rejection"))
  entropy_weight: float = _f(1.0, "loss rejection: weight of the entropy term")
  modes: tuple = _f(ATTACK_MODES, "untargeted and/or targeted attacks", choices=ATTACK_MODES)
  num_targets: int = _f(1, "targeted attacks aim at each of the top-k other classes of "
                        "the clean averaged prediction")
  restarts: int = _f(1, "random restarts per configuration")
  random_start: bool = _f(True, "start PGD at a random point of the budget (false: at the "
                          "clean image)")
  score_draws: int = _f(5, "independent draws of the defense's decision (its masks) that "
                        "score each adversarial input: mean and spread are reported")
  drop_rates: tuple | None = _f(None, "test-time drop rate(s), a sweep if several (default: "
                                "the model's training rate; 0.5 for random-rate models; 0 "
                                "for normal training)", type=float)
  num_masks: int = _f(10, "masks averaged by the defense")
  calibration: str = _f("single", "entropy threshold rule: single (the paper: the averaged "
                        "defense's clean validation accuracy, rejections counted as "
                        "errors, is --max_drop below the single-mask accuracy) or avg "
                        "(stricter: --max_drop below the averaged accuracy)",
                        choices=defense.CALIBRATION_RULES)
  max_drop: float = _f(0.01, "allowed drop of clean validation accuracy by rejection "
                       "(fraction; 0.01 = 1 point)")
  num_examples: int = _f(1000, "test examples (0: all)")
  batch_size: int = _f(100, "examples per chunk (the resume unit)")
  seed: int = _f(0, "seed of masks and attack randomness")
  rows_from: str | None = _f(None, "directory of kept per-example rows (<setting>.rows.jsonl.gz "
                             "and <setting>.setting.json, as experiments/lib.sh save_rows "
                             "keeps them): the chunks they hold in full are taken from there "
                             "instead of recomputed, e.g. to extend a committed evaluation "
                             "to more examples; the entropy thresholds kept there "
                             "(calibration.jsonl) are used where their key matches")
  cascade: str = _f("auto", "run every attack configuration after the first only on the "
                    "examples no earlier one broke in every draw for every metric (their "
                    "worst case is final: no attack can raise it, and ties go to the "
                    "first), in calls of --cascade_batch examples; the worst case is the "
                    "one a full run defines, for fewer attack calls. true, false, or auto: "
                    "true for a new setting, and for rows being resumed or extended "
                    "(--rows_from) the way they were begun", choices=CASCADE_CHOICES)
  cascade_batch: int = _f(10, "examples per attack call of the cascade (the attacks after "
                          "the first; at most --batch_size)")
  stop_at: str | None = _f(None, "wall-clock deadline (ISO 8601, e.g. 2026-12-04T12:05 "
                           "local time, or with a UTC offset): no chunk starts that is "
                           "expected to end after it -- expected to take as long as the "
                           "longest chunk this --out has timed for the setting, else for "
                           "any setting, else kept in --rows_from for any setting (none "
                           "timed yet: it starts while the deadline is ahead); the run then moves on to its next setting, and exits "
                           "0 with what it finished. So a job that must end by a time "
                           "loses no half-computed chunk")
  sanity: bool = _f(False, "run the gradient-masking sanity checks instead (large budget, "
                    "more steps, more EOT, black-box vs white-box, loss curve): "
                    "pass/fail rows in <out>/sanity/checks.jsonl")
  sanity_examples: int = _f(100, "test examples of each sanity check")
  sanity_tolerance: float = _f(0.05, "sanity checks: allowed robust-accuracy slack "
                               "(fraction)")

  @property
  def attack_losses(self) -> tuple:
    """``losses``, or both losses of the attack algorithm."""
    return tuple(self.losses) if self.losses else DEFAULT_LOSSES.get(self.attack, ())

  def validate(self) -> "EvalConfig":
    if self.norm not in ATTACK_NORMS:
      raise ValueError(f"unknown norm {self.norm!r}; choose one of {ATTACK_NORMS}")
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if self.num_masks < 1:
      raise ValueError(f"num_masks must be >= 1, got {self.num_masks}")
    if self.batch_size < 1 or self.num_examples < 0:
      raise ValueError("batch_size must be >= 1 and num_examples >= 0 (0: all)")
    if self.attack not in ATTACKS:
      raise ValueError(f"unknown attack {self.attack!r}; choose one of {ATTACKS}")
    for loss in self.attack_losses:
      if loss not in ATTACK_LOSSES[self.attack]:
        raise ValueError(f"unknown {self.attack} loss {loss!r}; choose from "
                         f"{ATTACK_LOSSES[self.attack]}")
    if self.attack == "apgd" and self.norm == "l0":
      raise ValueError("APGD is defined for linf and l2 here; use --attack pgd for l0")
    if self.attack == "sparse_rs" and self.norm != "l0":
      raise ValueError("Sparse-RS is an L0 attack: use --norm l0")
    if self.queries < 1:
      raise ValueError(f"queries must be >= 1, got {self.queries}")
    if not self.attack_losses or not self.modes:
      raise ValueError("need at least one loss and one mode")
    for mode in self.modes:
      if mode not in ATTACK_MODES:
        raise ValueError(f"unknown attack mode {mode!r}; choose one of {ATTACK_MODES}")
    if self.cascade not in CASCADE_CHOICES:
      raise ValueError(f"unknown cascade {self.cascade!r}; choose one of {CASCADE_CHOICES}")
    if self.cascade_batch < 1:
      raise ValueError(f"cascade_batch must be >= 1, got {self.cascade_batch}")
    if self.restarts < 1 or self.num_targets < 1 or self.score_draws < 1:
      raise ValueError("restarts, num_targets and score_draws must be >= 1")
    if self.calibration not in defense.CALIBRATION_RULES:
      raise ValueError(f"unknown calibration rule {self.calibration!r}; choose one of "
                       f"{defense.CALIBRATION_RULES}")
    units.check_reading(self.budget_reading)
    for r in self.drop_rates or ():
      if not 0 <= r <= 1:
        raise ValueError(f"drop rates must be in [0, 1], got {r}")
    for e in self.eps or ():
      if e < 0:
        raise ValueError(f"eps must be >= 0, got {e}")
    if self.stop_at is not None:
      deadlines.parse(self.stop_at)
    return self


def default_drop_rate(train_cfg: TrainConfig, num_pixels: int) -> float:
  """Test-time drop rate: the training rate (fixed), 0.5 (random), 0 (normal),
  ``1 - keep / num_pixels`` (ablation models with the values encoding)."""
  if train_cfg.drop == "ablate":
    return 1.0 - train_cfg.keep / num_pixels
  return {"fixed": train_cfg.drop_rate, "random": 0.5, "none": 0.0}[train_cfg.drop]


def setting_id(norm: str, eps: float, rate: float, reading: str = "literal",
               variant: str = "") -> str:
  """The name of one setting's directory and summary row; ``variant``
  (:func:`attack_variant`) names an attack other than the default one."""
  if norm in ("none", "l0"):  # no budget units to name
    base = f"{norm}_eps{eps:.6g}_r{rate:.6g}"
  else:
    base = f"{norm}_eps{eps:.6g}_{reading}_r{rate:.6g}"
  return f"{base}_{variant}" if variant else base


# Fields that do not change a setting's rows beyond its id: the id names norm,
# eps and rate; a larger num_examples only adds chunks (chunk c is the same
# examples and randomness for any N); the sanity fields select another command.
_OUTSIDE_ROWS = ("norm", "eps", "drop_rates", "num_examples", "sanity", "sanity_examples",
                 "sanity_tolerance", "rows_from", "cascade", "cascade_batch", "stop_at")
# The attack's fields (irrelevant to a clean-accuracy setting, norm "none").
_ATTACK_FIELDS = ("budget_reading", "attack", "queries", "step_size", "steps", "eot_samples",
                  "losses", "entropy_weight", "modes", "num_targets", "restarts",
                  "random_start", "score_draws")


def attack_variant(ev: EvalConfig) -> str:
  """The attack of ``ev`` as it differs from the defaults, for :func:`setting_id`
  ("" for the paper's protocol): the algorithm (Sparse-RS with its queries),
  losses, modes, steps and EOT samples, e.g. ``apgd_steps100`` or ``eot1``.
  A sweep over them (one command per value, into one ``--out``) gets one
  setting each; the remaining fields are guarded by :func:`row_config`."""
  if ev.norm == "none":
    return ""
  default = EvalConfig()
  tokens = []
  if ev.attack != default.attack:
    tokens.append(f"{ev.attack}_q{ev.queries}" if ev.attack == "sparse_rs" else ev.attack)
  if ev.attack_losses != DEFAULT_LOSSES[ev.attack]:
    tokens.append("-".join(ev.attack_losses))
  if tuple(ev.modes) != tuple(default.modes):
    tokens.append("-".join(ev.modes))
  if ev.attack != "sparse_rs":
    if ev.steps != default.steps:
      tokens.append(f"steps{ev.steps}")
    if ev.eot_samples != default.eot_samples:
      tokens.append(f"eot{ev.eot_samples}")
  return "_".join(tokens)


def row_config(ev: EvalConfig, cascade: bool = False) -> dict:
  """Everything besides the setting id that determines a setting's rows
  (JSON-ready); :class:`dropjax.evaluation.store.SettingStore` refuses to
  resume chunks written under another.  ``cascade``: whether the setting's
  attacks cascade (:func:`cascade_for`); recorded only when they do, so the
  configurations of rows computed before the cascade existed read as
  without it."""
  skip = _OUTSIDE_ROWS + (_ATTACK_FIELDS if ev.norm == "none" else ())
  out = {f.name: getattr(ev, f.name) for f in dataclasses.fields(ev) if f.name not in skip}
  if ev.norm != "none":
    out.update(losses=list(ev.attack_losses), modes=list(ev.modes))
    if cascade:
      out.update(cascade=True, cascade_batch=ev.cascade_batch)
  return out


def cascade_for(ev: EvalConfig, begun: dict | None) -> bool:
  """Whether a setting's attacks cascade: ``--cascade true/false`` as given;
  ``auto``: yes for a new setting (``begun is None``), else as the rows it
  continues were computed (``begun``: their configuration, ``{}`` when they
  hold none), so a setting's rows are all computed one way."""
  if ev.cascade != "auto":
    return ev.cascade == "true"
  return True if begun is None else bool(begun.get("cascade", False))


def load_model(workdir: str, data_dir: str | None = None, source: str | None = None,
               backend: backend_lib.Backend | None = None):
  """(train config, variables, logits_fn, dataset) of the run in ``workdir``
  (a training workdir, or a packaged model, :mod:`dropjax.pretrained`).

  ``logits_fn`` is the inference-mode model built from ``backend``'s layers
  (default :func:`dropjax.backend.resolve`)."""
  backend = backend or backend_lib.resolve()
  cfg = ckpt_lib.load_config(workdir)
  if data_dir is not None:
    cfg = cfg.replace(data_dir=data_dir)
  if source is not None:
    cfg = cfg.replace(source=source)
  data = load_dataset(cfg.dataset, source=cfg.source, data_dir=cfg.data_dir,
                      val_size=cfg.val_size, seed=cfg.seed)
  model = state_lib.make_model(cfg, data.num_classes, backend.layers(train=False))
  tx = state_lib.make_optimizer(cfg, 1)
  template = state_lib.create_state(jax.random.PRNGKey(0), model, tx, data.image_shape)
  if pretrained.is_packaged(workdir):  # pretrained/NAME: verified variables only
    return cfg, pretrained.read_variables(workdir, template.variables), \
        step_lib.make_logits_fn(model), data
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    state = checkpointer.restore(template)
  finally:
    checkpointer.close()
  return cfg, state.variables, step_lib.make_logits_fn(model), data


def make_defense_fn(logits_fn, drop: DropSpec, num_masks: int):
  """Jitted ``defend(key, variables, x) -> dict`` of (B, C) probabilities."""

  @jax.jit
  def defend(key, variables, x):
    k_single, k_avg = jax.random.split(key)
    return {
        "plain": jax.nn.softmax(logits_fn(variables, x), -1),
        "single": defense.masked_probs(k_single, logits_fn, variables, x, drop),
        "avg": defense.mask_average_probs(k_avg, logits_fn, variables, x, drop, num_masks),
    }

  return defend


def calibrate(defend, variables, val_x, val_y, batch_size: int, key, max_drop: float,
              rule: str = "single") -> dict:
  """Entropy thresholds of the single-mask and the averaged prediction on the
  validation split, and the accuracies they were calibrated from.

  ``rule="single"`` (the paper): the averaged defense's accuracy with rejection
  is ``max_drop`` below the single-mask accuracy; ``"avg"``: below its own.
  The single-mask prediction's threshold is ``max_drop`` below its own
  accuracy under either rule.
  """
  out = inference.map_batches(
      lambda b: defend(jax.random.fold_in(key, int(b["index"][0])), variables,
                       augment.to_float(b["image"])),
      {"image": val_x}, batch_size)
  correct = {kind: out[kind].argmax(-1) == val_y for kind in ("single", "avg")}
  acc = {kind: float(c.mean()) for kind, c in correct.items()}
  reference = {"single": acc["single"], "avg": acc["single"] if rule == "single" else acc["avg"]}
  th = {kind: defense.calibrate_threshold(np.asarray(defense.entropy(out[kind])), correct[kind],
                                          max_drop, reference[kind])
        for kind in ("single", "avg")}
  return {**th, "val_accuracy_single": acc["single"], "val_accuracy_avg": acc["avg"],
          "target_accuracy_avg": reference["avg"] - max_drop, "rule": rule}


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack configuration of an evaluation: a name, its compiled attack
  ``(key, variables, x, y, target) -> x_adv``, and for targeted attacks the
  rank of its target among the clean prediction's other classes."""
  name: str
  run: Callable
  target_rank: int | None = None


def attack_configs(ev: EvalConfig, dataset: str, eps: float, drop: DropSpec,
                   eot_impl: str = "vmap") -> list[tuple[str, Any, int | None]]:
  """``(name, config, target rank)`` of every configuration: loss x mode x
  target (top-k) x restart; configs are :class:`AttackConfig` (pgd) or
  :class:`APGDConfig` (apgd)."""
  base = paper_attack(dataset, ev.norm)
  kw = dict(num_steps=ev.steps, eot_samples=ev.eot_samples, drop=drop,
            budget_reading=ev.budget_reading)
  if ev.attack == "pgd":
    kw.update(random_start=ev.random_start, eot_impl=eot_impl,
              entropy_weight=ev.entropy_weight)
    if ev.norm == "l0":
      kw["l0_fraction"] = eps
    else:
      kw["eps"] = eps
    if ev.step_size is not None:
      kw["step_size"] = ev.step_size
  out = []
  for loss in ev.attack_losses:
    for mode in ev.modes:
      ranks = range(ev.num_targets) if mode == "targeted" else [None]
      for rank in ranks:
        for restart in range(ev.restarts):
          name = (f"{'' if ev.attack == 'pgd' else ev.attack + '-'}{loss}-{mode}"
                  + (f"-top{rank + 1}" if rank is not None else "")
                  + (f"-restart{restart}" if ev.restarts > 1 else ""))
          if ev.attack == "apgd":
            cfg = APGDConfig(norm=ev.norm, eps=eps, loss=loss, targeted=mode == "targeted",
                             **kw).validate()
          elif ev.attack == "sparse_rs":
            cfg = SparseRSConfig(l0_fraction=eps, num_queries=ev.queries,
                                 targeted=mode == "targeted", num_masks=ev.num_masks,
                                 drop=drop, entropy_weight=ev.entropy_weight
                                 if loss == "rejection" else 0.0).validate()
          else:
            cfg = base.replace(loss=loss, targeted=mode == "targeted", **kw).validate()
          out.append((name, cfg, rank))
  return out


def compile_attack(logits_fn, config, backend: backend_lib.Backend) -> Callable:
  """The jitted attack of one configuration (PGD or APGD)."""
  unroll = backend.loop_unroll(config.num_steps)
  if isinstance(config, APGDConfig):
    return jax.jit(make_apgd(logits_fn, config, unroll=unroll))
  if isinstance(config, SparseRSConfig):
    return jax.jit(make_sparse_rs(logits_fn, config))
  return jax.jit(make_pgd(logits_fn, config, unroll=unroll))


def perturbation_norms(x_adv: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
  """L-inf and L2 in units of X ([-1, 1]) and on the [0, 1] pixel scale, L0 in
  pixels; each (B,)."""
  d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
  flat = d.reshape(d.shape[0], -1)
  linf, l2 = np.abs(flat).max(1), np.sqrt((flat ** 2).sum(1))
  return {"linf": linf, "l2": l2, "linf_pixel01": linf / 2, "l2_pixel01": l2 / 2,
          "l0": np.asarray(norms_lib.l0_count(jnp.asarray(d), "pixel"))}


def prediction_columns(probs: dict, thresholds: dict, prefix: str) -> dict[str, np.ndarray]:
  """Row columns from :func:`make_defense_fn` outputs: predictions for plain /
  single / avg, entropies and rejection flags for single / avg."""
  probs = jax.device_get(probs)
  cols = {f"{prefix}pred_{kind}": probs[kind].argmax(-1) for kind in ("plain", "single", "avg")}
  for kind in ("single", "avg"):
    h = np.asarray(defense.entropy(probs[kind]))
    cols[f"{prefix}entropy_{kind}"] = h
    cols[f"{prefix}rejected_{kind}"] = h > thresholds[kind]
  return cols


def summarize(rows: list[dict], thresholds: dict) -> dict:
  """The summary of a setting, computed from its rows only."""
  r = {k: np.array([row[k] for row in rows]) for k in rows[0]}
  y = r["label"]
  s = {"num_examples": len(rows),
       "threshold_single": thresholds["single"], "threshold_avg": thresholds["avg"],
       "clean_accuracy_plain": float(np.mean(r["pred_plain"] == y)),
       "clean_accuracy_single": float(np.mean(r["pred_single"] == y)),
       "clean_accuracy_avg": float(np.mean(r["pred_avg"] == y))}
  for key in ("val_accuracy_single", "val_accuracy_avg", "target_accuracy_avg", "rule"):
    if key in thresholds:
      s[f"calibration_{key}" if key != "rule" else "calibration"] = thresholds[key]
  for kind in ("single", "avg"):
    s[f"clean_accuracy_{kind}_with_rejection"] = defense.accuracy_with_rejection(
        r[f"pred_{kind}"], y, r[f"rejected_{kind}"])
    s[f"clean_rejection_rate_{kind}"] = float(np.mean(r[f"rejected_{kind}"]))
  if f"adv_broken_{worst_case.HEADLINE}" in r:
    for metric in worst_case.METRICS:
      acc = worst_case.robust_accuracy(np.array([row[f"adv_broken_{metric}"] for row in rows]))
      s[f"robust_accuracy_{metric}"] = acc["mean"]
      s[f"robust_accuracy_{metric}_std"] = acc["std"]
      s[f"robust_accuracy_{metric}_min"] = acc["min"]
      winners = [row[f"adv_attack_{metric}"] for row in rows if any(row[f"adv_broken_{metric}"])]
      s[f"attack_wins_{metric}"] = {n: winners.count(n) for n in sorted(set(winners))}
    if all("adv_attacks_run" in row for row in rows):  # rows from before it: no column
      s["attacks_run_per_example"] = float(np.mean([row["adv_attacks_run"] for row in rows]))
    s["adv_rejection_rate_avg"] = float(np.mean(r["adv_rejected_avg"]))
    s["adv_rejection_rate_single"] = float(np.mean(r["adv_rejected_single"]))
    for n in ("linf", "l2", "linf_pixel01", "l2_pixel01", "l0"):
      s[f"max_perturbation_{n}"] = float(np.max(r[f"norm_{n}"]))
  return s


def top_other_classes(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """(B, k) the k most probable classes other than ``labels``, most probable first."""
  p = np.array(probs, np.float64)
  p[np.arange(len(labels)), labels] = -np.inf
  return np.argsort(-p, axis=1, kind="stable")[:, :k]


def subset_calls(todo: np.ndarray, size: int):
  """``(t, part, idx)`` per call of at most ``size`` of the examples ``todo``:
  ``part`` the call's examples, ``idx`` them padded to ``size`` by repeating the
  last one (one compiled shape serves every call)."""
  for t, lo in enumerate(range(0, len(todo), size)):
    part = todo[lo:lo + size]
    yield t, part, np.concatenate([part, np.full(size - len(part), part[-1])])


def attack_subset(attack: Attack, key, variables, x, y, target, todo: np.ndarray,
                  size: int):
  """``x`` (B, H, W, C) with the examples ``todo`` replaced by ``attack``'s
  outputs, computed in calls of ``size`` examples (call ``t`` under
  ``fold_in(key, t)``, :func:`subset_calls`); the other examples stay clean."""
  x_adv = np.array(x)
  for t, part, idx in subset_calls(todo, size):
    out = attack.run(jax.random.fold_in(key, t), variables, x[idx], y[idx],
                     None if target is None else target[idx])
    x_adv[part] = np.asarray(out)[:len(part)]
  return jnp.asarray(x_adv)


def score_subset(defend, key, variables, x_adv, todo: np.ndarray, size: int,
                 thresholds: dict, filler: dict) -> dict:
  """One draw of the defense's decision columns (:func:`prediction_columns`,
  prefix ``adv_``) on the examples ``todo`` of ``x_adv``, in calls of ``size``
  (call ``t`` under ``fold_in(key, t)``); ``filler``'s values elsewhere."""
  cols = {k: np.array(v) for k, v in filler.items()}
  for t, part, idx in subset_calls(todo, size):
    dec = prediction_columns(defend(jax.random.fold_in(key, t), variables, x_adv[idx]),
                             thresholds, "adv_")
    for k, v in dec.items():
      cols[k][part] = np.asarray(v)[:len(part)]
  return cols


def evaluate_chunk(key, defend, attacks: Sequence[Attack], variables, batch: dict,
                   thresholds: dict, score_draws: int = 1,
                   cascade_batch: int | None = None) -> dict:
  """Rows (as columns of (B,) arrays) of one chunk.

  Clean: predictions, entropies and rejections (:func:`prediction_columns`).
  With ``attacks``: every attack runs; each output is scored by the defense's
  decision in ``score_draws`` independent draws; per metric of
  :mod:`dropjax.evaluation.worst_case` the row keeps the worst attack's name
  (``adv_attack_<metric>``) and its draws (``adv_broken_<metric>``, a list of
  bools); ``adv_*`` prediction columns are the first draw's decision on the
  headline metric's (``avg_with_rejection``) worst attack, ``norm_*`` the
  largest perturbation of any attack, ``adv_attacks_run`` how many attacks
  ran on the example.

  ``cascade_batch`` (``None``: off): the attacks after the first run only on
  the examples no earlier attack broke in every draw for every metric, in
  calls of ``cascade_batch`` examples (:func:`attack_subset`), and only there
  are their outputs scored (:func:`score_subset`); the others count as not
  broken by those attacks.  Their worst case cannot change: it is already
  broken everywhere, and the first attack wins ties.  Where the padded calls
  would cover as many examples as the chunk, the attack runs on the whole
  chunk as without the cascade.

  ``key`` is the chunk's key; ``batch`` holds uint8 ``image`` (B, H, W, C),
  ``label`` and ``index``.
  """
  k_attack, k_score, k_clean = jax.random.split(key, 3)
  x = augment.to_float(jnp.asarray(batch["image"]))
  y = jnp.asarray(batch["label"], jnp.int32)
  y_np = np.asarray(batch["label"])
  clean = defend(k_clean, variables, x)
  cols = {"index": batch["index"], "label": batch["label"],
          **prediction_columns(clean, thresholds, "")}
  if not attacks:
    return cols
  ranks = [a.target_rank for a in attacks if a.target_rank is not None]
  targets = (top_other_classes(np.asarray(clean["avg"]), y_np, max(ranks) + 1)
             if ranks else None)
  broken = {m: [] for m in worst_case.METRICS}
  decisions, worst_norms = [], None
  done = np.zeros(len(y_np), bool)  # broken in every draw for every metric
  attacks_run = np.zeros(len(y_np), np.int32)
  unattacked = (None if cascade_batch is None  # decisions where no attack ran
                else prediction_columns(clean, thresholds, "adv_"))
  for j, attack in enumerate(attacks):
    target = None if attack.target_rank is None else jnp.asarray(
        targets[:, attack.target_rank], jnp.int32)
    k_j = jax.random.fold_in(k_attack, j)
    left = int(np.sum(~done))
    if cascade_batch is None or j == 0 or -(-left // cascade_batch) * cascade_batch >= len(y_np):
      attacked = np.ones(len(y_np), bool)
      x_adv = attack.run(k_j, variables, x, y, target)
      score = lambda k, x_adv=x_adv: prediction_columns(defend(k, variables, x_adv),
                                                        thresholds, "adv_")
    else:  # only the examples not yet broken everywhere; scored only there
      attacked, todo = ~done, np.flatnonzero(~done)
      x_adv = attack_subset(attack, k_j, variables, x, y, target, todo,
                            cascade_batch) if len(todo) else x
      score = lambda k, x_adv=x_adv, todo=todo: score_subset(
          defend, k, variables, x_adv, todo, cascade_batch, thresholds, unattacked)
    attacks_run += attacked
    norms_j = perturbation_norms(x_adv, x)
    worst_norms = norms_j if worst_norms is None else {
        n: np.maximum(worst_norms[n], v) for n, v in norms_j.items()}
    per_draw = {m: [] for m in worst_case.METRICS}
    first = None
    for r in range(score_draws):  # the same draws score every attack
      dec = score(jax.random.fold_in(k_score, r))
      first = dec if first is None else first
      for m, v in worst_case.broken({k[4:]: v for k, v in dec.items()}, y_np).items():
        per_draw[m].append(v & attacked)
    decisions.append(first)
    for m in worst_case.METRICS:
      broken[m].append(np.stack(per_draw[m]))  # (R, B)
    done |= np.all([broken[m][-1].all(axis=0) for m in worst_case.METRICS], axis=0)
  names = np.array([a.name for a in attacks])
  for m in worst_case.METRICS:
    winner, draws = worst_case.select(np.stack(broken[m]))  # (J, R, B)
    cols[f"adv_attack_{m}"] = names[winner]
    cols[f"adv_broken_{m}"] = draws
    if m == worst_case.HEADLINE:
      head = winner
  b = np.arange(len(y_np))
  for col in decisions[0]:
    cols[col] = np.stack([d[col] for d in decisions])[head, b]
  for n, v in worst_norms.items():
    cols[f"norm_{n}"] = v
  cols["adv_attacks_run"] = attacks_run
  return cols


def _rows(cols: dict, n_valid: int) -> list[dict]:
  def item(v, i):
    v = np.asarray(v)[i]
    return v.tolist() if v.ndim else v.item()
  return [{k: item(v, i) for k, v in cols.items()} for i in range(n_valid)]


def budget_columns(norm: str, eps: float, reading: str) -> dict:
  """The budget of a setting in both units (rows and summaries carry it)."""
  if norm in ("none", "l0"):
    return {"budget_reading": reading, "eps_stated": eps}
  x = units.to_x_units(eps, reading)
  scales = units.both_scales(x)
  return {"budget_reading": reading, "eps_stated": eps, "eps_x_units": scales["x_units"],
          "eps_pixel01": scales["pixel01"]}


def _fits_before(stop_at: str, store: SettingStore, out_dir: str, sid: str,
                 chunk: int, rows_dir: str | None) -> bool:
  """Whether chunk ``chunk`` of ``sid`` is expected to end before ``stop_at``
  (:attr:`EvalConfig.stop_at`); says why not on stderr.  Expected: as long as the
  setting's longest timed chunk, else the longest of any setting timed in
  ``out_dir``, else the longest kept in ``rows_dir`` (``--rows_from``)."""
  expected = max(store.chunk_seconds(), default=None)
  if expected is None:
    expected = longest_chunk_seconds(out_dir)
  if expected is None and rows_dir:
    expected = longest_kept_chunk_seconds(rows_dir)
  return deadlines.fits(stop_at, expected, f"chunk {chunk} of {sid}")


def evaluate(workdir: str, ev: EvalConfig, out_dir: str | None = None, *,
             data_dir: str | None = None, source: str | None = None,
             stop_after_chunks: int | None = None, progress: bool | None = None,
             backend: backend_lib.Backend | None = None) -> list[dict]:
  """Runs every setting of ``ev`` on the checkpoint in ``workdir``; rows and
  summaries go to ``out_dir`` (default ``<workdir>/eval``, :mod:`dropjax.evaluation.store`).

  Returns the summary rows of the settings completed by this call.
  """
  ev.validate()
  backend = backend or backend_lib.resolve()
  train_cfg, variables, logits_fn, data = load_model(workdir, data_dir, source, backend)
  if train_cfg.model_takes_mask:
    raise ValueError(f"{workdir} is a randomized-ablation model with the "
                     f"{train_cfg.input_encoding} input encoding: it is certified (python "
                     "certify.py --workdir ...), not defended by pixel dropping")
  if ev.rows_from and not os.path.isdir(ev.rows_from):
    raise FileNotFoundError(f"--rows_from {ev.rows_from}: no such directory")
  out_dir = out_dir or os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  test = data.test.take(ev.num_examples or None)
  contracts.check_labels(test.y, data.num_classes, name="test labels")
  if ev.num_targets >= data.num_classes and "targeted" in ev.modes:
    raise ValueError(f"num_targets={ev.num_targets} needs more than {data.num_classes} classes")
  rates = list(ev.drop_rates) if ev.drop_rates else [default_drop_rate(
      train_cfg, data.image_shape[0] * data.image_shape[1])]
  if ev.norm == "none":
    eps_list = [0.0]
  else:
    preset = paper_attack(train_cfg.dataset, ev.norm)
    default_eps = preset.l0_fraction if ev.norm == "l0" else preset.eps
    eps_list = list(ev.eps) if ev.eps else [default_eps]
  root = jax.random.PRNGKey(ev.seed)
  chunks_done_here = 0
  summaries = []
  # What the entropy thresholds depend on besides the drop rate (the cache's key).
  calibration_key = {"variables": digest(variables), "val": digest(data.val.x, data.val.y),
                     "per_pixel": train_cfg.per_pixel, "num_masks": ev.num_masks,
                     "max_drop": ev.max_drop, "rule": ev.calibration, "seed": ev.seed,
                     "batch_size": ev.batch_size}
  for rate in rates:
    drop = DropSpec.fixed(rate, train_cfg.per_pixel)
    defend = make_defense_fn(logits_fn, drop, ev.num_masks)
    if len(data.val):
      thresholds = cached_calibration(
          out_dir, {**calibration_key, "drop_rate": rate},
          lambda: calibrate(defend, variables, data.val.x, data.val.y, ev.batch_size,
                            jax.random.fold_in(root, 10**6), ev.max_drop, ev.calibration),
          kept_dir=ev.rows_from)
    else:
      thresholds = {"single": float("inf"), "avg": float("inf")}
    for eps in eps_list:
      variant = attack_variant(ev)
      sid = setting_id(ev.norm, eps, rate, ev.budget_reading, variant)
      kept = committed_rows(ev.rows_from, sid) if ev.rows_from else None
      begun = SettingStore.saved_config(out_dir, sid)
      if begun is None and kept:
        begun = kept[1] or {}
      cascade = ev.norm != "none" and cascade_for(ev, begun)
      store = SettingStore(out_dir, sid, row_config(ev, cascade))
      if kept:
        store.import_rows(kept[0][:len(test)], ev.batch_size, kept[1])
        store.import_timing(committed_timing(ev.rows_from, sid))
      attacks = []
      if ev.norm != "none":
        attacks = [Attack(name, compile_attack(logits_fn, c, backend), rank)
                   for name, c, rank in attack_configs(ev, train_cfg.dataset, eps, drop,
                                                       backend.eot_impl)]
      budget = budget_columns(ev.norm, eps, ev.budget_reading)
      n_chunks = -(-len(test) // ev.batch_size)
      bar = tqdm(total=n_chunks, desc=sid, unit="chunk", dynamic_ncols=True,
                 disable=None if progress is None else not progress)
      attack_seconds, attacked, stopped_early = 0.0, 0, False
      for c, (batch, n_valid) in enumerate(inference.padded_batches(
          {"image": test.x, "label": test.y}, ev.batch_size)):
        if store.has_chunk(c):
          bar.update(1)
          continue
        if stop_after_chunks is not None and chunks_done_here >= stop_after_chunks:
          bar.close()
          return summaries
        if ev.stop_at is not None and not _fits_before(ev.stop_at, store, out_dir, sid, c,
                                                        ev.rows_from):
          stopped_early = True
          break
        t0 = time.perf_counter()
        cols = jax.block_until_ready(evaluate_chunk(
            jax.random.fold_in(root, c), defend, attacks, variables, batch, thresholds,
            ev.score_draws, min(ev.cascade_batch, ev.batch_size) if cascade else None))
        if attacks:
          attack_seconds += time.perf_counter() - t0
          attacked += n_valid
        store.write_chunk(c, [{**row, **budget} for row in _rows(cols, n_valid)])
        store.record_seconds(c, time.perf_counter() - t0)
        chunks_done_here += 1
        bar.update(1)
      bar.close()
      if stopped_early:
        continue
      rows_all = store.merge(n_chunks)
      summary = {"setting": sid, "workdir": files.recorded_path(workdir),
                 "dataset": train_cfg.dataset, "depth": train_cfg.depth,
                 "train_drop": train_cfg.drop, "train_drop_rate": train_cfg.drop_rate,
                 "norm": ev.norm, "eps": eps, **budget, "drop_rate": rate, "variant": variant,
                 "num_masks": ev.num_masks, "steps": ev.steps, "eot_samples": ev.eot_samples,
                 "attack": ev.attack, "losses": list(ev.attack_losses),
                 "queries": ev.queries if ev.attack == "sparse_rs" else None,
                 "modes": list(ev.modes),
                 "num_targets": ev.num_targets, "restarts": ev.restarts,
                 "attacks": [a.name for a in attacks], "score_draws": ev.score_draws,
                 "cascade": cascade,
                 "max_drop": ev.max_drop, "seed": ev.seed,
                 **summarize(rows_all, thresholds)}
      if attacked:
        summary["attack_seconds_this_run"] = attack_seconds
        summary["attack_images_per_s"] = attacked / max(attack_seconds, 1e-9)
      summaries.append(update_summary(out_dir, summary))
  return summaries
