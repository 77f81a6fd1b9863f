"""Where an evaluation's rows and summaries live, and how a killed run resumes.

Layout under the output directory ``out`` (default ``<workdir>/eval``)::

    out/<setting>/setting.json        what besides the id determines the rows
    out/<setting>/chunk_00000.jsonl   one row per example of chunk 0 (atomic)
    out/<setting>/rows.jsonl          all rows of the setting, once every chunk exists
    out/summary.jsonl                 one summary row per setting (replaced, not appended)

A chunk file exists only when complete (:func:`dropjax.files.write_atomic`),
so a re-run skips it and computes only the missing chunks -- of the same
configuration only: a run whose ``setting.json`` differs stops with an error
naming the fields, instead of mixing rows of two configurations.
"""
from __future__ import annotations

import json
import os

from dropjax import files

SUMMARY_FILE = "summary.jsonl"
ROWS_FILE = "rows.jsonl"
CONFIG_FILE = "setting.json"


class SettingStore:
  """The row files of one setting (``out/<setting>/``).

  ``config`` (JSON-ready dict): what determines the rows besides the setting's
  name.  It is written on first use; a later store of the same directory with
  another config raises ``ValueError`` (directories written before this file
  existed take the first config given)."""

  def __init__(self, out_dir: str, setting: str, config: dict | None = None):
    self.directory = os.path.join(out_dir, setting)
    os.makedirs(self.directory, exist_ok=True)
    if config is not None:
      self._check_config(json.loads(json.dumps(config)))

  def _check_config(self, config: dict) -> None:
    path = os.path.join(self.directory, CONFIG_FILE)
    if not os.path.exists(path):
      files.write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
      return
    with open(path) as f:
      saved = json.load(f)
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if diff:
      raise ValueError(
          f"{self.directory} holds rows computed with another configuration ("
          + ", ".join(f"{k}: {saved.get(k)!r} there, {config.get(k)!r} now" for k in diff)
          + "); pass another --out, or delete that directory to recompute it")

  def chunk_path(self, chunk: int) -> str:
    return os.path.join(self.directory, f"chunk_{chunk:05d}.jsonl")

  def has_chunk(self, chunk: int) -> bool:
    return os.path.exists(self.chunk_path(chunk))

  def write_chunk(self, chunk: int, rows: list[dict]) -> None:
    files.write_jsonl(self.chunk_path(chunk), rows)

  def merge(self, num_chunks: int) -> list[dict]:
    """All rows, chunk by chunk, also written to ``rows.jsonl``."""
    rows = []
    for c in range(num_chunks):
      rows += files.read_jsonl(self.chunk_path(c))
    files.write_jsonl(os.path.join(self.directory, ROWS_FILE), rows)
    return rows


def update_summary(out_dir: str, row: dict) -> None:
  """Replaces the row of ``row["setting"]`` in ``out_dir/summary.jsonl``."""
  path = os.path.join(out_dir, SUMMARY_FILE)
  rows = [r for r in (files.read_jsonl(path) if os.path.exists(path) else [])
          if r["setting"] != row["setting"]]
  files.write_jsonl(path, rows + [row])


def read_summaries(paths: list[str]) -> list[dict]:
  """Summary rows from ``summary.jsonl`` files or directories holding one."""
  rows = []
  for p in paths:
    f = os.path.join(p, SUMMARY_FILE) if os.path.isdir(p) else p
    if not os.path.isfile(f):
      raise FileNotFoundError(f"no {SUMMARY_FILE} at {p}")
    rows += files.read_jsonl(f)
  return rows
