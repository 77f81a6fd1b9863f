"""The evaluation protocol: what is computed for a trained checkpoint.

For every *setting* (norm, eps, test-time drop rate) the test examples are
processed in chunks of ``batch_size``.  Chunk ``c`` draws all its randomness
from ``fold_in(PRNGKey(seed), c)`` (:func:`evaluate_chunk`), so a killed
evaluation resumes where it stopped and produces exactly the rows of an
uninterrupted run.  Where rows and summaries are stored is
:mod:`dropjax.evaluation.store`; a setting's summary is an aggregate of its
rows only (:func:`summarize`).

Per example: clean predictions (no mask, one mask, K-mask average), the
attack's adversarial predictions (one mask, K-mask average), entropies,
rejection flags and the perturbation's L-inf / L2 norms ([0, 1] scale) and L0
pixel count.  The entropy thresholds are calibrated on the validation split
(:func:`dropjax.defense.calibrate_threshold`) and saved in the summary.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dropjax import backend as backend_lib
from dropjax import contracts, defense, inference, pretrained
from dropjax.attacks import AttackConfig, best_of, make_pgd, paper_attack
from dropjax.attacks import norms as norms_lib
from dropjax.config import TrainConfig
from dropjax.data import augment, load_dataset
from dropjax.evaluation.store import SettingStore, update_summary
from dropjax.masks import DropSpec
from dropjax.training import checkpoint as ckpt_lib
from dropjax.training import state as state_lib, step as step_lib

ATTACK_NORMS = ("linf", "l2", "l0", "none")


def _f(default, help_text: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help_text, **kw})


@dataclasses.dataclass
class EvalConfig:
  """One evaluation run (possibly a sweep over drop rates and eps).  Every
  field is an ``evaluate.py`` flag of the same name."""
  norm: str = _f("linf", "threat model; 'none' only measures clean accuracy (drop-rate "
                 "sweeps, Fig. 2)", choices=ATTACK_NORMS)
  eps: tuple | None = _f(None, "budget(s), a sweep if several. L-inf/L2: on the [0,1] pixel "
                         "scale (e.g. 0.0627 = 16/255); L0: fraction of the pixels D (paper: "
                         "0.03). Default: the paper's preset for the dataset", type=float)
  step_size: float | None = _f(None, "attack step ([0,1] scale; L0: multiple of the mean "
                               "|gradient|); default: the paper's preset")
  steps: int = _f(20, "PGD steps")
  eot_samples: int = _f(10, "masks per EOT gradient (0: attack the undefended model, "
                        "plain PGD)")
  losses: tuple = _f(("ce",), "attack loss(es); several give a best-of attack (strongest "
                     "per example)", choices=("ce", "cw"))
  targeted: bool = _f(False, "targeted attack towards a random wrong class")
  restarts: int = _f(1, "random restarts per loss (best-of)")
  random_start: bool = _f(True, "start PGD at a random point of the budget (false: at the "
                          "clean image)")
  drop_rates: tuple | None = _f(None, "test-time drop rate(s), a sweep if several (default: "
                                "the model's training rate; 0.5 for random-rate models; 0 "
                                "for normal training)", type=float)
  num_masks: int = _f(10, "masks averaged by the defense")
  max_drop: float = _f(0.01, "entropy threshold: allowed drop of clean validation accuracy "
                       "(fraction; rejections count as errors)")
  num_examples: int = _f(1000, "test examples (0: all)")
  batch_size: int = _f(100, "examples per chunk (the resume unit)")
  seed: int = _f(0, "seed of masks and attack randomness")

  def validate(self) -> "EvalConfig":
    if self.norm not in ATTACK_NORMS:
      raise ValueError(f"unknown norm {self.norm!r}; choose one of {ATTACK_NORMS}")
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if self.num_masks < 1:
      raise ValueError(f"num_masks must be >= 1, got {self.num_masks}")
    if self.batch_size < 1 or self.num_examples < 0:
      raise ValueError("batch_size must be >= 1 and num_examples >= 0 (0: all)")
    for loss in self.losses:
      if loss not in ("ce", "cw"):
        raise ValueError(f"unknown attack loss {loss!r}; choose ce or cw")
    if self.restarts < 1:
      raise ValueError("restarts must be >= 1")
    for r in self.drop_rates or ():
      if not 0 <= r <= 1:
        raise ValueError(f"drop rates must be in [0, 1], got {r}")
    for e in self.eps or ():
      if e < 0:
        raise ValueError(f"eps must be >= 0, got {e}")
    return self


def default_drop_rate(train_cfg: TrainConfig, num_pixels: int) -> float:
  """Test-time drop rate: the training rate (fixed), 0.5 (random), 0 (normal),
  ``1 - keep / num_pixels`` (ablation models with the values encoding)."""
  if train_cfg.drop == "ablate":
    return 1.0 - train_cfg.keep / num_pixels
  return {"fixed": train_cfg.drop_rate, "random": 0.5, "none": 0.0}[train_cfg.drop]


def setting_id(norm: str, eps: float, rate: float) -> str:
  return f"{norm}_eps{eps:.6g}_r{rate:.6g}"


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


def calibrate(defend, variables, val_x, val_y, batch_size: int, key, max_drop: float) -> dict:
  """Entropy thresholds for the single-mask and the averaged prediction."""
  out = inference.map_batches(
      lambda b: defend(jax.random.fold_in(key, int(b["index"][0])), variables,
                       augment.to_float(b["image"])),
      {"image": val_x}, batch_size)
  th = {}
  for kind in ("single", "avg"):
    p = out[kind]
    th[kind] = defense.calibrate_threshold(np.asarray(defense.entropy(p)),
                                           p.argmax(-1) == val_y, max_drop)
  return th


def attack_configs(ev: EvalConfig, dataset: str, eps: float, drop: DropSpec,
                   eot_impl: str = "vmap") -> list[AttackConfig]:
  base = paper_attack(dataset, ev.norm)
  kw = dict(num_steps=ev.steps, targeted=ev.targeted, random_start=ev.random_start,
            eot_samples=ev.eot_samples, drop=drop, eot_impl=eot_impl)
  if ev.norm == "l0":
    kw["l0_fraction"] = eps
  else:
    kw["eps"] = eps
  if ev.step_size is not None:
    kw["step_size"] = ev.step_size
  return [base.replace(loss=loss, **kw).validate()
          for loss in ev.losses for _ in range(ev.restarts)]


def perturbation_norms(x_adv: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
  """L-inf and L2 on the [0, 1] pixel scale, L0 in pixels; each (B,)."""
  d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)) / 2.0
  flat = d.reshape(d.shape[0], -1)
  return {"linf": np.abs(flat).max(1), "l2": np.sqrt((flat ** 2).sum(1)),
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
  for kind in ("single", "avg"):
    s[f"clean_accuracy_{kind}_with_rejection"] = defense.accuracy_with_rejection(
        r[f"pred_{kind}"], y, r[f"rejected_{kind}"])
    s[f"clean_rejection_rate_{kind}"] = float(np.mean(r[f"rejected_{kind}"]))
  if "adv_pred_avg" in r:
    s["robust_accuracy_plain"] = float(np.mean(r["adv_pred_plain"] == y))
    for kind in ("single", "avg"):
      s[f"robust_accuracy_{kind}"] = float(np.mean(r[f"adv_pred_{kind}"] == y))
      s[f"robust_accuracy_{kind}_with_rejection"] = defense.robust_accuracy_with_rejection(
          r[f"adv_pred_{kind}"], y, r[f"adv_rejected_{kind}"])
      s[f"adv_rejection_rate_{kind}"] = float(np.mean(r[f"adv_rejected_{kind}"]))
    for n in ("linf", "l2", "l0"):
      s[f"max_perturbation_{n}"] = float(np.max(r[f"norm_{n}"]))
  return s


def evaluate_chunk(key, defend, attacks, variables, batch: dict, thresholds: dict) -> dict:
  """Rows (as columns of (B,) arrays) of one chunk: clean predictions, and with
  ``attacks`` the adversarial ones and the perturbation norms.

  ``key`` is the chunk's key; ``batch`` holds uint8 ``image`` (B, H, W, C),
  ``label`` and ``index``; ``attacks`` are jitted ``(key, variables, x, y) -> x_adv``.
  """
  k_attack, k_select, k_clean, k_adv = jax.random.split(key, 4)
  x = augment.to_float(jnp.asarray(batch["image"]))
  y = jnp.asarray(batch["label"], jnp.int32)
  cols = {"index": batch["index"], "label": batch["label"],
          **prediction_columns(defend(k_clean, variables, x), thresholds, "")}
  if not attacks:
    return cols
  if len(attacks) == 1:
    x_adv = attacks[0](k_attack, variables, x, y)
  else:
    fooled = lambda xa, yy: jnp.argmax(defend(k_select, variables, xa)["avg"], -1) != yy
    x_adv, _ = best_of(k_attack, attacks, fooled, variables, x, y)
  cols.update(prediction_columns(defend(k_adv, variables, x_adv), thresholds, "adv_"))
  for n, v in perturbation_norms(x_adv, x).items():
    cols[f"norm_{n}"] = v
  return cols


def _rows(cols: dict, n_valid: int) -> list[dict]:
  return [{k: np.asarray(v)[i].item() for k, v in cols.items()} for i in range(n_valid)]


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
    raise ValueError(f"{workdir} is a randomized-ablation model with the doubled input "
                     "encoding: it is certified (python certify.py --workdir ...), not "
                     "defended by pixel dropping")
  out_dir = out_dir or os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  test = data.test.take(ev.num_examples or None)
  contracts.check_labels(test.y, data.num_classes, name="test labels")
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
  for rate in rates:
    drop = DropSpec.fixed(rate, train_cfg.per_pixel)
    defend = make_defense_fn(logits_fn, drop, ev.num_masks)
    thresholds = calibrate(defend, variables, data.val.x, data.val.y, ev.batch_size,
                           jax.random.fold_in(root, 10**6), ev.max_drop) if len(data.val) else {
                               "single": float("inf"), "avg": float("inf")}
    for eps in eps_list:
      sid = setting_id(ev.norm, eps, rate)
      store = SettingStore(out_dir, sid)
      attacks = []
      if ev.norm != "none":
        attacks = [jax.jit(make_pgd(logits_fn, c, unroll=backend.loop_unroll(c.num_steps)))
                   for c in attack_configs(ev, train_cfg.dataset, eps, drop, backend.eot_impl)]
      n_chunks = -(-len(test) // ev.batch_size)
      bar = tqdm(total=n_chunks, desc=sid, unit="chunk", dynamic_ncols=True,
                 disable=None if progress is None else not progress)
      attack_seconds, attacked = 0.0, 0
      for c, (batch, n_valid) in enumerate(inference.padded_batches(
          {"image": test.x, "label": test.y}, ev.batch_size)):
        if store.has_chunk(c):
          bar.update(1)
          continue
        if stop_after_chunks is not None and chunks_done_here >= stop_after_chunks:
          bar.close()
          return summaries
        t0 = time.perf_counter()
        cols = jax.block_until_ready(evaluate_chunk(jax.random.fold_in(root, c), defend,
                                                    attacks, variables, batch, thresholds))
        if attacks:
          attack_seconds += time.perf_counter() - t0
          attacked += n_valid
        store.write_chunk(c, _rows(cols, n_valid))
        chunks_done_here += 1
        bar.update(1)
      bar.close()
      rows_all = store.merge(n_chunks)
      summary = {"setting": sid, "workdir": os.path.abspath(workdir),
                 "dataset": train_cfg.dataset, "depth": train_cfg.depth,
                 "train_drop": train_cfg.drop, "train_drop_rate": train_cfg.drop_rate,
                 "norm": ev.norm, "eps": eps, "drop_rate": rate, "num_masks": ev.num_masks,
                 "steps": ev.steps, "eot_samples": ev.eot_samples, "losses": list(ev.losses),
                 "targeted": ev.targeted, "restarts": ev.restarts, "seed": ev.seed,
                 **summarize(rows_all, thresholds)}
      if attacked:
        summary["attack_seconds_this_run"] = attack_seconds
        summary["attack_images_per_s"] = attacked / max(attack_seconds, 1e-9)
      update_summary(out_dir, summary)
      summaries.append(summary)
  return summaries
