"""Certifying a trained run: one row per test example, resumable by chunk.

``python certify.py --workdir RUN`` runs :func:`dropjax.certify.make_certify`
on the first ``num_examples`` test images of the run's dataset.  Layout under
the output directory ``out`` (default ``<workdir>/certify``), as for the
evaluation (:mod:`dropjax.evaluation.store`)::

    out/<setting>/chunk_00000.jsonl   rows of chunk 0 (written atomically)
    out/<setting>/rows.jsonl          all rows, once every chunk exists
    out/<setting>/timing.jsonl        each chunk's wall seconds (for ``--stop_at``)
    out/<setting>/setting.json        what else decides the rows (``samples_per_pass``)
    out/summary.jsonl                 one summary row per setting
    out/certified_accuracy.{png,svg}  certified accuracy vs radius (from the rows)

A row: ``index`` (position in the test split), ``label``, ``prediction`` (the
smoothed classifier's class, -1 when it abstains), ``p_lower`` (one-sided
Clopper-Pearson bound on ``p_A``), ``radius`` (certified L0 radius in pixels,
-1: abstain), ``correct`` (prediction == label), ``abstained``,
``votes_top`` / ``votes_n``.  Example ``i``'s samples come from
``fold_in(PRNGKey(seed), i)``, so rows do not depend on the chunk size and a
killed run resumes with exactly the rows of an uninterrupted one, and
``--rows_from`` takes the rows kept elsewhere (``experiments/lib.sh save_rows``)
up instead of recomputing them.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from dropjax import backend as backend_lib
from dropjax import certify, contracts, deadlines, files, inference
from dropjax.data import augment
from dropjax.evaluation.protocol import load_model
from dropjax.evaluation.store import (MODEL_FIELD, SettingStore, committed_rows, digest,
                                      update_summary)

DEFAULT_KEEP = certify.CertifyConfig.keep  # for models not trained by ablation
PLOT_NAME = "certified_accuracy"


def _f(default, help_text: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help_text, **kw})


@dataclasses.dataclass(frozen=True)
class CertifyRunConfig(certify.CertifyConfig):
  """``certify.py``: every field is a flag of the same name."""
  keep: int | None = _f(None, "k: pixels kept per sample, of d = H*W (default: the run's "
                        f"--keep for ablation models, else {DEFAULT_KEEP})")
  num_examples: int = _f(500, "test examples certified (0: all)")
  batch_size: int = _f(10, "images per chunk (the resume unit); one compiled pass "
                       "evaluates batch_size x samples_per_pass ablated images")
  seed: int = _f(0, "seed of the ablation samples")
  radii: tuple = _f((0, 1, 2, 5, 10), "radii (pixels) at which the summary reports "
                    "certified accuracy", type=int)
  stop_at: str | None = _f(None, "wall-clock deadline (ISO 8601, e.g. 2026-12-04T12:05 "
                           "local time, or with a UTC offset): no chunk starts that is "
                           "expected to end after it (expected to take as long as the "
                           "longest chunk of this setting timed in --out; the first one "
                           "starts while the deadline is ahead); the same command resumes")
  rows_from: str | None = _f(None, "directory of kept per-example rows (<setting>.rows.jsonl.gz, "
                             "<setting>.setting.json and <setting>.timing.jsonl, as "
                             "experiments/lib.sh save_rows keeps them): the chunks they hold "
                             "in full are taken from there instead of recomputed, e.g. to "
                             "extend a committed certificate to more images")

  def validate(self) -> "CertifyRunConfig":
    super().validate()
    if self.num_examples < 0 or self.batch_size < 1:
      raise ValueError("num_examples must be >= 0 (0: all) and batch_size >= 1")
    if any(r < 0 for r in self.radii):
      raise ValueError(f"radii must be >= 0, got {self.radii}")
    if self.stop_at is not None:
      deadlines.parse(self.stop_at)
    return self


def setting_id(cfg: certify.CertifyConfig, seed: int) -> str:
  return f"k{cfg.keep}_n0-{cfg.n0}_n{cfg.n}_alpha{cfg.alpha:g}_seed{seed}"


def certify_rows(result: dict, labels: np.ndarray, index: np.ndarray) -> list[dict]:
  """Rows from :func:`dropjax.certify.make_certify`'s output for one chunk."""
  rows = []
  for i in range(len(labels)):
    pred = int(result["prediction"][i])
    rows.append({"index": int(index[i]), "label": int(labels[i]), "prediction": pred,
                 "p_lower": float(result["p_lower"][i]), "radius": int(result["radius"][i]),
                 "correct": pred == int(labels[i]), "abstained": pred < 0,
                 "votes_top": int(result["votes_top"][i]), "votes_n": int(result["votes_n"][i])})
  return rows


