import dataclasses
import json
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import another_model
from dropjax import defense, evaluation, files
from dropjax.masks import DropSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.PRNGKey(0)


def linear_logits(v, x):
  return x.reshape(x.shape[0], -1) @ v


def test_one_mask_at_rate_zero_is_the_plain_model():
  v = jax.random.normal(KEY, (48, 5))
  x = jax.random.uniform(KEY, (7, 4, 4, 3), minval=-1, maxval=1)
  p = defense.mask_average_probs(KEY, linear_logits, v, x, DropSpec.fixed(0.0), 1)
  np.testing.assert_allclose(p, jax.nn.softmax(linear_logits(v, x)), rtol=1e-6)
  p10 = defense.mask_average_probs(KEY, linear_logits, v, x, DropSpec(), 10)
  np.testing.assert_allclose(p10, p, rtol=1e-6)
  # Nothing dropped: every mask is the identity, and the average costs one pass.
  def flops(drop, k):
    f = jax.jit(lambda x: defense.mask_average_probs(KEY, linear_logits, v, x, drop, k))
    return f.lower(x).compile().cost_analysis()["flops"]
  assert flops(DropSpec.fixed(0.0), 10) == flops(DropSpec.fixed(0.0), 1) == flops(DropSpec(), 10)
  assert flops(DropSpec.fixed(0.5), 10) > 5 * flops(DropSpec.fixed(0.5), 1)


def test_mask_average_equals_loop_over_keys():
  v = jax.random.normal(KEY, (48, 5))
  x = jax.random.uniform(KEY, (3, 4, 4, 3), minval=-1, maxval=1)
  got = defense.mask_average_probs(KEY, linear_logits, v, x, DropSpec.fixed(0.6), 4)
  # Reference from the parts: mask k keeps u >= 0.6 with u from split(key)[k].
  ref = np.mean([jax.nn.softmax(linear_logits(v, x * (jax.random.uniform(k, x.shape) >= 0.6)))
                 for k in jax.random.split(KEY, 4)], axis=0)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)


def test_entropy_known_values():
  p = jnp.array([[1.0, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0]])
  np.testing.assert_allclose(defense.entropy(p), [0, np.log(4), np.log(2)], rtol=1e-6)


def test_threshold_calibration_hits_its_target():
  # 1000 examples, 900 correct with entropies 0.001..0.9, 100 wrong at 5.0.
  h = np.concatenate([np.arange(1, 901) / 1000, np.full(100, 5.0)])
  correct = np.concatenate([np.ones(900, bool), np.zeros(100, bool)])
  t = defense.calibrate_threshold(h, correct, max_drop=0.01)
  # Base 0.90; keep 890 correct -> threshold at the 890th smallest = 0.890.
  assert t == pytest.approx(0.890)
  acc = defense.accuracy_with_rejection(correct.astype(int), np.ones(1000, int), h > t)
  assert acc == pytest.approx(0.89)
  assert defense.calibrate_threshold(h, correct, max_drop=0.0) == pytest.approx(0.9)
  with pytest.raises(ValueError, match="matching"):
    defense.calibrate_threshold(h, correct[:5])


def test_calibration_rules_on_synthetic_defense():
  """200 validation images: the single-mask prediction is right on 150, the
  average on 180 (entropy 0.001 * rank for the right ones, 3.0 for wrong ones).
  The paper's rule keeps the averaged defense at 0.75 - 0.01 = 0.74 accuracy with
  rejection (148 right kept); the stricter rule at 0.90 - 0.01 = 0.89 (178 kept)."""
  n, c = 200, 4
  y = np.zeros(n, np.int64)
  order = np.arange(n)

  def probs(right):
    p = np.full((n, c), 0.0)
    for i in range(n):
      if right[i]:  # a confident right answer, entropy grows with the rank
        p[i] = [1 - 3e-4 * (1 + order[i]) / n, 1e-4 * (1 + order[i]) / n,
                1e-4 * (1 + order[i]) / n, 1e-4 * (1 + order[i]) / n]
      else:
        p[i] = [0.1, 0.6, 0.15, 0.15]
    return p

  single, avg = probs(order < 150), probs(order < 180)

  def defend(key, variables, x):  # each image carries its index as its pixel value
    i = np.rint((np.asarray(x)[:, 0, 0, 0] + 1) * 127.5).astype(int)
    return {"plain": avg[i], "single": single[i], "avg": avg[i]}

  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 3))
  paper = evaluation.calibrate(defend, None, images, y, 50, KEY, 0.01, "single")
  strict = evaluation.calibrate(defend, None, images, y, 50, KEY, 0.01, "avg")
  h = np.asarray(defense.entropy(avg))
  for th, keep in ((paper, 148), (strict, 178)):
    assert th["avg"] == pytest.approx(np.sort(h[:180])[keep - 1])
    acc = defense.accuracy_with_rejection(avg.argmax(-1), y, h > th["avg"])
    assert acc == pytest.approx(keep / n)
  assert paper["target_accuracy_avg"] == pytest.approx(0.74)
  assert strict["target_accuracy_avg"] == pytest.approx(0.89)
  assert paper["val_accuracy_single"] == 0.75 and paper["val_accuracy_avg"] == 0.9
  assert paper["single"] == strict["single"]  # the single-mask threshold: its own rule
  # A reference above the accuracy without rejection: reject nothing.
  assert defense.calibrate_threshold(h, avg.argmax(-1) == y, 0.01, reference=0.95) == np.inf


def test_rejection_counts():
  pred, y = np.array([0, 1, 2, 3]), np.array([0, 0, 2, 0])
  rej = np.array([True, True, False, False])
  assert defense.accuracy_with_rejection(pred, y, rej) == 0.25      # rejected = error
  assert defense.robust_accuracy_with_rejection(pred, y, rej) == 0.75  # rejected = success


def ev_config(**kw):
  base = dict(norm="linf", steps=2, eot_samples=2, num_masks=3, num_examples=40,
              batch_size=16, eps=[0.1], losses=("ce",), modes=("untargeted",), score_draws=2)
  base.update(kw)
  return evaluation.EvalConfig(**base)


def test_rows_complete_and_summary_is_their_aggregate(tiny_workdir, tmp_path):
  out = str(tmp_path / "ev")
  [summary] = evaluation.evaluate(tiny_workdir, ev_config(), out, progress=False)
  rows = files.read_jsonl(os.path.join(out, summary["setting"], "rows.jsonl"))
  assert [r["index"] for r in rows] == list(range(40))
  need = {"index", "label", "pred_plain", "pred_single", "pred_avg", "adv_pred_avg",
          "adv_pred_single", "entropy_avg", "adv_entropy_avg", "rejected_avg",
          "adv_rejected_avg", "norm_linf", "norm_l2", "norm_l0", "norm_linf_pixel01",
          "adv_broken_avg", "adv_broken_avg_with_rejection", "adv_attack_avg",
          "budget_reading", "eps_x_units", "eps_pixel01"}
  assert need <= set(rows[0])
  # Literal reading: the budget is 0.1 in units of X, 0.05 on the [0, 1] scale.
  assert rows[0]["eps_x_units"] == 0.1 and rows[0]["eps_pixel01"] == 0.05
  assert summary["budget_reading"] == "literal" and summary["eps_pixel01"] == 0.05
  assert max(r["norm_linf"] for r in rows) <= 0.1 + 1e-6
  assert max(r["norm_linf_pixel01"] for r in rows) <= 0.05 + 1e-6
  y = np.array([r["label"] for r in rows])
  assert summary["clean_accuracy_avg"] == pytest.approx(
      np.mean(np.array([r["pred_avg"] for r in rows]) == y))
  for metric in ("avg", "avg_with_rejection", "single", "plain"):
    draws = np.array([r[f"adv_broken_{metric}"] for r in rows])  # (B, R)
    assert draws.shape == (40, 2)
    assert summary[f"robust_accuracy_{metric}"] == pytest.approx(1 - draws.mean())
    assert summary[f"robust_accuracy_{metric}_std"] == pytest.approx((1 - draws.mean(0)).std())
  # Broken with rejection implies broken without; the first draw's decision is a row.
  wr = np.array([r["adv_broken_avg_with_rejection"] for r in rows])
  assert np.all(~wr | np.array([r["adv_broken_avg"] for r in rows]))
  first = np.array([r["adv_pred_avg"] for r in rows]) != y
  rej = np.array([r["adv_rejected_avg"] for r in rows])
  np.testing.assert_array_equal(wr[:, 0], first & ~rej)
  assert summary["adv_rejection_rate_avg"] == pytest.approx(rej.mean())
  h = np.array([r["adv_entropy_avg"] for r in rows])
  np.testing.assert_array_equal(rej, h > summary["threshold_avg"])
  [line] = files.read_jsonl(os.path.join(out, "summary.jsonl"))
  assert line["setting"] == summary["setting"]


