"""The evaluation run: what is computed for a trained checkpoint, and kept.

For every *setting* (norm, eps, test-time drop rate;
:mod:`dropjax.evaluation.settings`) the test examples are processed in chunks
of ``batch_size``.  Chunk ``c`` draws all its randomness from
``fold_in(PRNGKey(seed), c)`` (:func:`dropjax.evaluation.chunk.evaluate_chunk`),
so a killed evaluation resumes where it stopped and produces exactly the rows
of an uninterrupted run.  Where rows and summaries are stored is
:mod:`dropjax.evaluation.store`; a setting's summary is an aggregate of its
rows only (:func:`summarize`).

Per example: clean predictions (no mask, one mask, K-mask average),
entropies and rejection flags; with an attack, every configuration (loss x
mode x target x restart, :func:`dropjax.evaluation.settings.attack_configs`)
is run (with the cascade, those after the first only on the examples not yet
broken everywhere), each output is scored by the defense's real decision in
``score_draws`` independent draws, and per metric the worst attack is kept
(:mod:`dropjax.evaluation.worst_case`); the largest perturbation (L-inf / L2 in
units of X and on the [0, 1] scale, L0 in pixels) and the budget in both units
(:mod:`dropjax.units`).  The entropy thresholds are calibrated on the
validation split by the paper's rule or the stricter one (:func:`calibrate`),
saved in the summary and kept in the output directory, so a resumed or
completed setting reuses them (:func:`dropjax.evaluation.store.cached_calibration`).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from tqdm import tqdm

from dropjax import backend as backend_lib
from dropjax import contracts, deadlines, defense, files, inference, pretrained
from dropjax.attacks import paper_attack
from dropjax.data import augment, load_dataset
from dropjax.evaluation import chunk_time, worst_case
from dropjax.evaluation.chunk import (Attack, compile_attack, evaluate_chunk, make_defense_fn,
                                      to_rows)
from dropjax.evaluation.settings import (EvalConfig, attack_configs, attack_variant,
                                         budget_columns, cascade_for, default_drop_rate,
                                         row_config, setting_id)
from dropjax.evaluation.store import (MODEL_FIELD, SettingStore, cached_calibration,
                                      committed_rows, digest, update_summary)
from dropjax.masks import DropSpec
from dropjax.training import checkpoint as ckpt_lib
from dropjax.training import state as state_lib, step as step_lib


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


def _fits_before(stop_at: str, out_dir: str, sid: str, chunk: int,
                 rows_dir: str | None) -> bool:
  """Whether chunk ``chunk`` of ``sid`` is expected to end before ``stop_at``
  (:mod:`dropjax.evaluation.chunk_time`); says why not on stderr."""
  return deadlines.fits(stop_at, chunk_time.expected_seconds(out_dir, sid, rows_dir),
                        f"chunk {chunk} of {sid}")


def _budgets(ev: EvalConfig, dataset: str) -> list[float]:
  """The eps of each setting: ``--eps``, else the paper's budget (0 for ``none``)."""
  if ev.norm == "none":
    return [0.0]
  if ev.eps:
    return list(ev.eps)
  preset = paper_attack(dataset, ev.norm)
  return [preset.l0_fraction if ev.norm == "l0" else preset.eps]


def _open_setting(ev: EvalConfig, out_dir: str, sid: str, num_examples: int,
                  model_digest: str):
  """``(store, cascade)`` of setting ``sid`` on the model whose variables have
  ``model_digest`` (:func:`dropjax.evaluation.store.digest`): its cascade as it
  was begun (in ``out_dir`` or in the kept rows of ``--rows_from``), and the kept
  rows and timings imported into the store (rows of another model are refused)."""
  kept = committed_rows(ev.rows_from, sid) if ev.rows_from else None
  begun = SettingStore.saved_config(out_dir, sid)
  if begun is None and kept:
    begun = kept[1] or {}
  cascade = ev.norm != "none" and cascade_for(ev, begun)
  store = SettingStore(out_dir, sid, {**row_config(ev, cascade), MODEL_FIELD: model_digest})
  store.import_kept(kept, ev.rows_from, num_examples, ev.batch_size)
  return store, cascade


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
  root = jax.random.PRNGKey(ev.seed)
  chunks_done_here = 0
  summaries = []
  # What the entropy thresholds depend on besides the drop rate (the cache's key).
  model_digest = digest(variables)
  calibration_key = {"variables": model_digest, "val": digest(data.val.x, data.val.y),
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
    for eps in _budgets(ev, train_cfg.dataset):
      variant = attack_variant(ev)
      sid = setting_id(ev.norm, eps, rate, ev.budget_reading, variant)
      store, cascade = _open_setting(ev, out_dir, sid, len(test), model_digest)
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
        if ev.stop_at is not None and not _fits_before(ev.stop_at, out_dir, sid, c,
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
        store.write_chunk(c, [{**row, **budget} for row in to_rows(cols, n_valid)])
        store.record_seconds(c, time.perf_counter() - t0)
        chunks_done_here += 1
        bar.update(1)
      bar.close()
      if stopped_early:
        continue
      summary = {"setting": sid, "workdir": files.recorded_path(workdir),
                 MODEL_FIELD: model_digest,
                 "dataset": train_cfg.dataset, "depth": train_cfg.depth,
                 "train_weight_decay": train_cfg.weight_decay,
                 "train_drop": train_cfg.drop, "train_drop_rate": train_cfg.drop_rate,
                 "train_adv_training": train_cfg.adv_training,
                 "train_adv_norm": (train_cfg.adv_norm if train_cfg.adv_training != "none"
                                    else None),
                 "norm": ev.norm, "eps": eps, **budget, "drop_rate": rate, "variant": variant,
                 "num_masks": ev.num_masks, "steps": ev.steps, "eot_samples": ev.eot_samples,
                 "attack": ev.attack, "losses": list(ev.attack_losses),
                 "queries": ev.queries if ev.attack == "sparse_rs" else None,
                 "modes": list(ev.modes),
                 "num_targets": ev.num_targets, "restarts": ev.restarts,
                 "attacks": [a.name for a in attacks], "score_draws": ev.score_draws,
                 "cascade": cascade,
                 "max_drop": ev.max_drop, "seed": ev.seed,
                 **summarize(store.merge(n_chunks), thresholds)}
      if ev.attack == "sparse_rs":  # how its search compared proposals (README § Evaluation)
        summary.update(comparison=ev.comparison, query_draws=ev.query_draws)
      if attacked:
        summary["attack_seconds_this_run"] = attack_seconds
        summary["attack_images_per_s"] = attacked / max(attack_seconds, 1e-9)
      summaries.append(update_summary(out_dir, summary))
  return summaries