def run(workdir: str, cfg: CertifyRunConfig, out_dir: str | None = None, *,
        data_dir: str | None = None, source: str | None = None,
        stop_after_chunks: int | None = None, progress: bool | None = None,
        backend: backend_lib.Backend | None = None) -> dict | None:
  """Certifies the run in ``workdir``; returns the summary row (``None`` when
  stopped by ``stop_after_chunks`` or ``cfg.stop_at`` before the last chunk)."""
  cfg.validate()
  backend = backend or backend_lib.resolve()
  train_cfg, variables, logits_fn, data = load_model(workdir, data_dir, source, backend)
  keep = cfg.keep if cfg.keep is not None else (
      train_cfg.keep if train_cfg.drop == "ablate" else DEFAULT_KEEP)
  core = certify.CertifyConfig(keep=keep, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha,
                               samples_per_pass=cfg.samples_per_pass).validate()
  d = data.image_shape[0] * data.image_shape[1]
  if keep > d:
    raise ValueError(f"keep={keep} exceeds the {d} pixels of the {train_cfg.dataset} images")
  test = data.test.take(cfg.num_examples or None)
  contracts.check_labels(test.y, data.num_classes, name="test labels")
  out_dir = out_dir or os.path.join(workdir, "certify")
  sid = setting_id(core, cfg.seed)
  if cfg.rows_from and not os.path.isdir(cfg.rows_from):
    raise FileNotFoundError(f"--rows_from {cfg.rows_from}: no such directory")
  # What decides the rows besides the setting id: the samples of a pass, and the model.
  model_digest = digest(variables)
  store = SettingStore(out_dir, sid, {"samples_per_pass": core.samples_per_pass,
                                      MODEL_FIELD: model_digest})
  kept = committed_rows(cfg.rows_from, sid) if cfg.rows_from else None
  store.import_kept(kept, cfg.rows_from, len(test), cfg.batch_size)
  run_certify = certify.make_certify(logits_fn, core)
  key = jax.random.PRNGKey(cfg.seed)
  n_chunks = -(-len(test) // cfg.batch_size)
  bar = tqdm(total=len(test), desc=f"certify {sid}", unit="img", dynamic_ncols=True,
             disable=None if progress is None else not progress)
  seconds, certified_here, done_here = 0.0, 0, 0
  for c, (batch, n_valid) in enumerate(inference.padded_batches(
      {"image": test.x, "label": test.y}, cfg.batch_size)):
    if store.has_chunk(c):
      bar.update(n_valid)
      continue
    if (stop_after_chunks is not None and done_here >= stop_after_chunks) or (
        cfg.stop_at is not None and not deadlines.fits(
            cfg.stop_at, max(store.chunk_seconds(), default=None), f"chunk {c} of {sid}")):
      bar.close()
      return None
    index = batch["index"] + 0  # positions in the test split (padded rows repeat the last)
    t0 = time.perf_counter()
    result = run_certify(key, variables, augment.to_float(batch["image"]), index=index)
    chunk_seconds = time.perf_counter() - t0
    seconds += chunk_seconds
    certified_here += n_valid
    store.write_chunk(c, certify_rows({k: v[:n_valid] for k, v in result.items()},
                                      batch["label"][:n_valid], index[:n_valid]))
    store.record_seconds(c, chunk_seconds)
    done_here += 1
    bar.update(n_valid)
  bar.close()
  rows = store.merge(n_chunks)
  summary = {"setting": sid, "workdir": files.recorded_path(workdir), MODEL_FIELD: model_digest,
             "dataset": train_cfg.dataset, "depth": train_cfg.depth,
             "train_weight_decay": train_cfg.weight_decay, "train_drop": train_cfg.drop,
             "train_keep": train_cfg.keep if train_cfg.drop == "ablate" else None,
             "input_encoding": train_cfg.input_encoding, "num_pixels": d, "keep": keep,
             "n0": core.n0, "n": core.n, "alpha": core.alpha, "seed": cfg.seed,
             **certify.summarize(rows, cfg.radii)}
  if certified_here:
    summary["seconds_this_run"] = seconds
    summary["images_per_s"] = certified_here / max(seconds, 1e-9)
    # every certified image costs n0 + n forward passes (rounded up to whole passes)
    per_image = core.samples_per_pass * (-(-core.n0 // core.samples_per_pass)
                                         + -(-core.n // core.samples_per_pass))
    summary["forward_passes_per_s"] = summary["images_per_s"] * per_image
  update_summary(out_dir, summary)
  return summary


def certified_curve(rows: list[dict],
                    max_radius: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(radii, certified accuracy at each)`` for ``radii = 0 .. max_radius``
  (default: the largest radius in the rows): the fraction of examples that are
  correct and certified at ``>= rho``."""
  r = np.array([row["radius"] if row["correct"] else -1 for row in rows])
  top = int(max(r.max(), 0)) if max_radius is None else max_radius
  radii = np.arange(top + 1)
  return radii, np.array([np.mean(r >= rho) for rho in radii])


def read_rows(out_dir: str) -> dict[str, list[dict]]:
  """``{setting: rows}`` of every completed setting under ``out_dir``."""
  found = {}
  for name in sorted(os.listdir(out_dir)):
    path = os.path.join(out_dir, name, "rows.jsonl")
    if os.path.isfile(path):
      found[name] = files.read_jsonl(path)
  if not found:
    raise FileNotFoundError(f"no certification rows (*/rows.jsonl) under {out_dir}")
  return found