def test_all_configurations_run_and_the_worst_is_kept(tiny_workdir, tmp_path):
  cfg = ev_config(losses=("ce", "cw"), modes=("untargeted", "targeted"), num_targets=2,
                  num_examples=16, eps=[0.3])
  [summary] = evaluation.evaluate(tiny_workdir, cfg, str(tmp_path), progress=False)
  assert summary["attacks"] == ["ce-untargeted", "ce-targeted-top1", "ce-targeted-top2",
                                "cw-untargeted", "cw-targeted-top1", "cw-targeted-top2"]
  rows = files.read_jsonl(str(tmp_path / summary["setting"] / "rows.jsonl"))
  for r in rows:
    assert r["adv_attack_avg"] in summary["attacks"]
  # Each single attack alone is never stronger than the worst case over all of them.
  for name, c, rank in evaluation.attack_configs(cfg, "gtsrb", 0.3, DropSpec.fixed(0.5)):
    assert c.targeted == (name.split("-")[1] == "targeted") and (rank is None) == (not c.targeted)
  one = ev_config(num_examples=16, eps=[0.3])
  [alone] = evaluation.evaluate(tiny_workdir, one, str(tmp_path / "one"), progress=False)
  assert summary["robust_accuracy_avg"] <= alone["robust_accuracy_avg"] + 1e-9


def test_resume_by_chunk_gives_identical_rows(tiny_workdir, tmp_path):
  cfg = ev_config(norm="l2", eps=[0.5])
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  evaluation.evaluate(tiny_workdir, cfg, a, progress=False)
  assert evaluation.evaluate(tiny_workdir, cfg, b, stop_after_chunks=2, progress=False) == []
  [sid] = [d for d in os.listdir(b) if os.path.isdir(os.path.join(b, d))]
  assert sorted(os.listdir(os.path.join(b, sid))) == ["chunk_00000.jsonl", "chunk_00001.jsonl",
                                                     "setting.json", "timing.jsonl"]
  evaluation.evaluate(tiny_workdir, cfg, b, progress=False)
  ra = pathlib.Path(a, sid, "rows.jsonl").read_text()
  rb = pathlib.Path(b, sid, "rows.jsonl").read_text()
  assert ra == rb and len(ra.splitlines()) == 40


def test_calibration_is_kept_and_reused_only_under_the_same_key(tiny_workdir, tmp_path,
                                                                monkeypatch):
  from dropjax.evaluation import protocol, store
  calls = []
  real = protocol.calibrate
  monkeypatch.setattr(protocol, "calibrate", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
  out = str(tmp_path / "ev")
  cfg = ev_config(norm="none", num_examples=16, drop_rates=[0.5, 0.9])
  first = evaluation.evaluate(tiny_workdir, cfg, out, progress=False)
  assert len(calls) == 2  # one pass per drop rate
  again = evaluation.evaluate(tiny_workdir, cfg, out, progress=False)
  assert len(calls) == 2 and again == first  # a finished setting costs no calibration
  # An attacked setting of the same rates, resumed by chunk, reuses them too.
  atk = ev_config(eps=[0.1], num_examples=32, drop_rates=[0.9])
  assert evaluation.evaluate(tiny_workdir, atk, out, stop_after_chunks=1, progress=False) == []
  [attacked] = evaluation.evaluate(tiny_workdir, atk, out, progress=False)
  assert len(calls) == 2
  assert attacked["threshold_avg"] == first[1]["threshold_avg"]
  # What the thresholds depend on is in the key: another max_drop or seed recalibrates.
  path = os.path.join(out, store.CALIBRATION_FILE)
  for i, change in enumerate([dict(max_drop=0.05), dict(seed=3)]):
    other = str(tmp_path / f"other{i}")
    os.makedirs(other)
    shutil.copy(path, other)
    evaluation.evaluate(tiny_workdir, dataclasses.replace(cfg, drop_rates=(0.9,), **change),
                        other, progress=False)
    assert len(pathlib.Path(other, store.CALIBRATION_FILE).read_text().splitlines()) == 3
  assert calls == [0.01, 0.01, 0.05, 0.01]
  # The kept value is the one used: an edited entry shows up in the next summary.
  entries = files.read_jsonl(str(path))
  assert [e["key"]["drop_rate"] for e in entries] == [0.5, 0.9]
  entries[0]["calibration"]["avg"] = 123.0
  pathlib.Path(path).write_text("".join(json.dumps(e) + "\n" for e in entries))
  rerun = evaluation.evaluate(tiny_workdir, cfg, out, progress=False)
  assert rerun[0]["threshold_avg"] == 123.0 and rerun[1] == first[1] and len(calls) == 4


def test_kept_calibration_is_used_before_computing_and_copied_to_out(tmp_path):
  from dropjax.evaluation import store
  out, kept = str(tmp_path / "out"), str(tmp_path / "kept")
  os.makedirs(out)
  calls = []
  compute = lambda: calls.append(1) or {"avg": 1.0, "single": 2.0}
  assert store.cached_calibration(out, {"r": 0.5}, compute, kept_dir=kept) == {
      "avg": 1.0, "single": 2.0}  # nothing kept (no file): computed
  os.makedirs(kept)
  pathlib.Path(kept, store.CALIBRATION_FILE).write_text(
      json.dumps({"key": {"r": 0.9}, "calibration": {"avg": 7.0, "single": 8.0}}) + "\n")
  assert store.cached_calibration(out, {"r": 0.9}, compute, kept_dir=kept) == {
      "avg": 7.0, "single": 8.0}
  assert len(calls) == 1
  # Now in out: used from there even without the kept directory.
  assert store.cached_calibration(out, {"r": 0.9}, compute) == {"avg": 7.0, "single": 8.0}
  assert len(calls) == 1
  assert store.merge_calibrations(out, kept) == 1  # r = 0.5 joins; r = 0.9 was kept
  assert store.merge_calibrations(out, kept) == 0
  assert [e["key"] for e in files.read_jsonl(os.path.join(kept, store.CALIBRATION_FILE))] == [
      {"r": 0.9}, {"r": 0.5}]
  assert store.merge_calibrations(str(tmp_path / "none"), str(tmp_path / "new")) == 0
  assert not os.path.exists(str(tmp_path / "new"))


def test_stop_at_starts_no_chunk_it_does_not_expect_to_finish(tiny_workdir, tmp_path, capsys):
  import datetime
  from dropjax.evaluation import store
  now = datetime.datetime.now()
  soon = (now + datetime.timedelta(hours=1)).isoformat(timespec="seconds")
  cfg = ev_config(norm="l2", eps=[0.5])
  out = str(tmp_path / "ev")
  # Nothing timed yet and the deadline ahead: chunks start, and are timed.
  assert evaluation.evaluate(tiny_workdir, dataclasses.replace(cfg, stop_at=soon), out,
                             stop_after_chunks=1, progress=False) == []
  [sid] = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
  setting = store.SettingStore(out, sid)
  [first] = setting.chunk_seconds()
  assert first > 0
  # A chunk expected to outlast the deadline does not start; the rows are untouched.
  pathlib.Path(out, sid, store.TIMING_FILE).write_text(
      json.dumps({"chunk": 0, "seconds": 7200.0}) + "\n")
  assert evaluation.evaluate(tiny_workdir, dataclasses.replace(cfg, stop_at=soon), out,
                             progress=False) == []
  assert "chunk 1 of " + sid + " not started" in capsys.readouterr().err
  assert sorted(f for f in os.listdir(os.path.join(out, sid)) if f.startswith("chunk_0")) == [
      "chunk_00000.jsonl"]
  # Another setting of the same --out with no time of its own is expected to take the
  # longest recorded there, so it does not start either; the next setting is tried.
  two = dataclasses.replace(cfg, eps=[0.25, 0.5], stop_at=soon)
  assert evaluation.evaluate(tiny_workdir, two, out, progress=False) == []
  assert len([d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]) == 2
  # With time enough (and without a deadline) the setting finishes as one run would.
  later = (now + datetime.timedelta(hours=3)).isoformat(timespec="seconds")
  [done] = evaluation.evaluate(tiny_workdir, dataclasses.replace(cfg, stop_at=later), out,
                               progress=False)
  assert done["attack_seconds_this_run"] > 0
  [again] = evaluation.evaluate(tiny_workdir, cfg, out, progress=False)  # nothing to compute:
  assert again == done  # the time of the run that computed the chunks is kept
  [whole] = evaluation.evaluate(tiny_workdir, cfg, str(tmp_path / "whole"), progress=False)
  assert pathlib.Path(out, sid, "rows.jsonl").read_text() == \
      pathlib.Path(tmp_path / "whole", sid, "rows.jsonl").read_text()
  assert len(setting.chunk_seconds()) == 3  # the edited one, and chunks 1 and 2
  # A fresh --out with nothing timed takes the longest chunk kept in --rows_from.
  kept = str(tmp_path / "kept")
  os.makedirs(kept)
  files.write_jsonl(os.path.join(kept, "another.timing.jsonl"), [{"chunk": 0, "seconds": 7200.0}])
  from dropjax.evaluation import chunk_time
  assert chunk_time.expected_seconds(str(tmp_path / "fresh_kept"), sid, kept) == 7200.0
  assert evaluation.evaluate(tiny_workdir, dataclasses.replace(cfg, stop_at=soon, rows_from=kept),
                             str(tmp_path / "fresh_kept"), progress=False) == []
  assert "chunk 0 of " + sid + " not started" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(tmp_path / "fresh_kept", sid, "chunk_00000.jsonl"))
  # A deadline already passed starts nothing, timed or not.
  past = (now - datetime.timedelta(minutes=1)).isoformat(timespec="seconds")
  assert evaluation.evaluate(tiny_workdir, ev_config(norm="l2", eps=[0.5], stop_at=past),
                             str(tmp_path / "fresh"), progress=False) == []
  assert not os.path.exists(os.path.join(tmp_path / "fresh", sid, "chunk_00000.jsonl"))
  for bad in ("noon", "2026-13-01T00:00"):
    with pytest.raises(ValueError, match="ISO 8601"):
      ev_config(stop_at=bad).validate()


