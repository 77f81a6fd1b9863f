"""experiments/lib.sh's helpers (the experiment scripts' shared shell functions)."""
import io
import json
import os
import subprocess
import tarfile

import pytest

LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                   "lib.sh")


def _lib(command: str, cwd: str) -> str:
  return subprocess.run(["bash", "-c", f'source "{LIB}" && {command}'], cwd=cwd, check=True,
                        capture_output=True, text=True).stdout.strip()


def test_training_minutes_sums_the_logged_throughput_not_the_gaps(tmp_path):
  """Two logged intervals: 100 steps x 60 images at 100 img/s = 60 s, then 200 steps
  at 50 img/s = 240 s, plus a validation's 60 s (a row without "seconds", logged
  before validations were timed apart, adds none); a restart's gap does not count."""
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps({"batch_size": 60}))
  rows = [{"kind": "train", "step": 100, "images_per_s": 100.0},
          {"kind": "val", "step": 100, "accuracy_clean": 0.5, "seconds": 60.0},
          {"kind": "val", "step": 200, "accuracy_clean": 0.5},
          {"kind": "train", "step": 300, "images_per_s": 50.0}]
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert _lib(f'training_minutes "{wd}"', os.path.dirname(os.path.dirname(LIB))) == "6"


def test_hardware_line_names_the_cpu_its_vector_width_and_cores(tmp_path):
  line = _lib("hardware_line", str(tmp_path))
  assert ("(AVX-512)" in line) or ("(AVX2)" in line)
  assert line.endswith(f", {len(os.sched_getaffinity(0))} cores")  # nproc: the usable cores


def _lib_env(command: str, cwd: str, **env) -> str:
  return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{LIB}" && {command}'],
                        cwd=cwd, check=True, capture_output=True, text=True,
                        env={**os.environ, **env}).stdout.strip()


def test_stop_at_reaches_the_scripts_evaluations_only_when_set(tmp_path):
  show = 'printf "<%s>" "${stop_at_args[@]}"'
  assert _lib_env(show, str(tmp_path), STOP_AT="2026-12-04T12:05") == \
      "<--stop_at><2026-12-04T12:05>"
  env = {k: v for k, v in os.environ.items() if k != "STOP_AT"}
  out = subprocess.run(["bash", "-c", f'set -euo pipefail; source "{LIB}" && '
                        'echo "n=${#stop_at_args[@]}"'], cwd=str(tmp_path), check=True,
                       capture_output=True, text=True, env=env).stdout.strip()
  assert out == "n=0"


def test_save_summary_keeps_the_kept_rows_when_no_setting_finished(tmp_path):
  """An evaluation stopped by --stop_at before any setting finished leaves no
  summary.jsonl: the kept summary rows stay as they were."""
  root = os.path.dirname(os.path.dirname(LIB))
  kept = tmp_path / "kept.jsonl"
  kept.write_text(json.dumps({"setting": "a", "x": 1}) + "\n")
  (tmp_path / "out").mkdir()
  _lib_env(f'save_summary "{tmp_path / "out"}" "{kept}"', root,
           PYTHONPATH=root)
  assert [json.loads(l) for l in kept.read_text().splitlines()] == [{"setting": "a", "x": 1}]
  (tmp_path / "out" / "summary.jsonl").write_text(json.dumps({"setting": "b", "x": 2}) + "\n")
  _lib_env(f'save_summary "{tmp_path / "out"}" "{kept}"', root, PYTHONPATH=root)
  assert [json.loads(l)["setting"] for l in kept.read_text().splitlines()] == ["a", "b"]


