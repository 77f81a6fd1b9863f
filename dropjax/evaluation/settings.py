"""What one evaluation setting is: the configuration (:class:`EvalConfig`,
every ``evaluate.py`` flag), its name (:func:`setting_id`, :func:`attack_variant`),
what determines its rows (:func:`row_config`, :func:`cascade_for`), its budget
in both units (:func:`budget_columns`) and the attack configurations it runs
(:func:`attack_configs`).  Nothing here computes on a model:
:mod:`dropjax.evaluation.chunk` does, :mod:`dropjax.evaluation.protocol` runs it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from dropjax import deadlines, defense, units
from dropjax.attacks import APGDConfig, SparseRSConfig, paper_attack
from dropjax.attacks.sparse_rs import COMPARISONS
from dropjax.config import TrainConfig
from dropjax.masks import DropSpec
from dropjax.units import BUDGET_READINGS

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
  comparison: str = _f("fresh", "sparse_rs: how a proposed pixel set is judged: fresh (the "
                       "authors' rule: its loss under new masks against the best loss seen) "
                       "or paired (current set and proposal scored under the same masks at "
                       "every query, so the masks' noise cancels; two evaluations of the "
                       "defense per query: --queries 500 paired costs what 1000 fresh do)",
                       choices=COMPARISONS)
  query_draws: int = _f(1, "sparse_rs: independent evaluations of the defense (each the "
                        "average over --num_masks masks) averaged into every loss the "
                        "search compares; the estimate spreads sqrt(n) times less, each "
                        "query costs n times as much (1: the authors' single evaluation)")
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
                           "longest chunk timed for the setting; a Sparse-RS setting not "
                           "timed yet, its forward passes at the slowest rate of the "
                           "Sparse-RS settings timed in --out (else kept in --rows_from); "
                           "else as long as the longest chunk of any setting of --out, "
                           "else kept in --rows_from (none timed yet: it starts while the "
                           "deadline is ahead); the run "
                           "then moves on to its next setting, and exits 0 with what it "
                           "finished. So a job that must end by a time loses no "
                           "half-computed chunk")
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
    if self.comparison not in COMPARISONS:
      raise ValueError(f"unknown comparison {self.comparison!r}; choose one of {COMPARISONS}")
    if self.comparison != "fresh" and self.attack != "sparse_rs":
      raise ValueError("--comparison judges Sparse-RS's proposals: use it with "
                       "--attack sparse_rs")
    if self.query_draws < 1:
      raise ValueError(f"query_draws must be >= 1, got {self.query_draws}")
    if self.query_draws != 1 and self.attack != "sparse_rs":
      raise ValueError("--query_draws averages Sparse-RS's loss estimates: use it with "
                       "--attack sparse_rs (the gradient attacks average --eot_samples "
                       "masks)")
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


def drop_rate_of(setting: str) -> float:
  """The test-time drop rate a setting id names (:func:`setting_id`)."""
  match = re.search(r"_r([0-9][0-9.e+-]*)(?:_|$)", setting)
  if match is None:
    raise ValueError(f"{setting!r} is not a setting id: it names no drop rate (_r<rate>)")
  return float(match.group(1))


# Fields that do not change a setting's rows beyond its id: the id names norm,
# eps and rate; a larger num_examples only adds chunks (chunk c is the same
# examples and randomness for any N); the sanity fields select another command.
_OUTSIDE_ROWS = ("norm", "eps", "drop_rates", "num_examples", "sanity", "sanity_examples",
                 "sanity_tolerance", "rows_from", "cascade", "cascade_batch", "stop_at")
# The attack's fields (irrelevant to a clean-accuracy setting, norm "none").
_ATTACK_FIELDS = ("budget_reading", "attack", "queries", "comparison", "query_draws",
                  "step_size", "steps",
                  "eot_samples", "losses", "entropy_weight", "modes", "num_targets",
                  "restarts", "random_start", "score_draws")


def attack_variant(ev: EvalConfig) -> str:
  """The attack of ``ev`` as it differs from the defaults, for :func:`setting_id`
  ("" for the paper's protocol): the algorithm (Sparse-RS with its queries, a
  comparison other than the authors' and more than one draw per loss),
  losses, modes, steps and EOT samples, e.g. ``apgd_steps100`` or ``eot1``.
  A sweep over them (one command per value, into one ``--out``) gets one
  setting each; the remaining fields are guarded by :func:`row_config`."""
  if ev.norm == "none":
    return ""
  default = EvalConfig()
  tokens = []
  if ev.attack != default.attack:
    tokens.append(f"{ev.attack}_q{ev.queries}" if ev.attack == "sparse_rs" else ev.attack)
  if ev.attack == "sparse_rs" and ev.comparison != default.comparison:
    tokens.append(ev.comparison)
  if ev.attack == "sparse_rs" and ev.query_draws != default.query_draws:
    tokens.append(f"draws{ev.query_draws}")
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
  without it.  Likewise Sparse-RS's ``comparison`` and ``query_draws`` only
  when they are not the authors' (fresh, 1)."""
  skip = _OUTSIDE_ROWS + (_ATTACK_FIELDS if ev.norm == "none" else ())
  if ev.comparison == EvalConfig.comparison:
    skip += ("comparison",)
  if ev.query_draws == EvalConfig.query_draws:
    skip += ("query_draws",)
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


def budget_columns(norm: str, eps: float, reading: str) -> dict:
  """The budget of a setting in both units (rows and summaries carry it)."""
  if norm in ("none", "l0"):
    return {"budget_reading": reading, "eps_stated": eps}
  x = units.to_x_units(eps, reading)
  scales = units.both_scales(x)
  return {"budget_reading": reading, "eps_stated": eps, "eps_x_units": scales["x_units"],
          "eps_pixel01": scales["pixel01"]}


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
                                 if loss == "rejection" else 0.0,
                                 comparison=ev.comparison,
                                 draws=ev.query_draws).validate()
          else:
            cfg = base.replace(loss=loss, targeted=mode == "targeted", **kw).validate()
          out.append((name, cfg, rank))
  return out