def test_digest_tells_arrays_apart():
  from dropjax.evaluation.store import digest
  a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
  same = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": jnp.zeros(3)}
  assert digest(a) == digest(same) and len(digest(a)) == 64
  flipped = {**a, "w": a["w"].copy()}
  flipped["w"][1, 2] = np.nextafter(flipped["w"][1, 2], np.float32(10))
  assert digest(flipped) != digest(a)
  assert digest({**a, "w": a["w"].reshape(3, 2)}) != digest(a)  # shape
  assert digest({**a, "w": a["w"].astype(np.float64)}) != digest(a)  # dtype
  assert digest(a["w"], a["b"]) != digest(a["b"], a["w"])  # order


def _keep_rows(out, sid, keep):
  """What experiments/lib.sh save_rows keeps of a setting: gzipped rows and setting.json."""
  import gzip
  os.makedirs(keep, exist_ok=True)
  with open(os.path.join(out, sid, "rows.jsonl"), "rb") as f, \
      gzip.open(os.path.join(keep, sid + ".rows.jsonl.gz"), "wb") as g:
    g.write(f.read())
  shutil.copy(os.path.join(out, sid, "setting.json"), os.path.join(keep, sid + ".setting.json"))


def test_kept_rows_extend_to_more_examples_as_one_run(tiny_workdir, tmp_path):
  cfg = ev_config(norm="l2", eps=[0.5], num_examples=40)
  a, b, keep = (str(tmp_path / n) for n in ("a", "b", "keep"))
  [whole] = evaluation.evaluate(tiny_workdir, cfg, a, progress=False)
  sid = whole["setting"]
  first = str(tmp_path / "first")
  evaluation.evaluate(tiny_workdir, ev_config(norm="l2", eps=[0.5], num_examples=32), first,
                      progress=False)
  _keep_rows(first, sid, keep)
  # The kept rows fill chunks 0 and 1; only chunk 2 is left to compute.
  more = ev_config(norm="l2", eps=[0.5], num_examples=40, rows_from=keep)
  assert evaluation.evaluate(tiny_workdir, more, b, stop_after_chunks=0, progress=False) == []
  assert sorted(os.listdir(os.path.join(b, sid))) == ["chunk_00000.jsonl", "chunk_00001.jsonl",
                                                     "setting.json"]
  [extended] = evaluation.evaluate(tiny_workdir, more, b, progress=False)
  assert (pathlib.Path(a, sid, "rows.jsonl").read_text()
          == pathlib.Path(b, sid, "rows.jsonl").read_text())
  assert extended["robust_accuracy_avg"] == whole["robust_accuracy_avg"]
  # Rows kept under another configuration are refused, not mixed in.
  with pytest.raises(ValueError, match="seed: 0 kept, 1 now"):
    evaluation.evaluate(tiny_workdir, ev_config(norm="l2", eps=[0.5], seed=1, rows_from=keep),
                        str(tmp_path / "c"), progress=False)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    evaluation.evaluate(tiny_workdir, ev_config(rows_from=str(tmp_path / "nope")),
                        str(tmp_path / "d"), progress=False)


def test_lib_sh_save_rows_keeps_a_running_settings_chunks(tiny_workdir, tmp_path, monkeypatch):
  """experiments/lib.sh save_rows on a setting stopped after one chunk keeps that
  chunk and the thresholds it was decided with; --rows_from then resumes it to the
  uninterrupted run's rows, with those thresholds, calibrating nothing."""
  import subprocess
  from dropjax.evaluation import protocol, store
  cfg = ev_config(norm="l2", eps=[0.5], num_examples=40)
  a, part, keep, b = (str(tmp_path / n) for n in ("a", "part", "keep", "b"))
  [whole] = evaluation.evaluate(tiny_workdir, cfg, a, progress=False)
  sid = whole["setting"]
  assert evaluation.evaluate(tiny_workdir, cfg, part, stop_after_chunks=1, progress=False) == []
  assert not os.path.exists(os.path.join(part, sid, "rows.jsonl"))
  lib = os.path.join(ROOT, "experiments", "lib.sh")
  save = ["bash", "-c", f'source "{lib}" && save_rows "{part}" "{keep}"']
  subprocess.run(save, check=True, cwd=ROOT)
  rows_dir = os.path.join(keep, "rows")
  assert sorted(os.listdir(rows_dir)) == sorted([sid + ".rows.jsonl.gz", sid + ".setting.json",
                                                 sid + ".timing.jsonl", store.CALIBRATION_FILE])
  assert (pathlib.Path(rows_dir, sid + ".timing.jsonl").read_text()
          == pathlib.Path(part, sid, store.TIMING_FILE).read_text())
  kept_cal = pathlib.Path(rows_dir, store.CALIBRATION_FILE).read_text()
  assert kept_cal == pathlib.Path(part, store.CALIBRATION_FILE).read_text()
  # Saving again adds nothing; entries already kept are not replaced by another run's.
  other = str(tmp_path / "other")
  os.makedirs(other)
  entry = json.loads(kept_cal)
  pathlib.Path(other, store.CALIBRATION_FILE).write_text(
      json.dumps({**entry, "calibration": {**entry["calibration"], "avg": -1.0}}) + "\n"
      + json.dumps({**entry, "key": {**entry["key"], "drop_rate": 0.25}}) + "\n")
  subprocess.run(save, check=True, cwd=ROOT)
  subprocess.run(["bash", "-c", f'source "{lib}" && save_rows "{other}" "{keep}"'], check=True,
                 cwd=ROOT)
  kept = files.read_jsonl(os.path.join(rows_dir, store.CALIBRATION_FILE))
  assert kept[0] == entry and [e["key"]["drop_rate"] for e in kept] == [
      entry["key"]["drop_rate"], 0.25]
  # Another machine resumes with the kept thresholds: no calibration pass.
  monkeypatch.setattr(protocol, "calibrate", lambda *a, **k: pytest.fail("recalibrated"))
  resumed = ev_config(norm="l2", eps=[0.5], num_examples=40, rows_from=rows_dir)
  assert evaluation.evaluate(tiny_workdir, resumed, b, stop_after_chunks=0, progress=False) == []
  assert os.path.exists(os.path.join(b, sid, "chunk_00000.jsonl"))  # taken up, not recomputed
  # ... with its time, which --stop_at's estimate on this machine reads.
  [kept_time] = [e["seconds"] for e in files.read_jsonl(os.path.join(rows_dir,
                                                                     sid + ".timing.jsonl"))]
  assert store.SettingStore(b, sid).chunk_seconds() == [kept_time]
  [extended] = evaluation.evaluate(tiny_workdir, resumed, b, progress=False)
  assert (pathlib.Path(a, sid, "rows.jsonl").read_text()
          == pathlib.Path(b, sid, "rows.jsonl").read_text())
  assert extended["threshold_avg"] == entry["calibration"]["avg"] == whole["threshold_avg"]
  # Saved again: the chunks timed in b join the kept time of chunk 0, in chunk order.
  subprocess.run(["bash", "-c", f'source "{lib}" && save_rows "{b}" "{keep}"'], check=True,
                 cwd=ROOT)
  timed = files.read_jsonl(os.path.join(rows_dir, sid + ".timing.jsonl"))
  assert [t["chunk"] for t in timed] == [0, 1, 2] and timed[0]["seconds"] == kept_time