def test_save_summary_writes_no_empty_file_and_plot_summaries_skips_what_is_missing(tmp_path):
  """No setting finished and no kept rows: no summary file appears (an empty one would
  read as a result); plot_summaries draws from the files that exist, and with none
  draws nothing and succeeds, so a script stopped early still ends cleanly."""
  root = os.path.dirname(os.path.dirname(LIB))
  (tmp_path / "out").mkdir()
  kept = tmp_path / "res" / "eval_summary.jsonl"
  (tmp_path / "res").mkdir()
  _lib_env(f'save_summary "{tmp_path / "out"}" "{kept}"', root, PYTHONPATH=root)
  assert not kept.exists()
  res = tmp_path / "res"
  done = subprocess.run(["bash", "-c", f'set -euo pipefail; source "{LIB}"; '
                         f'plot_summaries "{res}" "{res}"/eval_summary*.jsonl'],
                        cwd=root, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": root})
  assert done.returncode == 0 and "nothing drawn" in done.stderr
  assert os.listdir(res) == []
  row = {"setting": "linf_0.5", "dataset": "gtsrb", "depth": 20, "train_drop": "random",
         "train_drop_rate": 0.9, "norm": "linf", "eps": 0.1, "drop_rate": 0.5,
         "clean_accuracy_avg": 0.9, "clean_accuracy_single": 0.8, "robust_accuracy_avg": 0.3,
         "robust_accuracy_avg_with_rejection": 0.4, "adv_rejection_rate_avg": 0.1}
  (tmp_path / "out" / "summary.jsonl").write_text(json.dumps(row) + "\n")
  _lib_env(f'save_summary "{tmp_path / "out"}" "{kept}"', root, PYTHONPATH=root)
  _lib_env(f'plot_summaries "{res}" "{res}"/eval_summary*.jsonl "{res}/absent.jsonl"', root,
           PYTHONPATH=root)
  assert {"eval_summary.jsonl", "table.md", "robust_vs_drop_rate_linf.png"} <= set(
      os.listdir(res))
  assert "clean_vs_drop_rate.png" not in os.listdir(res)  # Fig. 2 is a clean sweep's


def test_save_summary_replaces_a_row_in_place(tmp_path):
  """A re-run leaves the kept file as it was (no reordering); new settings follow."""
  root = os.path.dirname(os.path.dirname(LIB))
  kept = tmp_path / "kept.jsonl"
  kept.write_text(json.dumps({"setting": "a", "x": 1}) + "\n" + json.dumps({"setting": "b", "x": 2})
                  + "\n")
  (tmp_path / "out").mkdir()
  before = kept.read_text()
  (tmp_path / "out" / "summary.jsonl").write_text(
      json.dumps({"setting": "c", "x": 3}) + "\n" + json.dumps({"setting": "a", "x": 1}) + "\n")
  _lib_env(f'save_summary "{tmp_path / "out"}" "{kept}"', root, PYTHONPATH=root)
  assert kept.read_text() == before + json.dumps({"setting": "c", "x": 3}) + "\n"
  from dropjax.evaluation import store  # update_summary: the same, returning the row written
  assert store.update_summary(str(tmp_path), {"setting": "p", "x": 0}) == {"setting": "p", "x": 0}
  store.update_summary(str(tmp_path), {"setting": "q", "x": 0})
  assert store.update_summary(str(tmp_path), {"setting": "p", "x": 5}) == {"setting": "p", "x": 5}
  assert [r["setting"] for r in store.read_summaries([str(tmp_path)])] == ["p", "q"]


@pytest.mark.parametrize("timed", [
    {"attack_seconds_this_run": 400.0, "attack_images_per_s": 2.5},  # evaluate.py
    {"seconds_this_run": 990.0, "images_per_s": 0.1, "forward_passes_per_s": 1100.0}])
def test_save_summary_keeps_the_time_of_the_run_that_computed_the_rows(tmp_path, timed):
  root = os.path.dirname(os.path.dirname(LIB))
  kept = tmp_path / "kept.jsonl"
  kept.write_text("".join(json.dumps(r) + "\n" for r in [
      {"setting": "a", "num_examples": 1000, "robust": 0.1, **timed},
      {"setting": "b", "num_examples": 500, "robust": 0.2, **timed}]))
  (tmp_path / "out").mkdir()
  # a re-run of a (nothing computed: no time) and b extended to 1,000 images elsewhere
  (tmp_path / "out" / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
      {"setting": "a", "num_examples": 1000, "robust": 0.1},
      {"setting": "b", "num_examples": 1000, "robust": 0.3}]))
  _lib_env(f'save_summary "{tmp_path / "out"}" "{kept}"', root, PYTHONPATH=root)
  rows = {r["setting"]: r for r in map(json.loads, kept.read_text().splitlines())}
  assert rows["a"] == {"setting": "a", "num_examples": 1000, "robust": 0.1, **timed}
  assert rows["b"] == {"setting": "b", "num_examples": 1000, "robust": 0.3}  # other rows
  # a run that timed its own chunks reports its own time
  own = {k: v / 2 for k, v in timed.items()}
  (tmp_path / "out" / "summary.jsonl").write_text(json.dumps(
      {"setting": "a", "num_examples": 1000, "robust": 0.1, **own}) + "\n")
  _lib_env(f'save_summary "{tmp_path / "out"}" "{kept}"', root, PYTHONPATH=root)
  rows = {r["setting"]: r for r in map(json.loads, kept.read_text().splitlines())}
  assert rows["a"] == {"setting": "a", "num_examples": 1000, "robust": 0.1, **own}


