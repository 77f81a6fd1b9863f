"""Interim numbers of unfinished settings (dropjax.evaluation.interim)."""
import gzip
import json
import os

import numpy as np
import pytest

from dropjax import intervals
from dropjax.evaluation import interim
from test_combine import fake_rows, reference_accuracy


def write_chunks(directory, rows, per_chunk):
  os.makedirs(directory)
  for c in range(0, len(rows), per_chunk):
    with open(os.path.join(directory, f"chunk_{c // per_chunk:05d}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows[c:c + per_chunk])


def test_rows_so_far_take_the_finished_chunks_and_the_longest_source(tmp_path):
  rows = fake_rows(np.zeros((8, 3), bool))
  write_chunks(tmp_path / "run" / "s", rows[:6], 2)
  os.remove(tmp_path / "run" / "s" / "chunk_00001.jsonl")  # chunk 1 missing: stop before
  assert interim.rows_so_far([str(tmp_path / "run")], "s") == rows[:2]
  os.makedirs(tmp_path / "kept")
  with gzip.open(tmp_path / "kept" / "s.rows.jsonl.gz", "wt") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[:4])
  for order in (["run", "kept"], ["kept", "run"]):
    assert interim.rows_so_far([str(tmp_path / d) for d in order], "s") == rows[:4]
  with pytest.raises(FileNotFoundError, match="no finished rows of setting 't'"):
    interim.rows_so_far([str(tmp_path / "run")], "t")


def test_worst_case_on_common_examples_matches_the_reference():
  rng = np.random.default_rng(5)
  a, b = rng.random((10, 5)) < 0.4, rng.random((10, 5)) < 0.4
  out = interim.interim({"a": fake_rows(a), "b": fake_rows(b)[:6]}, worst=True)  # b: 6 so far
  assert all(r["interim"] for r in out)
  own = {r["setting"]: r for r in out if r["examples"] == "own"}
  common = {r["setting"]: r for r in out if r["examples"] == "common"}
  assert own["a"]["num_examples"] == 10 and own["b"]["num_examples"] == 6
  assert own["a"]["robust_accuracy_avg"] == pytest.approx(1 - a.mean())
  assert common["a"]["robust_accuracy_avg"] == pytest.approx(1 - a[:6].mean())
  worst = common[interim.WORST]
  assert worst["num_examples"] == 6
  assert worst["robust_accuracy_avg"] == pytest.approx(reference_accuracy([a[:6], b[:6]]))
  assert worst["robust_accuracy_avg"] <= min(common["a"]["robust_accuracy_avg"],
                                             common["b"]["robust_accuracy_avg"])
  lo, hi = worst["robust_accuracy_avg_interval"]
  assert (lo, hi) == pytest.approx(intervals.wilson(worst["robust_accuracy_avg"], 6))
  assert interim.table(out).count("\n") == len(out) + 1  # header, rule, one line per row
  assert [r["examples"] for r in interim.interim({"a": fake_rows(a), "b": fake_rows(b)})] == \
      ["own", "own"]  # no worst case unless asked
  with pytest.raises(ValueError, match="clean decisions"):  # not families of one setting
    interim.interim({"a": fake_rows(a), "c": fake_rows(a, preds=[2] * 10)}, worst=True)


def test_cli_prints_a_table_or_json(tmp_path, capsys):
  rows = fake_rows(np.ones((4, 2), bool))
  write_chunks(tmp_path / "s", rows, 4)
  assert interim.main(["--rows", str(tmp_path), "--", "s"]) == 0
  assert "| s | own | 4 |" in capsys.readouterr().out
  assert interim.main(["--rows", str(tmp_path), "--json", "true", "--", "s"]) == 0
  [line] = capsys.readouterr().out.strip().splitlines()
  assert json.loads(line)["robust_accuracy_avg"] == 0.0
  assert interim.main(["--rows", str(tmp_path), "--", "missing"]) != 0