def test_keep_rows_never_loses_kept_rows(tmp_path, capsys):
  """store.keep_rows (experiments/lib.sh save_rows): a running setting keeps its chunks
  up to the first missing one; kept rows are not replaced by fewer rows nor by rows of
  another configuration, and equal rows are not rewritten."""
  import gzip
  from dropjax.evaluation import store
  out, kept = str(tmp_path / "out"), str(tmp_path / "kept")
  rows = [{"index": i, "correct": i % 2 == 0} for i in range(6)]
  s = store.SettingStore(out, "s", {"seed": 0})
  s.write_chunk(0, rows[:2])
  s.write_chunk(2, rows[4:])  # chunk 1 missing: chunk 2 is not kept yet
  assert store.keep_rows(out, kept) == ["s"]
  assert files.read_jsonl(os.path.join(kept, "s.rows.jsonl.gz")) == rows[:2]
  assert json.loads(pathlib.Path(kept, "s.setting.json").read_text()) == {"seed": 0}
  assert store.committed_rows(kept, "s") == (rows[:2], {"seed": 0})
  s.write_chunk(1, rows[2:4])
  assert store.keep_rows(out, kept) == ["s"]
  assert files.read_jsonl(os.path.join(kept, "s.rows.jsonl.gz")) == rows
  stamp = os.stat(os.path.join(kept, "s.rows.jsonl.gz")).st_mtime_ns
  assert store.keep_rows(out, kept) == []  # equal rows: not rewritten
  assert os.stat(os.path.join(kept, "s.rows.jsonl.gz")).st_mtime_ns == stamp
  # A shorter run of the same setting does not shorten the kept rows ...
  short = str(tmp_path / "short")
  store.SettingStore(short, "s", {"seed": 0}).write_chunk(0, rows[:2])
  assert store.keep_rows(short, kept) == []
  assert "holds 2 rows" in capsys.readouterr().err
  # ... nor does another configuration replace them.
  other = str(tmp_path / "other")
  store.SettingStore(other, "s", {"seed": 1}).write_chunk(0, rows + rows)
  assert store.keep_rows(other, kept) == []
  assert "seed: 0 kept, 1 here" in capsys.readouterr().err
  with gzip.open(os.path.join(kept, "s.rows.jsonl.gz"), "rt") as f:
    assert [json.loads(l) for l in f] == rows
  assert store.keep_rows(str(tmp_path / "missing"), kept) == []


def test_model_digest_is_checked_only_where_both_sides_hold_it(tmp_path, capsys):
  """The model's digest in setting.json: another model's rows are refused on resume
  and on import; a directory or kept rows from before the digest was recorded are
  taken as the model's (and the directory adopts the digest); keep_rows never drops
  a kept digest."""
  from dropjax.evaluation import store
  m = store.MODEL_FIELD
  out = str(tmp_path / "out")
  store.SettingStore(out, "s", {"seed": 0, m: "a"})
  with pytest.raises(ValueError, match="another model"):
    store.SettingStore(out, "s", {"seed": 0, m: "b"})
  old = str(tmp_path / "old")
  store.SettingStore(old, "s", {"seed": 0})
  store.SettingStore(old, "s", {"seed": 0, m: "a"})
  assert store.SettingStore.saved_config(old, "s") == {"seed": 0, m: "a"}
  with pytest.raises(ValueError, match="another model"):
    store.SettingStore(old, "s", {"seed": 0, m: "b"})
  rows = [{"index": i} for i in range(4)]
  fresh = store.SettingStore(str(tmp_path / "fresh"), "s", {"seed": 0, m: "a"})
  with pytest.raises(ValueError, match="not imported"):
    fresh.import_rows(rows, 2, {"seed": 0, m: "b"})
  assert fresh.import_rows(rows, 2, {"seed": 0}) == 2
  # Kept rows with a digest, extended in a directory that never recorded one.
  kept = str(tmp_path / "kept")
  store.SettingStore(str(tmp_path / "k"), "s", {"seed": 0, m: "a"}).write_chunk(0, rows[:2])
  assert store.keep_rows(str(tmp_path / "k"), kept) == ["s"]
  legacy = str(tmp_path / "legacy")
  s = store.SettingStore(legacy, "s", {"seed": 0})
  s.write_chunk(0, rows[:2])
  s.write_chunk(1, rows[2:])
  assert store.keep_rows(legacy, kept) == ["s"]
  assert store.committed_rows(kept, "s") == (rows, {"seed": 0, m: "a"})
  assert capsys.readouterr().err == ""


def test_rows_of_another_model_are_refused(tiny_workdir, tmp_path, monkeypatch):
  """Evaluation rows record the model's digest (setting.json and summary row, with
  its weight decay); the same settings on other variables neither resume those rows
  nor take them up from --rows_from."""
  from dropjax.config import TrainConfig
  from dropjax.evaluation import protocol, store
  cfg = ev_config(norm="none", num_examples=16)
  out, keep = str(tmp_path / "a"), str(tmp_path / "keep")
  [summary] = evaluation.evaluate(tiny_workdir, cfg, out, progress=False)
  _, variables, _, _ = protocol.load_model(tiny_workdir)
  assert summary["model_digest"] == store.digest(variables)
  assert store.SettingStore.saved_config(out, summary["setting"])["model_digest"] \
      == summary["model_digest"]
  assert summary["train_weight_decay"] == TrainConfig.weight_decay
  assert store.keep_rows(out, keep) == [summary["setting"]]
  monkeypatch.setattr(protocol, "load_model", another_model(protocol.load_model))
  with pytest.raises(ValueError, match="another model"):
    evaluation.evaluate(tiny_workdir, cfg, out, progress=False)
  with pytest.raises(ValueError, match="another model"):
    evaluation.evaluate(tiny_workdir, dataclasses.replace(cfg, rows_from=keep),
                        str(tmp_path / "b"), progress=False)


# A defense and attacks that read their answer off the image, for the cascade: pixel (1, 1)
# holds the undefended model's class, pixel (2, 2) the masked models' class, pixel (0, 0)
# which attack breaks the example (code 3: attack 0 breaks only the undefended model).
C = 4