def test_cpu_queue_starts_no_step_after_stop_at(tmp_path):
  root = os.path.dirname(os.path.dirname(LIB))
  done = subprocess.run(["bash", os.path.join(root, "experiments", "cpu_queue.sh")],
                        cwd=str(tmp_path), capture_output=True, text=True,
                        env={**os.environ, "STOP_AT": "2020-01-01T00:00", "STEPS": "1 2 3 4 5"})
  assert done.returncode == 0 and "steps from 1 on not started" in done.stderr


def test_train_run_passes_the_deadline_and_tells_finished_from_stopped(tmp_path):
  """train_run: the command gets --stop_at STOP_AT; finished=True succeeds,
  finished=False (stopped by the deadline) fails softly, a failing command ends the
  script with its status."""
  fake = tmp_path / "fake_train"
  fake.write_text('#!/usr/bin/env bash\necho "args: $*" >&2\necho "step=3 finished=$FINISHED"\n'
                  'exit "${STATUS:-0}"\n')
  fake.chmod(0o755)
  env = {**os.environ, "STOP_AT": "2099-12-04T12:05"}

  def run(**kw):
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source "{LIB}"; '
         f'if train_run WD "{fake}" --workdir WD; then echo done; else echo stopped; fi'],
        cwd=str(tmp_path), capture_output=True, text=True, env={**env, **kw})

  ok = run(FINISHED="True")
  assert ok.returncode == 0 and ok.stdout.split() == ["step=3", "finished=True", "done"]
  assert "args: --workdir WD --stop_at 2099-12-04T12:05" in ok.stderr
  stopped = run(FINISHED="False")
  assert stopped.returncode == 0 and stopped.stdout.split()[-1] == "stopped"
  assert "WD: stopped before its last step (STOP_AT 2099-12-04T12:05)" in stopped.stderr
  # Too close to STOP_AT: an unfinished run is not started; a finished one still answers.
  soon = subprocess.run(["date", "-d", "+5 min", "-Iseconds"], capture_output=True,
                        text=True, check=True).stdout.strip()
  late = run(FINISHED="True", STOP_AT=soon)
  assert late.returncode == 0 and late.stdout.split() == ["stopped"]
  assert "args:" not in late.stderr and "WD: not started, less than 20 min" in late.stderr
  assert run(FINISHED="True", STOP_AT=soon, TRAIN_MIN_MINUTES="4").stdout.split()[-1] == "done"
  (tmp_path / "WD").mkdir()
  (tmp_path / "WD" / "final_eval.json").write_text("{}")
  assert run(FINISHED="True", STOP_AT=soon).stdout.split()[-1] == "done"
  failed = run(FINISHED="False", STATUS="3")
  assert failed.returncode == 3 and "done" not in failed.stdout and "stopped" not in failed.stdout
  assert "training in WD failed (exit status 3)" in failed.stderr


