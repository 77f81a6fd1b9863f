"""Metric rows as JSON lines (and optionally TensorBoard) in the workdir."""
from __future__ import annotations

import json
import os

import jax

from dropjax import files


class MetricWriter:
  """Appends one JSON object per line to ``workdir/<name>``; process 0 only.

  ``truncate_after(step)`` drops rows past ``step`` (rows a killed run wrote
  after its last checkpoint), so a resumed run has no duplicate rows.
  """

  def __init__(self, workdir: str, name: str = "metrics.jsonl", tensorboard: bool = False):
    self.path = os.path.join(workdir, name)
    self.enabled = jax.process_index() == 0
    self.tb = None
    if tensorboard and self.enabled:
      from flax.metrics import tensorboard as tb  # pylint: disable=g-import-not-at-top
      self.tb = tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not os.path.exists(self.path):
      return
    files.write_jsonl(self.path, [r for r in files.read_jsonl(self.path)
                                  if r.get("step", 0) <= step])

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "step":
          self.tb.scalar(f"{row.get('kind', 'train')}/{k}", v, row.get("step", 0))
      self.tb.flush()