def _class_of(x, i):
  return jnp.clip(jnp.round((x[:, i, i, 0] + 1) * (C - 1) / 2), 0, C - 1).astype(jnp.int32)


def _level(c):
  return jnp.asarray(c, jnp.float32) * 2 / (C - 1) - 1


def _fake_defend(key, variables, x):
  del key, variables
  return {"plain": jax.nn.one_hot(_class_of(x, 1), C),
          "single": jax.nn.one_hot(_class_of(x, 2), C),
          "avg": jax.nn.one_hot(_class_of(x, 2), C)}


def _fake_attack(k, seen):
  def run(key, variables, x, y, target):
    del key, variables, target
    code = _class_of(x, 0)
    seen.append(np.asarray(code))
    wrong = _level((y + 1) % C)[:, None, None]
    hit = (code == k)[:, None, None]
    x = x.at[:, 1, 1, 0].set(jnp.where(hit[:, 0, 0] | ((k == 0) & (code == 3)), wrong[:, 0, 0],
                                       x[:, 1, 1, 0]))
    return x.at[:, 2, 2, 0].set(jnp.where(hit[:, 0, 0], wrong[:, 0, 0], x[:, 2, 2, 0]))
  return run


def _fake_batch(code):
  n = len(code)
  y = (np.arange(n) * 7) % C
  image = np.zeros((n, 4, 4, 1), np.uint8)
  to_u8 = lambda c: np.round(np.asarray(c) * 255 / (C - 1)).astype(np.uint8)
  image[:, 0, 0, 0], image[:, 1, 1, 0], image[:, 2, 2, 0] = to_u8(code), to_u8(y), to_u8(y)
  return {"image": image, "label": y.astype(np.int32), "index": np.arange(n, dtype=np.int32)}


def _run_chunk(code, cascade_batch):
  seen, scored = {k: [] for k in range(3)}, []
  attacks = [evaluation.chunk.Attack(f"a{k}", _fake_attack(k, seen[k])) for k in range(3)]
  defend = lambda key, v, x: scored.append(len(x)) or _fake_defend(key, v, x)
  cols = evaluation.evaluate_chunk(KEY, defend, attacks, None, _fake_batch(code),
                                   {"single": 0.5, "avg": 0.5}, score_draws=2,
                                   cascade_batch=cascade_batch)
  return cols, {k: np.concatenate(v) for k, v in seen.items()}, scored