def test_an_unfinished_training_run_outlives_the_checkout_and_resumes_exactly(
    tiny_data_dir, tmp_path):
  """keep_training copies a stopped run's last checkpoint (in parts of at most
  KEEP_PART_KB KiB), config and metrics out of runs/ (which no new checkout has);
  take_up_training puts them into the new checkout's empty workdir, where the run
  finishes bit for bit as if never stopped; the finished run's copy is removed, a
  workdir with checkpoints of its own is left alone, and a kept run with a part
  missing or damaged (whichever part: the first, a middle or the last) is an error,
  not a fresh start."""
  import jax
  import numpy as np
  from conftest import tiny_config
  from dropjax.training import loop
  root = os.path.dirname(os.path.dirname(LIB))
  env = dict(PYTHONPATH=root, UNFINISHED=str(tmp_path / "kept"), KEEP_PART_KB="8")
  cfg = tiny_config(tiny_data_dir, drop="random", checkpoint_every=2, eval_every_epochs=0)
  straight = loop.train(cfg, str(tmp_path / "a" / "run"), progress=False)
  old, new = tmp_path / "old" / "run", tmp_path / "new" / "run"
  loop.train(cfg, str(old), stop_after_steps=5, progress=False)  # checkpoints 2 and 4
  _lib_env(f'keep_training "{old}"', root, **env)
  kept = tmp_path / "kept" / "run"
  parts = sorted(f for f in os.listdir(kept) if f.startswith("checkpoint.tar.part"))
  assert sorted(os.listdir(kept)) == sorted(
      parts + ["checkpoint.sha256", "config.json", "metrics.jsonl"])
  assert len(parts) > 2 and all(os.path.getsize(kept / f) <= 8 * 1024 for f in parts)
  with tarfile.open(fileobj=io.BytesIO(b"".join((kept / f).read_bytes() for f in parts))) as t:
    assert {n.split("/")[0] for n in t.getnames()} == {"4"}  # the last checkpoint only
  _lib_env(f'take_up_training "{new}"', root, **env)
  resumed = loop.train(cfg, str(new), progress=False)
  assert resumed["finished"] and resumed["step"] == straight["step"]
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(straight["state"]),
                                                  jax.tree.leaves(resumed["state"])))
  # A workdir with checkpoints of its own is not overwritten by a kept copy.
  _lib_env(f'keep_training "{old}"', root, **env)
  before = sorted(os.listdir(new / "checkpoints"))
  _lib_env(f'take_up_training "{new}"', root, **env)
  assert sorted(os.listdir(new / "checkpoints")) == before
  # Finished: its kept copy goes; a workdir without checkpoints keeps nothing.
  _lib_env(f'keep_training "{new}"', root, **env)
  assert not kept.exists()
  _lib_env(f'keep_training "{tmp_path / "none"}"', root, **env)
  assert not (tmp_path / "kept" / "none").exists()
  # A part lost or damaged on the way: an error, and no half-unpacked checkpoint to
  # resume from.
  def lose(part):
    (kept / part).unlink()

  def damage(part):
    data = bytearray((kept / part).read_bytes())
    data[len(data) // 2] ^= 1
    (kept / part).write_bytes(bytes(data))

  broken = tmp_path / "broken" / "run"
  for spoil in (lose, damage):
    for part in (parts[0], parts[1], parts[-1]):
      _lib_env(f'keep_training "{old}"', root, **env)
      spoil(part)
      with pytest.raises(subprocess.CalledProcessError):
        _lib_env(f'take_up_training "{broken}"', root, **env)
      assert not (broken / "checkpoints").exists(), (spoil.__name__, part)
  # The kept copy intact again: taken up.
  _lib_env(f'keep_training "{old}"', root, **env)
  _lib_env(f'take_up_training "{broken}"', root, **env)
  assert sorted(os.listdir(broken / "checkpoints")) == ["4"]
  # A copy kept before the sums were written (no checkpoint.sha256): taken up, unchecked.
  (kept / "checkpoint.sha256").unlink()
  legacy = tmp_path / "legacy" / "run"
  _lib_env(f'take_up_training "{legacy}"', root, **env)
  assert sorted(os.listdir(legacy / "checkpoints")) == ["4"]


def test_evaluate_kept_keeps_summaries_and_rows_that_a_new_out_takes_up(tiny_workdir,
                                                                        tmp_path):
  """evaluate_kept runs evaluate.py into OUT, joins OUT's summaries into RES/SUMMARY and
  keeps its rows in RES/rows, which a later call into an empty OUT takes up instead of
  recomputing (here through ROWS_FROM, which names where to take rows up from in place
  of the call's own RES/rows)."""
  import gzip
  root = os.path.dirname(os.path.dirname(LIB))
  first, second = tmp_path / "first", tmp_path / "second"
  args = (f'--workdir "{tiny_workdir}" --norm none --num_examples 8 --batch_size 4 '
          '--drop_rates 0.5')
  _lib_env(f'evaluate_kept "{tmp_path / "a"}" "{first}" clean.jsonl {args}', root)
  [summary] = [json.loads(line) for line in (first / "clean.jsonl").read_text().splitlines()]
  setting = summary["setting"]
  gz = first / "rows" / f"{setting}.rows.jsonl.gz"
  with gzip.open(gz, "rt") as f:
    kept = [json.loads(line) for line in f]
  assert len(kept) == 8
  with gzip.open(gz, "wt") as f:  # marked, to tell rows taken up from rows computed
    f.writelines(json.dumps({**r, "marked": True}) + "\n" for r in kept)
  # Another RES, whose rows/ is empty, and ROWS_FROM at the first one's: taken up from there.
  _lib_env(f'evaluate_kept "{tmp_path / "b"}" "{second}" clean.jsonl {args}', root,
           ROWS_FROM=str(first / "rows"))
  rows_b = [json.loads(line) for line in (tmp_path / "b" / setting / "rows.jsonl").open()]
  assert rows_b == [{**r, "marked": True} for r in kept]
  assert (second / "rows" / f"{setting}.rows.jsonl.gz").exists()


def test_train_packaged_never_trains_a_packaged_model_and_packages_only_a_finished_run(
    tmp_path):
  """train_packaged: a packaged target runs no training (also with its workdir absent,
  where training would start from step 0); a run the deadline stopped is neither
  packaged nor recorded (status 1); a finished run that cannot be packaged ends the
  script with an error, recording nothing."""
  fake = tmp_path / "fake_train"
  fake.write_text('#!/usr/bin/env bash\necho ran >> "$CALLS"\necho "step=3 finished=$FINISHED"\n')
  fake.chmod(0o755)
  calls = tmp_path / "calls"

  def run(pkg, finished):
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source "{LIB}"; '
         f'if train_packaged WD RES {pkg} "test machine" "{fake}" --workdir WD; '
         'then echo done; else echo "stopped $?"; fi'],
        cwd=str(tmp_path), capture_output=True, text=True,
        env={**os.environ, "CALLS": str(calls), "FINISHED": finished})

  (tmp_path / "PKG").mkdir()
  (tmp_path / "PKG" / "MANIFEST.json").write_text("{}")
  packaged = run("PKG", "True")
  assert packaged.returncode == 0 and packaged.stdout.split() == ["done"]
  assert not calls.exists() and not (tmp_path / "WD").exists()
  stopped = run("NEW", "False")
  assert stopped.returncode == 0 and stopped.stdout.split()[-1] == "1"
  assert calls.read_text().split() == ["ran"]
  assert not (tmp_path / "NEW").exists() and not (tmp_path / "RES").exists()
  # Finished, but WD holds no model (the fake trained nothing): packaging fails.
  broken = run("NEW", "True")
  assert broken.returncode != 0 and "done" not in broken.stdout
  assert "stopped" not in broken.stdout and not (tmp_path / "RES").exists()
