"""Writing result files so that a kill never leaves a half-written one.

Every file dropjax writes for later reading (configs, metric rows, evaluation
chunks and summaries, certification rows, figures' row files) goes through
:func:`write_atomic`: the text is written to a temporary file in the same
directory, flushed to disk and renamed over the target, so a reader sees the
old file or the new one, never a mix.  Rows are JSON objects, one per line.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
from typing import Iterable


def write_atomic(path: str, text: str | bytes) -> None:
  """Replaces ``path`` with ``text`` (str, or bytes written as they are)
  atomically (creating its directory)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
  try:
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def jsonl(rows: Iterable[dict]) -> str:
  """JSON lines (sorted keys) of ``rows``."""
  return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
  """Replaces ``path`` with ``rows`` as JSON lines, atomically."""
  write_atomic(path, jsonl(rows))


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file, gzipped if its name ends in ``.gz`` (blank lines skipped).

  Raises ``ValueError`` naming the file and line for a corrupt line.
  """
  rows = []
  with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
    for i, line in enumerate(f, start=1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}, line {i}: not a JSON row ({e.msg})") from None
  return rows


def recorded_path(path: str) -> str:
  """``path`` as a result row records it: relative to the working directory when it lies
  below it (``pretrained/NAME``, ``runs/X``: rows stay meaningful in another checkout),
  else absolute."""
  full, cwd = os.path.abspath(path), os.getcwd()
  return os.path.relpath(full, cwd) if full.startswith(cwd + os.sep) else full


def expand(patterns: Iterable[str]) -> list[str]:
  """Command-line paths with their globs expanded (sorted); a pattern matching nothing
  stays as given, so the reader names the missing file in its error."""
  return [m for pat in patterns for m in (sorted(glob.glob(pat)) or [pat])]