def test_cascade_attacks_only_what_is_left_and_keeps_the_full_worst_case():
  code = np.array([0] * 7 + [1, 1, 2, 3, 3])
  full, full_seen, full_scored = _run_chunk(code, None)
  cascade, seen, scored = _run_chunk(code, 2)
  # Attack 0 breaks code 0 everywhere; code 3 only undefended, so it stays in the cascade.
  assert sorted(set(seen[1])) == [1, 2, 3] and len(seen[1]) == 6  # 5 left, 2 per call
  assert sorted(set(seen[2])) == [2, 3] and len(seen[2]) == 4      # 3 left
  assert len(full_seen[2]) == 12
  # Scored: the clean batch, then 2 draws of each attack's outputs; in the cascade the
  # later attacks' only where they ran.
  assert full_scored == [12] * 7
  assert scored == [12] * 3 + [2] * (2 * 3 + 2 * 2)
  np.testing.assert_array_equal(cascade["adv_attacks_run"], np.array([1, 2, 3, 3])[code])
  np.testing.assert_array_equal(full["adv_attacks_run"], np.full(12, 3))
  for col, v in full.items():  # the same worst case, winners, draws and decisions
    if not col.startswith("norm_") and col != "adv_attacks_run":
      np.testing.assert_array_equal(cascade[col], v, err_msg=col)
  assert list(cascade["adv_attack_avg"][code == 1]) == ["a1"] * 2
  assert not cascade["adv_broken_avg"][code == 3].any()
  assert cascade["adv_broken_plain"][code == 3].all()
  # Where the padded calls would cover the whole chunk (11 left, calls of 4), the
  # attack runs on all of it; then on the 8 left, in two calls.
  code = np.array([0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
  half, seen, _ = _run_chunk(code, 4)
  assert len(seen[1]) == 12 and sorted(set(seen[2])) == [2, 3] and len(seen[2]) == 8
  np.testing.assert_array_equal(half["adv_attacks_run"], np.array([2, 2, 3, 3])[code])
  full, _, _ = _run_chunk(code, None)
  for col in ("adv_attack_avg", "adv_broken_avg", "adv_broken_plain", "adv_pred_avg"):
    np.testing.assert_array_equal(half[col], full[col], err_msg=col)


def test_cascade_on_a_trained_model_attacks_what_is_left_in_padded_calls(tiny_workdir):
  """Real jitted attacks on a trained model (no rejection, so the clean errors and more
  are broken everywhere by the first attack): the rest run in padded calls of 4."""
  from dropjax import backend as backend_lib
  cfg = ev_config(losses=("ce", "cw"), modes=("untargeted", "targeted"), eps=[0.5])
  _, variables, logits_fn, data = evaluation.load_model(tiny_workdir)
  drop = DropSpec.fixed(0.5)
  attacks = [evaluation.chunk.Attack(n, evaluation.chunk.compile_attack(
      logits_fn, c, backend_lib.resolve()), rank)
             for n, c, rank in evaluation.attack_configs(cfg, "gtsrb", 0.5, drop)]
  defend = evaluation.make_defense_fn(logits_fn, drop, 3)
  batch = {"image": data.test.x[:16], "label": data.test.y[:16],
           "index": np.arange(16, dtype=np.int32)}
  no_rejection = {"single": np.inf, "avg": np.inf}
  run = lambda: evaluation.evaluate_chunk(KEY, defend, attacks, variables, batch, no_rejection,
                                          score_draws=2, cascade_batch=4)
  cols = run()
  n_run = cols["adv_attacks_run"]
  assert (n_run == 1).any() and (n_run > 1).any()
  everywhere = np.all([cols[f"adv_broken_{m}"].all(1) for m in evaluation.worst_case.METRICS], 0)
  assert everywhere[n_run < 4].all()
  again = run()
  for col, v in cols.items():
    np.testing.assert_array_equal(again[col], v, err_msg=col)


def test_cascade_rows_resume_and_old_rows_continue_without_it(tiny_workdir, tmp_path):
  cfg = ev_config(losses=("ce", "cw"), modes=("untargeted", "targeted"), eps=[0.5],
                  num_examples=40, cascade_batch=4)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  [summary] = evaluation.evaluate(tiny_workdir, cfg, a, progress=False)
  sid = summary["setting"]
  assert summary["cascade"] is True
  assert json.loads(pathlib.Path(a, sid, "setting.json").read_text())["cascade"] is True
  rows = files.read_jsonl(os.path.join(a, sid, "rows.jsonl"))
  run = np.array([r["adv_attacks_run"] for r in rows])
  assert summary["attacks_run_per_example"] == pytest.approx(run.mean())
  for r in rows:  # an example left out of an attack was broken everywhere before it
    if r["adv_attacks_run"] < 4:
      assert all(all(r[f"adv_broken_{m}"]) for m in evaluation.worst_case.METRICS)
  assert evaluation.evaluate(tiny_workdir, cfg, b, stop_after_chunks=1, progress=False) == []
  evaluation.evaluate(tiny_workdir, cfg, b, progress=False)
  assert (pathlib.Path(a, sid, "rows.jsonl").read_text()
          == pathlib.Path(b, sid, "rows.jsonl").read_text())
  # Rows begun without the cascade (setting.json without the field, as before it
  # existed) continue without it under auto, and are refused under true.
  keep, c = str(tmp_path / "keep"), str(tmp_path / "c")
  off = dataclasses.replace(cfg, cascade="false", num_examples=32)
  [first] = evaluation.evaluate(tiny_workdir, off, str(tmp_path / "off"), progress=False)
  assert first["cascade"] is False and "cascade" not in json.loads(
      pathlib.Path(tmp_path, "off", sid, "setting.json").read_text())
  _keep_rows(str(tmp_path / "off"), sid, keep)
  more = dataclasses.replace(cfg, rows_from=keep)
  [extended] = evaluation.evaluate(tiny_workdir, more, c, progress=False)
  assert extended["cascade"] is False and extended["num_examples"] == 40
  with pytest.raises(ValueError, match="cascade"):
    evaluation.evaluate(tiny_workdir, dataclasses.replace(more, cascade="true"),
                        str(tmp_path / "d"), progress=False)
  for bad in (dict(cascade="maybe"), dict(cascade_batch=0)):
    with pytest.raises(ValueError):
      ev_config(**bad).validate()


def test_import_rows_refuses_rows_out_of_order(tmp_path):
  from dropjax.evaluation.store import SettingStore
  store = SettingStore(str(tmp_path), "s", {"a": 1})
  with pytest.raises(ValueError, match="a: 2 kept, 1 now"):
    store.import_rows([{"index": 0}], 1, {"a": 2})
  with pytest.raises(ValueError, match="test-set order"):
    store.import_rows([{"index": 1}, {"index": 0}], 2, None)
  assert store.import_rows([{"index": i} for i in range(5)], 2, {"a": 1}) == 2
  assert not store.has_chunk(2)  # the partial chunk is recomputed, not imported


def test_sweep_over_drop_rates_and_eps(tiny_workdir, tmp_path):
  out = str(tmp_path / "ev")
  rows = evaluation.evaluate(tiny_workdir, ev_config(norm="none", drop_rates=[0.0, 0.9],
                                                     num_examples=16), out, progress=False)
  assert [r["drop_rate"] for r in rows] == [0.0, 0.9]
  # r = 0: the single mask and the average are the plain model.
  assert rows[0]["clean_accuracy_avg"] == rows[0]["clean_accuracy_plain"]
  rows = evaluation.evaluate(tiny_workdir, ev_config(eps=[0.0, 0.2], num_examples=16,
                                                     losses=("ce", "cw")),
                             out, progress=False)
  assert "literal" in rows[0]["setting"]
  assert rows[0]["max_perturbation_linf"] == 0.0
  assert rows[1]["max_perturbation_linf"] <= 0.2 + 1e-6
  assert len(pathlib.Path(out, "summary.jsonl").read_text().splitlines()) == 4


def run_eval(*args, capsys=None):
  """Runs evaluate.py's main() in this process (shares the compile cache)."""
  sys.path.insert(0, ROOT)
  try:
    import evaluate
  finally:
    sys.path.remove(ROOT)
  return evaluate.main(list(args))


@pytest.mark.parametrize("norm", ["linf", "l2", "l0"])
def test_evaluate_cli_end_to_end(tiny_workdir, tmp_path, norm, capsys):
  rc = run_eval("--workdir", tiny_workdir, "--out", str(tmp_path), "--norm", norm,
                 "--num_examples", "16", "--batch_size", "16", "--steps", "2",
                 "--eot_samples", "2", "--num_masks", "2", "--losses", "ce",
                 "--modes", "untargeted", "--score_draws", "1", "--no_progress")
  out = capsys.readouterr()
  assert rc == 0, out.err[-2000:]
  [row] = files.read_jsonl(str(tmp_path / "summary.jsonl"))
  assert row["norm"] == norm and row["num_examples"] == 16
  if norm == "l0":
    assert row["max_perturbation_l0"] <= 30  # 0.03 * 32 * 32 pixels
  assert "robust_accuracy_avg" in out.out


# What a failed orbax restore leaves behind (read coroutines the garbage collector
# later reports as unraisable exceptions, in whichever test runs then) dies with
# its own process.
WRONG_ARCHITECTURE = """
import json, os, shutil, sys
import jax
from dropjax import evaluation
from dropjax.training import checkpoint as ckpt_lib, state as state_lib
workdir, bad = sys.argv[1:]
shutil.copytree(workdir, bad)
with open(os.path.join(bad, "config.json")) as f:
  cfg = json.load(f)
cfg["depth"] = 14
with open(os.path.join(bad, "config.json"), "w") as f:
  json.dump(cfg, f)
errors = []
try:
  evaluation.load_model(bad)
except ckpt_lib.CheckpointError as e:
  errors.append(str(e))
# A 10-class head for the 43-class checkpoint: the restore names the step directory.
train_cfg = ckpt_lib.load_config(workdir)
template = state_lib.create_state(jax.random.PRNGKey(0), state_lib.make_model(train_cfg, 10),
                                  state_lib.make_optimizer(train_cfg, 1), (32, 32, 3))
ckpt = ckpt_lib.Checkpointer(workdir)
try:
  ckpt.restore(template)
except ckpt_lib.CheckpointError as e:
  errors.append(str(e))
ckpt.close()
print(json.dumps(errors))
"""


def test_missing_workdir_and_wrong_architecture(tiny_workdir, tmp_path, capsys):
  import subprocess
  assert run_eval("--workdir", str(tmp_path / "nope")) == 2
  assert "does not exist" in capsys.readouterr().err
  done = subprocess.run([sys.executable, "-c", WRONG_ARCHITECTURE, tiny_workdir,
                         str(tmp_path / "bad")], capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  wrong_depth, wrong_head = json.loads(done.stdout.strip().splitlines()[-1])
  assert "could not be restored" in wrong_depth and "bad" in wrong_depth
  assert os.path.join(tiny_workdir, "checkpoints", "") in wrong_head


def test_bad_eval_config():
  for kw, msg in [(dict(norm="l1"), "unknown norm"), (dict(steps=0), "steps"),
                  (dict(drop_rates=[1.5]), "drop rates")]:
    with pytest.raises(ValueError, match=msg):
      evaluation.EvalConfig(**kw).validate()


def test_plots_render_from_rows(tmp_path, monkeypatch):
  from dropjax import plots
  drawn, save = {}, plots.save_figure

  def capture(fig, out_dir, name):  # what each figure draws, read before it is saved
    drawn[name] = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata()))
                   for ax in fig.axes for l in ax.lines}
    return save(fig, out_dir, name)

  monkeypatch.setattr(plots, "save_figure", capture)
  rows = []
  for norm in ("none", "linf"):
    for r in (0.0, 0.5, 0.9):
      row = {"setting": f"{norm}_{r}", "dataset": "gtsrb", "depth": 20, "train_drop": "random",
             "train_drop_rate": 0.9, "norm": norm, "eps": 0.1, "drop_rate": r,
             "clean_accuracy_avg": 0.9 - r / 2, "clean_accuracy_single": 0.85 - r / 2,
             "num_examples": 1000 if r == 0 else 500}
      if norm != "none":
        row.update(robust_accuracy_avg=r / 2, robust_accuracy_avg_with_rejection=r / 1.5,
                   adv_rejection_rate_avg=0.1)
      rows.append(row)
  # Another attack at r = 0.5 is its own line, not a replacement of the default's point.
  rows.append({**rows[-2], "setting": "linf_0.5_eot1", "variant": "eot1", "num_examples": 100,
               "robust_accuracy_avg": 0.7, "robust_accuracy_avg_with_rejection": 0.8})
  # So is the doubled budget reading at r = 0.9 (same stated eps, twice the budget).
  rows.append({**rows[-2], "setting": "linf_0.9_doubled", "budget_reading": "doubled",
               "robust_accuracy_avg": 0.05, "robust_accuracy_avg_with_rejection": 0.15})
  # Worst cases over attack families (dropjax.evaluation.combine) are one line across r
  # whichever families each combines; one that left a family out is another line.
  for r, families, score in ((0.5, "worst of 2: pgd (paper), apgd", 0.2),
                             (0.9, "worst of 3: pgd (paper), apgd, rejection", 0.3)):
    [same_r] = [x for x in rows[:6] if x["norm"] == "linf" and x["drop_rate"] == r]
    worst = {**same_r, "setting": f"linf_{r}_worst", "variant": families,
             "combined_from": ["..."], "robust_accuracy_avg": score,
             "robust_accuracy_avg_with_rejection": score + 0.1}
    rows.append(worst)
  rows.append({**worst, "setting": "linf_0.9_worst-without-sparse_rs", "robust_accuracy_avg": 0.4})
  (tmp_path / "ev").mkdir()
  with open(tmp_path / "ev" / "summary.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  assert plots.main([str(tmp_path / "ev"), "--out", str(tmp_path / "fig")]) == 0
  from PIL import Image
  for name in ("clean_vs_drop_rate", "robust_vs_drop_rate_linf"):
    with Image.open(tmp_path / "fig" / f"{name}.png") as img:
      assert img.size[0] > 300 and img.size[1] > 200
    assert (tmp_path / "fig" / f"{name}.svg").stat().st_size > 1000
  name = "gtsrb ResNet-20 (random r)"
  rates = [0.0, 0.5, 0.9]
  assert drawn["clean_vs_drop_rate"][f"{name}, avg"] == (rates, [0.9 - r / 2 for r in rates])
  assert drawn["clean_vs_drop_rate"][f"{name}, 1 mask"] == (rates, [0.85 - r / 2 for r in rates])
  robust = drawn["robust_vs_drop_rate_linf"]  # each line says how many examples it rests on
  assert robust[f"{name} (n=500-1000)"] == (rates, [r / 2 for r in rates])
  assert robust[f"{name} (n=500-1000), with rejection"] == (rates, [r / 1.5 for r in rates])
  assert robust[f"{name} [eot1] (n=100)"] == ([0.5], [0.7])
  assert robust[f"{name}, doubled budget (n=500)"] == ([0.9], [0.05])
  assert robust[f"{name} [worst case per example] (n=500)"] == ([0.5, 0.9], [0.2, 0.3])
  assert robust[f"{name} [worst case per example, without sparse_rs] (n=500)"] == ([0.9], [0.4])
  assert len([k for k in robust if not k.startswith("_")]) == 2 * 5  # and with rejection
  # Rendered again from the same rows: the same bytes (no date, no random ids).
  first = {n: (tmp_path / "fig" / n).read_bytes() for n in os.listdir(tmp_path / "fig")}
  assert plots.main([str(tmp_path / "ev"), "--out", str(tmp_path / "fig2")]) == 0
  assert {n: (tmp_path / "fig2" / n).read_bytes() for n in os.listdir(tmp_path / "fig2")} == first
  table = (tmp_path / "fig" / "table.md").read_text()
  assert table.count("\n") == 2 + 8 and "| linf |" in table and f"| {name} [eot1] |" in table
  assert f"| {name} [worst of 3: pgd (paper), apgd, rejection] |" in table  # rows name them
  assert "| 0.5 | 0.650 | 0.250 | 0.333 | 0.100 |" in table  # r = 0.5, read from its row
  assert plots.main([str(tmp_path / "missing"), "--out", str(tmp_path / "fig")]) == 2


def test_apgd_evaluation_rows(tiny_workdir, tmp_path):
  cfg = ev_config(attack="apgd", losses=("dlr",), modes=("untargeted", "targeted"), steps=5,
                  num_examples=16, eps=[0.2])
  [summary] = evaluation.evaluate(tiny_workdir, cfg, str(tmp_path), progress=False)
  assert summary["attacks"] == ["apgd-dlr-untargeted", "apgd-dlr-targeted-top1"]
  assert summary["attack"] == "apgd" and summary["max_perturbation_linf"] <= 0.2 + 1e-6
  with pytest.raises(ValueError, match="use --attack pgd for l0"):
    ev_config(attack="apgd", norm="l0").validate()


def test_sparse_rs_evaluation_rows(tiny_workdir, tmp_path):
  cfg = ev_config(attack="sparse_rs", norm="l0", eps=[0.01], queries=20, modes=("untargeted",),
                  losses=None,
                  num_examples=16)
  [summary] = evaluation.evaluate(tiny_workdir, cfg, str(tmp_path), progress=False)
  assert summary["attacks"] == ["sparse_rs-margin-untargeted"]
  assert summary["max_perturbation_l0"] <= 10  # 0.01 * 1024 pixels
  assert (summary["comparison"], summary["query_draws"]) == ("fresh", 1)
  [paired] = evaluation.evaluate(
      tiny_workdir, dataclasses.replace(cfg, comparison="paired", query_draws=2,
                                        num_examples=4), str(tmp_path), progress=False)
  assert (paired["comparison"], paired["query_draws"]) == ("paired", 2)
  assert paired["setting"] != summary["setting"]
  with pytest.raises(ValueError, match="use --norm l0"):
    ev_config(attack="sparse_rs", norm="linf", losses=None).validate()


def test_sanity_report(tiny_workdir, tmp_path, capsys, norm="linf"):
  args = ["--workdir", tiny_workdir, "--out", str(tmp_path), "--norm", norm, "--sanity",
          "--sanity_examples", "8", "--batch_size", "8", "--steps", "2", "--eot_samples", "2",
          "--num_masks", "2", "--queries", "5", "--no_progress"]
  rc = run_eval(*args)
  printed = capsys.readouterr().out
  checks = files.read_jsonl(str(tmp_path / "sanity" / "checks.jsonl"))
  assert [c["check"] for c in checks] == ["large_budget", "more_steps", "more_eot", "black_box"]
  assert rc == (0 if all(c["pass"] for c in checks) else 1)
  for c in checks:
    assert ("PASS " if c["pass"] else "FAIL ") + c["check"] in printed
  # The large-budget check's number is its evaluation's summary.
  large = files.read_jsonl(str(tmp_path / "sanity" / "large_budget" / "summary.jsonl"))
  assert checks[0]["robust_accuracy"] == large[0]["robust_accuracy_avg"]
  assert checks[0]["pass"] == (large[0]["robust_accuracy_avg"] <= 0.05)
  if norm == "linf":
    curve = files.read_jsonl(str(tmp_path / "sanity" / "loss_curve.jsonl"))
    assert [r["iteration"] for r in curve] == list(range(1, 9))
    best = [r["loss_best_mean"] for r in curve]
    assert all(b2 >= b1 - 1e-6 for b1, b2 in zip(best, best[1:]))


def test_plots_draw_only_the_figures_asked_for(tmp_path):
  from dropjax import plots
  rows = [{"setting": f"{norm}_0.5", "dataset": "gtsrb", "depth": 20, "train_drop": "random",
           "train_drop_rate": 0.9, "norm": norm, "eps": 0.1, "drop_rate": 0.5,
           "clean_accuracy_avg": 0.9, "clean_accuracy_single": 0.8, "robust_accuracy_avg": 0.3,
           "robust_accuracy_avg_with_rejection": 0.4, "adv_rejection_rate_avg": 0.1}
          for norm in ("none", "linf")]
  (tmp_path / "ev").mkdir()
  (tmp_path / "ev" / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert plots.main([str(tmp_path / "ev"), "--out", str(tmp_path / "a"), "--figures", "clean"]) == 0
  assert sorted(os.listdir(tmp_path / "a")) == ["clean_vs_drop_rate.png", "clean_vs_drop_rate.svg"]
  assert plots.main([str(tmp_path / "ev"), "--out", str(tmp_path / "b")]) == 0
  assert {"robust_vs_drop_rate_linf.png", "table.md"} <= set(os.listdir(tmp_path / "b"))
  with pytest.raises(ValueError, match="unknown figures"):
    plots.render([str(tmp_path / "ev")], str(tmp_path / "c"), ("clean", "fig9"))


def test_plots_of_no_rows_draw_nothing_and_say_so(tmp_path, capsys):
  """An empty summary file (a resumed run before its first setting finished) gives no
  figure and no header-only table; clean rows alone give Fig. 2 but no table."""
  from dropjax import plots
  (tmp_path / "empty.jsonl").write_text("")
  assert plots.main([str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "a")]) == 0
  assert os.listdir(tmp_path / "a") == []
  assert "nothing to draw" in capsys.readouterr().err
  clean = {"setting": "none_0.5", "dataset": "gtsrb", "depth": 20, "train_drop": "random",
           "train_drop_rate": 0.9, "norm": "none", "eps": 0.0, "drop_rate": 0.5,
           "clean_accuracy_avg": 0.9, "clean_accuracy_single": 0.8}
  (tmp_path / "clean.jsonl").write_text(json.dumps(clean) + "\n")
  assert plots.main([str(tmp_path / "clean.jsonl"), "--out", str(tmp_path / "b")]) == 0
  assert sorted(os.listdir(tmp_path / "b")) == ["clean_vs_drop_rate.png", "clean_vs_drop_rate.svg"]


def test_sanity_report_l0_runs_the_paired_search(tiny_workdir, tmp_path, capsys):
  """L0's black-box check is Sparse-RS with the paired comparison (the stronger search
  against the randomized defense), and says so."""
  test_sanity_report(tiny_workdir, tmp_path, capsys, norm="l0")
  checks = files.read_jsonl(str(tmp_path / "sanity" / "checks.jsonl"))
  [bb] = [c for c in checks if c["check"] == "black_box"]
  assert bb["comparison"] == "paired" and "robust_accuracy_sparse_rs" in bb
  assert [d for d in os.listdir(tmp_path / "sanity" / "black_box")
          if "_sparse_rs_q5_paired" in d]


def test_setting_id_names_a_non_default_attack():
  from dropjax.evaluation.settings import attack_variant
  E = evaluation.EvalConfig
  assert attack_variant(E()) == "" and attack_variant(E(norm="none", steps=3)) == ""
  assert attack_variant(E(attack="apgd", steps=100)) == "apgd_steps100"
  assert attack_variant(E(eot_samples=1)) == "eot1"
  assert attack_variant(E(losses=("rejection",))) == "rejection"
  assert attack_variant(E(losses=("ce",), modes=("untargeted",))) == "ce_untargeted"
  assert attack_variant(E(norm="l0", attack="sparse_rs", steps=5)) == "sparse_rs_q1000"
  paired = E(norm="l0", attack="sparse_rs", queries=500, comparison="paired")
  assert attack_variant(paired) == "sparse_rs_q500_paired"
  assert attack_variant(dataclasses.replace(paired, query_draws=4)) == \
      "sparse_rs_q500_paired_draws4"


def test_comparison_is_recorded_only_when_not_the_authors_rule():
  """Rows computed before --comparison existed keep resuming: the authors' rule is
  not written into the setting's configuration, the paired one is."""
  from dropjax.evaluation.settings import attack_configs, row_config
  E = evaluation.EvalConfig
  fresh = E(norm="l0", attack="sparse_rs")
  assert "comparison" not in row_config(fresh)
  assert row_config(dataclasses.replace(fresh, comparison="paired"))["comparison"] == "paired"
  configs = attack_configs(E(norm="l0", attack="sparse_rs", comparison="paired"), "gtsrb",
                           0.03, DropSpec.fixed(0.5))
  assert configs and all(c.comparison == "paired" for _, c, _ in configs)
  with pytest.raises(ValueError, match="--attack sparse_rs"):
    E(norm="l0", comparison="paired").validate()
  with pytest.raises(ValueError, match="unknown comparison"):
    E(norm="l0", attack="sparse_rs", comparison="best").validate()


def test_query_draws_is_recorded_only_when_not_one_and_reaches_the_attack():
  """Like --comparison: one draw (the authors') is not written into a setting's
  configuration, so the rows computed before --query_draws keep resuming."""
  from dropjax.evaluation.settings import attack_configs, row_config
  E = evaluation.EvalConfig
  one = E(norm="l0", attack="sparse_rs")
  assert "query_draws" not in row_config(one)
  assert row_config(dataclasses.replace(one, query_draws=3))["query_draws"] == 3
  configs = attack_configs(E(norm="l0", attack="sparse_rs", query_draws=3), "gtsrb", 0.03,
                           DropSpec.fixed(0.5))
  assert configs and all(c.draws == 3 for _, c, _ in configs)
  with pytest.raises(ValueError, match="--attack sparse_rs"):
    E(norm="l0", query_draws=2).validate()
  with pytest.raises(ValueError, match="query_draws must be >= 1"):
    E(norm="l0", attack="sparse_rs", query_draws=0).validate()
  assert evaluation.setting_id("linf", 0.1, 0.5, "literal", "eot1") == \
      "linf_eps0.1_literal_r0.5_eot1"


def test_sweep_gets_one_setting_per_value_and_mixed_rows_are_refused(tiny_workdir, tmp_path):
  """An EOT sweep into one --out gives one setting per value; a run whose other
  fields differ from the rows already there stops instead of resuming them."""
  out = str(tmp_path / "ev")
  ids = set()
  for k in (1, 2):
    evaluation.evaluate(tiny_workdir, ev_config(eot_samples=k), out, stop_after_chunks=0,
                        progress=False)
    ids |= {d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))}
  assert len(ids) == 2 and any(i.endswith("_eot1") for i in ids)
  with pytest.raises(ValueError, match="restarts: 1 there, 2 now"):
    evaluation.evaluate(tiny_workdir, ev_config(eot_samples=1, restarts=2), out,
                        stop_after_chunks=0, progress=False)
  # More examples resume the same rows (the config does not include num_examples).
  evaluation.evaluate(tiny_workdir, ev_config(eot_samples=1, num_examples=48), out,
                      stop_after_chunks=0, progress=False)


