"""Where an evaluation's rows and summaries live, and how a killed run resumes.

Layout under the output directory ``out`` (default ``<workdir>/eval``)::

    out/<setting>/setting.json        what besides the id determines the rows
    out/<setting>/chunk_00000.jsonl   one row per example of chunk 0 (atomic)
    out/<setting>/rows.jsonl          all rows of the setting, once every chunk exists
    out/<setting>/timing.jsonl        how long each chunk computed here took (wall
                                      seconds; for ``--stop_at``, not part of the rows)
    out/summary.jsonl                 one summary row per setting (replaced, not appended)
    out/calibration.jsonl             the entropy thresholds calibrated so far, by what
                                      determines them (:func:`cached_calibration`)

A chunk file exists only when complete (:func:`dropjax.files.write_atomic`),
so a re-run skips it and computes only the missing chunks -- of the same
configuration only: a run whose ``setting.json`` differs stops with an error
naming the fields, instead of mixing rows of two configurations.

Committed rows (``<setting>.rows.jsonl.gz`` beside ``<setting>.setting.json``,
as ``experiments/lib.sh`` ``save_rows`` keeps them) can seed the chunks of a
fresh output directory (:func:`committed_rows`, :meth:`SettingStore.import_rows`),
so an evaluation extended to more examples computes only the new chunks; the
``calibration.jsonl`` kept beside them (:func:`keep_records`) gives it the
thresholds those chunks were decided with, and ``<setting>.timing.jsonl`` their
chunk times (``--stop_at``'s estimate on a machine that has not timed one yet).
Imported chunks hold the same protocol and keys as recomputed ones, but not
always the same bits: on another CPU, float rounding (~1e-9 in the clean
entropies) can send an attack's iterates elsewhere (measured: chunk 0 of the
committed GTSRB L0 r = 0.5 rows, AMD EPYC, against an Intel Xeon recomputation:
robust accuracy 0.324 against 0.336 on 100 images).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from typing import Callable

import jax
import numpy as np

from dropjax import files

SUMMARY_FILE = "summary.jsonl"
ROWS_FILE = "rows.jsonl"
CONFIG_FILE = "setting.json"
# The configuration field holding the :func:`digest` of the model's variables, so that
# rows of one model never resume or extend another's.  Compared only where both
# configurations hold it: rows kept before it was recorded hold none.
MODEL_FIELD = "model_digest"
CALIBRATION_FILE = "calibration.jsonl"
TIMING_FILE = "timing.jsonl"


def _rows_if_any(path: str) -> list[dict]:
  """The rows of the JSON-lines file ``path``; ``[]`` if there is none yet."""
  return files.read_jsonl(path) if os.path.exists(path) else []


def _write_config(path: str, config: dict) -> None:
  """Writes a setting's configuration (``setting.json``) atomically, keys sorted."""
  files.write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _differences(a: dict, b: dict, a_name: str, b_name: str) -> str:
  """The fields where configs ``a`` and ``b`` differ, in words ("" if none);
  :data:`MODEL_FIELD` only where both hold it."""
  keys = set(a) | set(b)
  if MODEL_FIELD not in a or MODEL_FIELD not in b:
    keys.discard(MODEL_FIELD)
  diff = ", ".join(f"{k}: {a.get(k)!r} {a_name}, {b.get(k)!r} {b_name}"
                   for k in sorted(keys) if a.get(k) != b.get(k))
  if MODEL_FIELD in keys and a[MODEL_FIELD] != b[MODEL_FIELD]:
    diff += " (another model's variables)"
  return diff


