"""--stop_at's chunk estimate (dropjax.evaluation.chunk_time): own times first; a
Sparse-RS setting not timed yet scaled from the timed Sparse-RS settings by its
forward passes; else the longest chunk of --out, else kept in --rows_from."""
import json
import os

import pytest

from dropjax import files
from dropjax.evaluation import chunk_time
from dropjax.evaluation.settings import EvalConfig, drop_rate_of, row_config
from dropjax.evaluation.store import SettingStore


def sparse_rs(**kw):
  return row_config(EvalConfig(norm="l0", attack="sparse_rs", **kw), cascade=True)


def timed(out, sid, config, seconds):
  store = SettingStore(str(out), sid, config)
  for c, s in enumerate(seconds):
    store.record_seconds(c, s)


def test_forward_passes_count_configurations_queries_draws_and_masks():
  # 2 losses x (untargeted + 3 targets) configurations, 1 + 2 x 500 evaluations of 4
  # draws of the 10-mask defense each, per example of a chunk of 100.
  cfg = sparse_rs(queries=500, comparison="paired", query_draws=4,
                  losses=("margin", "rejection"), num_targets=3)
  assert chunk_time.sparse_rs_forward_passes(cfg, 0.9) == 100 * 2 * 4 * (1 + 1000) * 4 * 10
  assert chunk_time.sparse_rs_forward_passes(cfg, 0.0) == 100 * 2 * 4 * (1 + 1000) * 4
  fresh = sparse_rs(modes=("untargeted",))  # the authors' rule, defaults, one loss
  assert chunk_time.sparse_rs_forward_passes(fresh, 0.5) == 100 * 1 * (1 + 1000) * 10
  assert chunk_time.sparse_rs_forward_passes(row_config(EvalConfig(norm="l0")), 0.5) is None
  # A configuration kept before a field existed reads as that field's default.
  old = {k: v for k, v in fresh.items() if k not in ("query_draws", "comparison")}
  assert chunk_time.sparse_rs_forward_passes(old, 0.5) == 100 * (1 + 1000) * 10


def test_drop_rate_of_a_setting_id():
  assert drop_rate_of("l0_eps0.03_r0.9_sparse_rs_q500_paired_margin-rejection_untargeted") == 0.9
  assert drop_rate_of("linf_eps0.0627451_literal_r0") == 0.0
  assert drop_rate_of("l2_eps1_doubled_r0.3_rejection") == 0.3
  with pytest.raises(ValueError, match="names no drop rate"):
    drop_rate_of("summary")


def test_own_times_then_sparse_rs_scaled_then_the_longest(tmp_path):
  out = tmp_path / "out"
  base = sparse_rs(queries=500, comparison="paired", modes=("untargeted",))
  timed(out, "l0_eps0.03_r0.5_base", base, [900.0, 1000.0])
  timed(out, "linf_eps0.1_literal_r0.5", row_config(EvalConfig(norm="linf")), [3000.0])
  # Its own chunks: the longest of them.
  assert chunk_time.expected_seconds(str(out), "l0_eps0.03_r0.5_base") == 1000.0
  # A new Sparse-RS setting with 4 draws per loss: 4x the passes at the timed rate
  # (not the 3,000 s of the slowest chunk of --out, nor the 1,000 s of the base).
  SettingStore(str(out), "l0_eps0.03_r0.9_draws4",
               sparse_rs(queries=500, comparison="paired", modes=("untargeted",), query_draws=4))
  got = chunk_time.expected_seconds(str(out), "l0_eps0.03_r0.9_draws4")
  assert got == pytest.approx(1000.0 * (1 + 1000) * 4 / (1 + 1000))
  # Timed at r = 0 only (one pass per evaluation), a new setting at r > 0 is expected
  # to take num_masks x as long per evaluation.
  r0 = tmp_path / "r0"
  timed(r0, "l0_eps0.03_r0_fresh", sparse_rs(), [80.0])
  SettingStore(str(r0), "l0_eps0.03_r0.5_fresh", sparse_rs())
  assert chunk_time.expected_seconds(str(r0), "l0_eps0.03_r0.5_fresh") == pytest.approx(800.0)
  # Another attack not timed yet: the longest chunk of --out.
  SettingStore(str(out), "l2_eps1_literal_r0.5", row_config(EvalConfig(norm="l2")))
  assert chunk_time.expected_seconds(str(out), "l2_eps1_literal_r0.5") == 3000.0


def test_kept_times_when_out_has_none(tmp_path):
  kept, out = tmp_path / "kept", tmp_path / "out"
  os.makedirs(kept)
  old = sparse_rs(modes=("untargeted",))
  files.write_jsonl(str(kept / "l0_eps0.03_r0.9_old.timing.jsonl"),
                    [{"chunk": 0, "seconds": 500.0}, {"chunk": 1, "seconds": 600.0}])
  files.write_atomic(str(kept / "l0_eps0.03_r0.9_old.setting.json"),
                     json.dumps(old))
  files.write_jsonl(str(kept / "linf_eps0.1_literal_r0.9.timing.jsonl"),
                    [{"chunk": 0, "seconds": 7000.0}])
  SettingStore(str(out), "l0_eps0.03_r0.9_q2000", sparse_rs(queries=2000, modes=("untargeted",)))
  got = chunk_time.expected_seconds(str(out), "l0_eps0.03_r0.9_q2000", str(kept))
  assert got == pytest.approx(600.0 * (1 + 2000) / (1 + 1000))
  SettingStore(str(out), "l2_eps1_literal_r0.9", row_config(EvalConfig(norm="l2")))
  assert chunk_time.expected_seconds(str(out), "l2_eps1_literal_r0.9", str(kept)) == 7000.0
  # The paired comparison is predicted by the paired settings' rate, even kept ones,
  # before the authors' rule's (run without the cascade: more seconds per counted pass).
  files.write_jsonl(str(kept / "l0_eps0.03_r0.9_paired.timing.jsonl"),
                    [{"chunk": 0, "seconds": 300.0}])
  files.write_atomic(str(kept / "l0_eps0.03_r0.9_paired.setting.json"), json.dumps(
      sparse_rs(queries=500, comparison="paired", modes=("untargeted",))))
  timed(out, "l0_eps0.03_r0.5_fresh", old, [900.0])  # in --out, but the other rule
  SettingStore(str(out), "l0_eps0.03_r0.9_draws4", sparse_rs(
      queries=500, comparison="paired", modes=("untargeted",), query_draws=4))
  assert chunk_time.expected_seconds(str(out), "l0_eps0.03_r0.9_draws4", str(kept)) == \
      pytest.approx(4 * 300.0)
  # No paired setting timed anywhere: the other rule's rate, as before.
  SettingStore(str(tmp_path / "o2"), "l0_eps0.03_r0.9_draws4", sparse_rs(
      queries=500, comparison="paired", modes=("untargeted",), query_draws=4))
  timed(tmp_path / "o2", "l0_eps0.03_r0.9_fresh", old, [500.0])
  assert chunk_time.expected_seconds(str(tmp_path / "o2"), "l0_eps0.03_r0.9_draws4") == \
      pytest.approx(500.0 * (1 + 1000) * 4 / (1 + 1000))
  # Nothing timed anywhere: no estimate (the chunk starts while the deadline is ahead).
  assert chunk_time.expected_seconds(str(tmp_path / "empty"), "l0_eps0.03_r0.9_x") is None