def test_clean_points_take_the_row_of_most_examples():
  """Fig. 2's point per model and rate comes from the row measured on the most images
  (a 500-image attack family does not replace the 1,000-image clean accuracy)."""
  from dropjax import plots
  base = {"dataset": "gtsrb", "depth": 20, "train_drop": "random", "drop_rate": 0.0}
  rows = [{**base, "num_examples": 1000, "clean_accuracy_avg": 0.978, "setting": "a"},
          {**base, "num_examples": 500, "clean_accuracy_avg": 0.970, "setting": "b"},
          {**base, "num_examples": 1000, "clean_accuracy_avg": 0.978, "setting": "c"},
          {**base, "drop_rate": 0.5, "num_examples": 100, "clean_accuracy_avg": 0.9,
           "setting": "d"}]
  [(name, pts)] = plots.clean_points(rows).items()
  assert name == "gtsrb ResNet-20 (random r)"
  assert pts[0.0]["setting"] == "c" and pts[0.5]["setting"] == "d"


def test_models_of_the_same_description_from_two_workdirs_stay_apart():
  """Two fixed-r models that differ only in what the summary rows do not describe
  (a weight decay, say) are two models in the figures and the table, named by their
  workdirs; rows of one workdir stay one model under its plain name."""
  from dropjax import plots
  base = {"dataset": "gtsrb", "depth": 20, "train_drop": "fixed", "train_drop_rate": 0.9,
          "drop_rate": 0.9, "num_examples": 1000, "norm": "linf", "eps": 0.1,
          "clean_accuracy_avg": 0.9, "robust_accuracy_avg": 0.2,
          "robust_accuracy_avg_with_rejection": 0.3, "adv_rejection_rate_avg": 0.1}
  rows = [{**base, "workdir": "pretrained/a"}, {**base, "workdir": "runs/b",
                                                "clean_accuracy_avg": 0.8}]
  points = plots.clean_points(rows)
  assert sorted(points) == ["gtsrb ResNet-20 (fixed r=0.9) [pretrained/a]",
                            "gtsrb ResNet-20 (fixed r=0.9) [runs/b]"]
  assert [p[0.9]["clean_accuracy_avg"] for _, p in sorted(points.items())] == [0.9, 0.8]
  table = plots.markdown_table(rows)
  assert "[pretrained/a] | linf" in table and "[runs/b] | linf" in table
  assert list(plots.clean_points(rows[:1])) == ["gtsrb ResNet-20 (fixed r=0.9)"]
  # Rows that record the weight decay name one other than the preset's.
  decays = [{**rows[0], "train_weight_decay": 1e-4}, {**rows[1], "train_weight_decay": 5e-4}]
  assert sorted(plots.clean_points(decays)) == [
      "gtsrb ResNet-20 (fixed r=0.9)", "gtsrb ResNet-20 (fixed r=0.9, weight decay 0.0005)"]