class SettingStore:
  """The row files of one setting (``out/<setting>/``).

  ``config`` (JSON-ready dict): what determines the rows besides the setting's
  name, with the model's :func:`digest` under :data:`MODEL_FIELD`.  It is written
  on first use; a later store of the same directory with another config raises
  ``ValueError`` (directories written before this file existed take the first
  config given, those written before the model was recorded take its digest)."""

  def __init__(self, out_dir: str, setting: str, config: dict | None = None):
    self.setting = setting
    self.directory = os.path.join(out_dir, setting)
    os.makedirs(self.directory, exist_ok=True)
    if config is not None:
      self._check_config(json.loads(json.dumps(config)))

  @staticmethod
  def saved_config(out_dir: str, setting: str) -> dict | None:
    """The configuration ``out/<setting>/setting.json`` holds (``None``: none yet)."""
    path = os.path.join(out_dir, setting, CONFIG_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def _check_config(self, config: dict) -> None:
    path = os.path.join(self.directory, CONFIG_FILE)
    if not os.path.exists(path):
      _write_config(path, config)
      return
    with open(path) as f:
      saved = json.load(f)
    diff = _differences(saved, config, "there", "now")
    if diff:
      raise ValueError(
          f"{self.directory} holds rows computed with another configuration ({diff}); "
          "pass another --out, or delete that directory to recompute it")
    if MODEL_FIELD in config and MODEL_FIELD not in saved:
      _write_config(path, {**saved, MODEL_FIELD: config[MODEL_FIELD]})

  def import_rows(self, rows: list[dict], batch_size: int, config: dict | None) -> int:
    """Writes the missing chunks that ``rows`` hold in full; returns their number.

    ``rows``: one row per example in test-set order (row ``i`` has ``index`` i),
    as :meth:`merge` writes them; a trailing partial chunk is not imported (it
    is recomputed).  ``config``: the setting.json the rows were computed under,
    checked against this store's like a resume (``None``: rows committed before
    configurations were recorded; taken as they are)."""
    if config is not None:
      path = os.path.join(self.directory, CONFIG_FILE)
      if not os.path.exists(path):
        self._check_config(config)  # a store opened without a config adopts the kept one
      with open(path) as f:
        diff = _differences(config, json.load(f), "kept", "now")
      if diff:
        raise ValueError(f"the kept rows of {os.path.basename(self.directory)} were computed "
                         f"with another configuration ({diff}); they are not imported")
    for i, row in enumerate(rows):
      if row.get("index") != i:
        raise ValueError(f"row {i} of the rows imported into {self.directory} has index "
                         f"{row.get('index')!r}: rows must be in test-set order from 0")
    written = 0
    for c in range(len(rows) // batch_size):
      if not self.has_chunk(c):
        self.write_chunk(c, rows[c * batch_size:(c + 1) * batch_size])
        written += 1
    return written

  def chunk_path(self, chunk: int) -> str:
    return os.path.join(self.directory, f"chunk_{chunk:05d}.jsonl")

  def has_chunk(self, chunk: int) -> bool:
    return os.path.exists(self.chunk_path(chunk))

  def write_chunk(self, chunk: int, rows: list[dict]) -> None:
    files.write_jsonl(self.chunk_path(chunk), rows)

  def record_seconds(self, chunk: int, seconds: float) -> None:
    """Adds how long computing ``chunk`` took (wall seconds, compilation included)."""
    path = os.path.join(self.directory, TIMING_FILE)
    rows = _rows_if_any(path)
    files.write_jsonl(path, rows + [{"chunk": chunk, "seconds": round(seconds, 3)}])

  def chunk_seconds(self) -> list[float]:
    """The recorded chunk times of this setting (wall seconds)."""
    path = os.path.join(self.directory, TIMING_FILE)
    return [r["seconds"] for r in _rows_if_any(path)]

  def import_timing(self, rows: list[dict]) -> None:
    """Takes the chunk times ``rows`` (``{"chunk", "seconds"}``, kept beside
    committed rows by :func:`keep_records`) when this setting has none of its
    own, so ``--stop_at`` can estimate a chunk on a machine that never ran one."""
    path = os.path.join(self.directory, TIMING_FILE)
    if rows and not os.path.exists(path):
      files.write_jsonl(path, [{"chunk": r["chunk"], "seconds": r["seconds"]} for r in rows])

  def import_kept(self, kept: tuple[list[dict], dict | None] | None, rows_dir: str,
                  num_examples: int, batch_size: int) -> None:
    """Takes up the rows ``kept`` in ``rows_dir`` (:func:`committed_rows` of this
    setting; ``None``: nothing kept) for the first ``num_examples`` examples, and
    their chunk times (:meth:`import_rows`, :meth:`import_timing`)."""
    if kept:
      self.import_rows(kept[0][:num_examples], batch_size, kept[1])
      self.import_timing(committed_timing(rows_dir, self.setting))

  def merge(self, num_chunks: int) -> list[dict]:
    """All rows, chunk by chunk, also written to ``rows.jsonl``."""
    rows = []
    for c in range(num_chunks):
      rows += files.read_jsonl(self.chunk_path(c))
    files.write_jsonl(os.path.join(self.directory, ROWS_FILE), rows)
    return rows


def committed_rows(rows_dir: str, setting: str) -> tuple[list[dict], dict | None] | None:
  """``(rows, setting config or None)`` of ``setting`` kept in ``rows_dir``
  (``<setting>.rows.jsonl.gz`` or ``.rows.jsonl``, and ``<setting>.setting.json``
  if it was kept), or ``None`` when ``rows_dir`` holds no rows of ``setting``."""
  base = os.path.join(rows_dir, setting)
  for path in (base + ".rows.jsonl.gz", base + ".rows.jsonl"):
    if os.path.exists(path):
      rows = files.read_jsonl(path)
      break
  else:
    return None
  return rows, kept_config(rows_dir, setting)


def kept_config(rows_dir: str, setting: str) -> dict | None:
  """The configuration kept beside ``setting``'s rows in ``rows_dir``
  (``<setting>.setting.json``; ``None`` if it was not kept)."""
  path = os.path.join(rows_dir, setting + ".setting.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def committed_timing(rows_dir: str, setting: str) -> list[dict]:
  """The chunk times of ``setting`` kept in ``rows_dir`` (``<setting>.timing.jsonl``,
  :func:`keep_records`; ``[]`` if none)."""
  path = os.path.join(rows_dir, setting + ".timing.jsonl")
  return _rows_if_any(path)


# How long the run that computed a summary's rows took (evaluate.py's attack time,
# certify.py's time), known only to that run.
TIME_FIELDS = ("attack_seconds_this_run", "attack_images_per_s",
               "seconds_this_run", "images_per_s", "forward_passes_per_s")


def replace_summaries(old: list[dict], new: list[dict]) -> list[dict]:
  """``old`` summary rows with those of ``new``'s settings replaced by ``new``'s,
  each in the place of the row it replaces (a re-run leaves the file as it
  was); rows of settings not in ``old`` follow, in ``new``'s order.

  A new row that lacks the time (:data:`TIME_FIELDS`: a re-run that
  computed no chunk, every one kept or imported) keeps the replaced row's, when
  both cover the same examples -- the time of the run that computed them."""
  before = {r["setting"]: r for r in old}
  replaced = {}
  for row in new:
    prev = before.get(row["setting"], {})
    if (not any(k in row for k in TIME_FIELDS)
        and prev.get("num_examples") == row.get("num_examples")):
      row = {**row, **{k: prev[k] for k in TIME_FIELDS if k in prev}}
    replaced[row["setting"]] = row
  out = [replaced.pop(r["setting"], r) for r in old]
  return out + list(replaced.values())


def update_summary(out_dir: str, row: dict) -> dict:
  """Replaces the row of ``row["setting"]`` in ``out_dir/summary.jsonl``
  (:func:`replace_summaries`); returns the row as written."""
  path = os.path.join(out_dir, SUMMARY_FILE)
  old = _rows_if_any(path)
  rows = replace_summaries(old, [row])
  files.write_jsonl(path, rows)
  return next(r for r in rows if r["setting"] == row["setting"])


def read_summaries(paths: list[str]) -> list[dict]:
  """Summary rows from ``summary.jsonl`` files or directories holding one."""
  rows = []
  for p in paths:
    f = os.path.join(p, SUMMARY_FILE) if os.path.isdir(p) else p
    if not os.path.isfile(f):
      raise FileNotFoundError(f"no {SUMMARY_FILE} at {p}")
    rows += files.read_jsonl(f)
  return rows


def digest(*trees) -> str:
  """SHA-256 (hex) of the arrays of ``trees`` (their leaves in order, each by
  dtype, shape and bytes): what identifies a model's variables or a data split
  in a cache key."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(trees):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def cached_calibration(out_dir: str, key: dict, compute: Callable[[], dict],
                       kept_dir: str | None = None) -> dict:
  """The calibration (a JSON-ready dict) stored under ``key`` in
  ``out_dir/calibration.jsonl``, else the one kept under ``key`` in
  ``kept_dir/calibration.jsonl`` (committed beside the rows, :func:`merge_calibrations`),
  else ``compute()``; what is not in ``out_dir`` yet is stored there.

  ``key`` (JSON-ready) must hold everything the calibration depends on (the
  model's and the validation split's :func:`digest`, the drop rate, the keys'
  seed, ...).  A resumed or extended evaluation then reuses the thresholds its
  first chunks were decided with -- the same bits, even on another CPU -- and a
  setting whose chunks all exist costs no calibration pass."""
  key = json.loads(json.dumps(key))
  path = os.path.join(out_dir, CALIBRATION_FILE)
  entries = _rows_if_any(path)
  for entry in entries:
    if entry.get("key") == key:
      return entry["calibration"]
  kept = _rows_if_any(os.path.join(kept_dir, CALIBRATION_FILE)) if kept_dir else []
  value = next((e["calibration"] for e in kept if e.get("key") == key), None)
  if value is None:
    value = compute()
  files.write_jsonl(path, entries + [{"key": key, "calibration": value}])
  return json.loads(json.dumps(value))


def merge_calibrations(src_dir: str, dst_dir: str) -> int:
  """Adds the calibrations of ``src_dir/calibration.jsonl`` whose key
  ``dst_dir/calibration.jsonl`` lacks to it (kept entries win: the rows kept
  beside them were decided with those); returns how many were added.  Committed
  with the rows, they let another machine extend an evaluation with the
  thresholds its first chunks used (float rounding differs across CPUs)."""
  dst = os.path.join(dst_dir, CALIBRATION_FILE)
  kept = _rows_if_any(dst)
  keys = [e["key"] for e in kept]
  new = [e for e in _rows_if_any(os.path.join(src_dir, CALIBRATION_FILE))
         if e["key"] not in keys]
  if new:
    os.makedirs(dst_dir, exist_ok=True)
    files.write_jsonl(dst, kept + new)
  return len(new)


def _finished_rows_text(directory: str) -> str | None:
  """The rows of a setting directory as JSON-lines text: ``rows.jsonl``, else its
  chunks from chunk 0 up to the first one missing (a setting still running), else None."""
  path = os.path.join(directory, ROWS_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return f.read()
  parts, c = [], 0
  while os.path.isfile(chunk := os.path.join(directory, f"chunk_{c:05d}.jsonl")):
    with open(chunk) as f:
      parts.append(f.read())
    c += 1
  return "".join(parts) if parts else None


def rows_so_far(directory: str, setting: str) -> list[dict] | None:
  """The rows of ``setting`` in ``directory``: kept (:func:`committed_rows`), else an
  evaluation's ``<setting>/rows.jsonl`` or the chunks it finished so far; ``None``
  if none."""
  kept = committed_rows(directory, setting)
  if kept is not None:
    return kept[0]
  text = _finished_rows_text(os.path.join(directory, setting))
  return [json.loads(line) for line in text.splitlines() if line.strip()] if text else None


def _kept_text(base: str) -> str | None:
  """The text of the kept rows ``<base>.rows.jsonl.gz`` (or ``.rows.jsonl``)."""
  for path, opener in ((base + ".rows.jsonl.gz", gzip.open), (base + ".rows.jsonl", open)):
    if os.path.exists(path):
      with opener(path, "rt") as f:
        return f.read()
  return None


def keep_rows(out_dir: str, rows_dir: str) -> list[str]:
  """Keeps every setting's rows of ``out_dir`` in ``rows_dir`` as
  ``<setting>.rows.jsonl.gz`` beside its ``<setting>.setting.json`` (what
  :func:`committed_rows` reads); returns the settings written.

  A setting still running keeps its finished chunks in order.  Work is never
  lost: rows equal to the kept ones are not rewritten, and kept rows are not
  replaced by fewer rows (a run of fewer examples, or without ``--rows_from``)
  nor by rows of another configuration; either refusal is said on stderr.
  """
  written = []
  if not os.path.isdir(out_dir):
    return written
  for setting in sorted(os.listdir(out_dir)):
    directory = os.path.join(out_dir, setting)
    text = _finished_rows_text(directory) if os.path.isdir(directory) else None
    if text is None:
      continue
    config = SettingStore.saved_config(out_dir, setting)
    kept_rows, kept_config = committed_rows(rows_dir, setting) or (None, None)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if kept_rows is not None:
      diff = (_differences(kept_config, config, "kept", "here")
              if kept_config is not None and config is not None else "")
      if diff:
        print(f"{setting}: rows of another configuration ({diff}); the kept rows in "
              f"{rows_dir} stay", file=sys.stderr)
        continue
      if len(rows) < len(kept_rows):
        print(f"{setting}: {out_dir} holds {len(rows)} rows, {rows_dir} keeps "
              f"{len(kept_rows)}: the kept rows stay (extend them with --rows_from)",
              file=sys.stderr)
        continue
    base = os.path.join(rows_dir, setting)
    changed = False
    if kept_rows is None or (text != _kept_text(base) and rows != kept_rows):
      files.write_atomic(base + ".rows.jsonl.gz",
                         gzip.compress(text.encode(), compresslevel=9, mtime=0))
      changed = True
    if config is not None and kept_config and MODEL_FIELD in kept_config:
      config = {MODEL_FIELD: kept_config[MODEL_FIELD], **config}  # a digest is not dropped
    if config is not None and config != kept_config:
      _write_config(base + ".setting.json", config)
      changed = True
    if changed:
      written.append(setting)
  return written


def keep_records(out_dir: str, rows_dir: str) -> None:
  """Keeps beside the committed rows in ``rows_dir`` what besides the rows a
  later run on another machine needs: the calibrations (:func:`merge_calibrations`)
  and each setting's chunk times (``<setting>.timing.jsonl``; a chunk timed in
  ``out_dir`` replaces its kept time, the others stay)."""
  if not os.path.isdir(out_dir):
    return
  merge_calibrations(out_dir, rows_dir)
  for setting in sorted(os.listdir(out_dir)):
    timing = os.path.join(out_dir, setting, TIMING_FILE)
    if not os.path.isfile(timing):
      continue
    new = files.read_jsonl(timing)
    chunks = {r["chunk"] for r in new}
    kept = [r for r in committed_timing(rows_dir, setting) if r["chunk"] not in chunks]
    files.write_jsonl(os.path.join(rows_dir, setting + ".timing.jsonl"),
                      sorted(kept + new, key=lambda r: r["chunk"]))
