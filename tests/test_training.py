import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dropjax import cli, deadlines, files
from dropjax.config import from_preset, PRESETS, TrainConfig
from dropjax.training import checkpoint as ckpt_lib
from dropjax.training import loop, parallel, state as state_lib, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def make_step(config, axis_name=None, num_classes=4, image_shape=(8, 8, 3)):
  model = state_lib.make_model(config, num_classes, bn_axis_name=axis_name)
  tx = state_lib.make_optimizer(config, steps_per_epoch=10)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, image_shape)
  return state, step_lib.make_train_step(config, model, tx, axis_name=axis_name)


def fixed_batch(n=16, hw=8, seed=0):
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (n, hw, hw, 3)).astype(np.uint8),
          "label": rng.randint(0, 4, n).astype(np.int32),
          "index": np.arange(n, dtype=np.int32)}


def test_loss_decreases_on_fixed_batch():
  cfg = TrainConfig(depth=8, width=8, drop="none", crop_pad=0, hflip=False, lr=0.05)
  state, step = make_step(cfg)
  step = jax.jit(step)
  batch, key = fixed_batch(), jax.random.PRNGKey(1)
  losses = []
  for _ in range(15):
    state, m = step(state, batch, key)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 15


@pytest.mark.parametrize("mode,rate", [("none", 0.0), ("fixed", 0.9), ("fixed", 0.3),
                                       ("random", 0.5)])
def test_drop_modes_change_what_the_model_sees(mode, rate):
  """The model sees zeros at the mode's rate, a fresh mask for every image at
  every step, and each image's mask depends only on (seed, step, its index):
  not on the other images of the batch (so not on how it is split over devices)."""
  cfg = TrainConfig(drop=mode, drop_rate=rate if mode == "fixed" else 0.9, crop_pad=0)
  batch = fixed_batch(n=512, hw=8)
  x, xd, m, _ = step_lib.prepare_inputs(cfg, jax.random.PRNGKey(0), jnp.int32(3), batch)
  zero_frac = float(jnp.mean(xd == 0))
  # random: mean of 512 U[0,1] rates, sd 0.013
  assert abs(zero_frac - rate) < (0.05 if mode == "random" else 0.01)
  if mode == "none":
    np.testing.assert_array_equal(xd, x)
    return
  dropped = np.asarray(m) == 0
  assert np.all(np.asarray(xd)[dropped] == 0)
  np.testing.assert_array_equal(np.asarray(xd)[~dropped], np.asarray(x)[~dropped])
  assert len({np.asarray(m[i]).tobytes() for i in range(16)}) == 16  # per image
  _, _, m_next, _ = step_lib.prepare_inputs(cfg, jax.random.PRNGKey(0), jnp.int32(4), batch)
  assert not np.array_equal(m, m_next)  # per step
  half = {k: v[256:] for k, v in batch.items()}  # same indices, without the first half
  _, _, m_half, _ = step_lib.prepare_inputs(cfg, jax.random.PRNGKey(0), jnp.int32(3), half)
  np.testing.assert_array_equal(m_half, m[256:])
  if mode == "random":  # per-image rates spread over [0, 1]
    per_image = np.asarray(jnp.mean(xd == 0, axis=(1, 2, 3)))
    assert per_image.min() < 0.2 and per_image.max() > 0.8


def test_masks_fresh_every_step_and_independent_of_device_split():
  cfg = TrainConfig(drop="fixed", drop_rate=0.5)
  batch = fixed_batch()
  key = jax.random.PRNGKey(0)
  _, a, _, _ = step_lib.prepare_inputs(cfg, key, jnp.int32(0), batch)
  _, b, _, _ = step_lib.prepare_inputs(cfg, key, jnp.int32(1), batch)
  assert not np.array_equal(a, b)
  half = {k: v[8:] for k, v in batch.items()}  # same example indices -> same draws
  _, c, _, _ = step_lib.prepare_inputs(cfg, key, jnp.int32(0), half)
  np.testing.assert_array_equal(a[8:], c)


def test_jit_mesh_and_pmap_give_the_same_result():
  assert jax.device_count() == 2
  cfg = TrainConfig(depth=8, width=4, drop="fixed", drop_rate=0.5, lr=0.05)
  state, step = make_step(cfg)
  _, pstep = make_step(cfg, axis_name=parallel.PMAP_AXIS)
  jr = parallel.JitRunner(step, 16)
  pr = parallel.PmapRunner(pstep, 16)
  sj, sp = jr.put_state(state), pr.put_state(state)
  key = jax.random.PRNGKey(3)
  for i in range(3):
    batch = fixed_batch(seed=i)
    sj, mj = jr.step(sj, jr.put_batch(batch), key)
    sp, mp = pr.step(sp, pr.put_batch(batch), key)
    np.testing.assert_allclose(mj["loss"], mp["loss"], rtol=1e-5)
  hj, hp = jr.host_state(sj), pr.host_state(sp)
  for a, b in zip(jax.tree.leaves(hj), jax.tree.leaves(hp)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  # The batch really is sharded over both devices.
  arr = jr.put_batch(fixed_batch())["image"]
  assert len({s.device for s in arr.addressable_shards}) == 2


def test_no_recompilation_between_steps():
  cfg = TrainConfig(depth=8, width=4, drop="random")
  state, step = make_step(cfg)
  traces = []

  def counted(*a):
    traces.append(1)
    return step(*a)

  runner = parallel.JitRunner(counted, 16)
  s = runner.put_state(state)
  for i in range(4):
    s, _ = runner.step(s, runner.put_batch(fixed_batch(seed=i)), jax.random.PRNGKey(0))
  assert len(traces) == 1


def test_batch_not_divisible_by_devices_is_an_error():
  cfg = TrainConfig(depth=8, width=4)
  _, step = make_step(cfg)
  with pytest.raises(ValueError, match="not divisible by the 2 devices"):
    parallel.JitRunner(step, 15)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.PmapRunner(step, 15)


def test_dataset_smaller_than_a_batch_is_an_error(tiny_data_dir, tmp_path):
  cfg = tiny_config(tiny_data_dir, batch_size=128)
  with pytest.raises(ValueError, match="fewer than one batch"):
    loop.train(cfg, str(tmp_path / "w"), progress=False)


def test_exact_resume_mid_epoch_and_after_epoch(tiny_data_dir, tmp_path):
  """Straight run == killed-and-resumed runs, bit for bit (data order, RNG, BN)."""
  cfg = tiny_config(tiny_data_dir, drop="random", checkpoint_every=3, eval_every_epochs=0)
  straight = loop.train(cfg, str(tmp_path / "a"), progress=False)
  assert straight["finished"] and straight["step"] == 10  # 80 train / 16 x 2 epochs
  # Killed after 5 steps: the last checkpoint is step 3, steps 4-5 are lost work.
  part = loop.train(cfg, str(tmp_path / "b"), stop_after_steps=5, progress=False)
  assert not part["finished"]
  resumed = loop.train(cfg, str(tmp_path / "b"), progress=False)
  assert resumed["finished"]
  assert tree_equal(straight["state"], resumed["state"])  # bit-identical
  # Metric rows of the resumed run: no duplicates, same steps as straight.
  def steps(d):
    rows = files.read_jsonl(str(tmp_path / d / "metrics.jsonl"))
    return [r["step"] for r in rows if r["kind"] == "train"]
  assert steps("b") == steps("a")
  final = json.loads((tmp_path / "a" / "final_eval.json").read_text())
  assert {"test_accuracy_clean", "test_accuracy_dropped"} <= set(final)
  # A finished run invoked again trains nothing, keeps its recorded test numbers and
  # appends no second test row.
  again = loop.train(cfg, str(tmp_path / "a"), progress=False)
  assert again["finished"] and again["step"] == 10
  assert {k: again[k] for k in final} == final
  assert tree_equal(straight["state"], again["state"])
  rows = files.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  assert [r["kind"] for r in rows].count("test") == 1
  assert json.loads((tmp_path / "a" / "config.json").read_text())["drop"] == "random"
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["10", "6", "9"]
  # 1 epoch (checkpoint at the epoch end) + resume 1 epoch.
  cfg_e = cfg.replace(checkpoint_every=0)
  loop.train(cfg_e, str(tmp_path / "e"), stop_after_steps=5, progress=False)
  resumed_e = loop.train(cfg_e, str(tmp_path / "e"), progress=False)
  assert tree_equal(straight["state"], resumed_e["state"])


def test_stop_request_checkpoints_that_step_and_resumes_exactly(tiny_data_dir, tmp_path):
  """A deadline or a signal (``should_stop``) stops a run mid-epoch with a checkpoint
  of the step just done; resumed, it equals the straight run bit for bit."""
  cfg = tiny_config(tiny_data_dir, drop="random", eval_every_epochs=0)  # checkpoints per epoch
  straight = loop.train(cfg, str(tmp_path / "a"), progress=False)
  asked = []

  def third_time():
    asked.append(None)
    return len(asked) == 3

  part = loop.train(cfg, str(tmp_path / "b"), should_stop=third_time, progress=False)
  assert part["stopped"] and not part["finished"] and part["step"] == 3
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["3"]  # mid-epoch (5 per epoch)
  resumed = loop.train(cfg, str(tmp_path / "b"), should_stop=third_time, progress=False)
  assert resumed["finished"] and not resumed["stopped"] and resumed["step"] == 10
  assert tree_equal(straight["state"], resumed["state"])
  rows = files.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  steps = [r["step"] for r in rows if r["kind"] == "train"]
  assert steps == sorted(set(steps)) and 3 in steps  # logged where it stopped, once
  # A deadline already passed: one step, checkpointed; the last step is never stopped.
  past = deadlines.StopRequest("2000-01-01T00:00")
  assert past.reason().startswith("--stop_at 2000-01-01T00:00:00") and past.exit_status() == 0
  first = loop.train(cfg, str(tmp_path / "c"), should_stop=past, progress=False)
  assert first["stopped"] and first["step"] == 1
  assert os.listdir(tmp_path / "c" / "checkpoints") == ["1"]
  assert not deadlines.StopRequest("2999-01-01T00:00")() and not deadlines.StopRequest()()


def test_stop_signals_ask_once_then_act_as_before():
  stop = deadlines.StopRequest()
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    stop.catch_signals()
    assert not stop()
    os.kill(os.getpid(), signal.SIGINT)  # the first one only asks
    assert stop() and stop.reason() == "SIGINT received" and stop.exit_status() == 130
    with pytest.raises(KeyboardInterrupt):  # the second one interrupts as Ctrl-C does
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    for s, h in before.items():
      signal.signal(s, h)


def test_train_cli_sigterm_and_stop_at_stop_resumably(tiny_data_dir, tmp_path):
  """SIGTERM mid-run: checkpoint of the step reached, exit status 143; --stop_at in the
  past: one more step, checkpointed, exit status 0."""
  wd = tmp_path / "w"
  args = ["--workdir", str(wd), "--dataset", "gtsrb", "--source", "local", "--data_dir",
          tiny_data_dir, "--val_size", "16", "--depth", "8", "--width", "4", "--epochs",
          "100000", "--batch_size", "16", "--log_every", "1", "--eval_every_epochs", "0",
          "--keep_checkpoints", "1", "--no_progress"]
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (wd / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "stopped=True" in out and "finished=False" in out and "SIGTERM received" in err
  step = int(re.search(r"\bstep=(\d+)", out).group(1))
  assert step >= 1 and os.listdir(wd / "checkpoints") == [str(step)]
  again = run_train(*args, "--stop_at", "2000-01-01T00:00")
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"step={step + 1} " in again.stdout and "--stop_at 2000-01-01T00:00:00" in again.stderr
  assert os.listdir(wd / "checkpoints") == [str(step + 1)]


def test_train_with_stdout_closed_saves_its_work_and_exits_quietly(tiny_data_dir, tmp_path):
  """A run whose stdout reader went away (the parent script killed first) still
  checkpoints; its final line fails quietly: exit status 141, no traceback."""
  wd = tmp_path / "w"
  read_end, write_end = os.pipe()
  os.close(read_end)  # every write to stdout now fails with EPIPE
  try:
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(wd), "--dataset",
         "gtsrb", "--source", "local", "--data_dir", tiny_data_dir, "--val_size", "16",
         "--depth", "8", "--width", "4", "--epochs", "1", "--batch_size", "16",
         "--eval_every_epochs", "0", "--no_progress"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT, stdout=write_end,
        stderr=subprocess.PIPE, text=True, timeout=600)
  finally:
    os.close(write_end)
  assert out.returncode == cli.EXIT_STDOUT_CLOSED, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr
  assert os.listdir(wd / "checkpoints")  # the work is saved


def test_seed_changes_data_order_and_init():
  a, b = loop.epoch_order(0, 0, 100), loop.epoch_order(0, 1, 100)
  assert not np.array_equal(a, b) and np.array_equal(a, loop.epoch_order(0, 0, 100))
  assert not np.array_equal(a, loop.epoch_order(1, 0, 100))
  assert sorted(a.tolist()) == list(range(100))


def test_pmap_training_loop_matches_jit(tiny_data_dir, tmp_path):
  cfg = tiny_config(tiny_data_dir, epochs=1, eval_every_epochs=0)
  a = loop.train(cfg, str(tmp_path / "a"), progress=False)
  b = loop.train(cfg.replace(parallel="pmap"), str(tmp_path / "b"), progress=False)
  for x, y in zip(jax.tree.leaves(a["state"].params), jax.tree.leaves(b["state"].params)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)


def test_corrupt_checkpoint_clear_error_and_untouched(tiny_data_dir, tmp_path):
  cfg = tiny_config(tiny_data_dir, epochs=1)
  wd = tmp_path / "w"
  loop.train(cfg, str(wd), progress=False)
  step_dir = wd / "checkpoints" / "5"
  damaged = []
  for root, _, names in os.walk(step_dir):
    for f in names:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 0:
        with open(p, "wb") as fh:
          fh.write(b"garbage")
        damaged.append(p)
  before = sorted(os.listdir(step_dir))
  with pytest.raises(ckpt_lib.CheckpointError, match=str(step_dir)) as err:
    loop.train(cfg.replace(epochs=2), str(wd), progress=False)
  message = str(err.value)
  assert "\n" not in message and len(message) < 600, message  # one readable line
  assert "{" not in message  # no storage spec
  assert sorted(os.listdir(step_dir)) == before
  assert pathlib.Path(damaged[0]).read_bytes() == b"garbage"


def test_incompatible_workdir_and_missing_config(tiny_data_dir, tmp_path):
  cfg = tiny_config(tiny_data_dir, epochs=1)
  loop.train(cfg, str(tmp_path / "w"), stop_after_steps=1, progress=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="different model"):
    loop.train(cfg.replace(depth=14), str(tmp_path / "w"), progress=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
    ckpt_lib.load_config(str(tmp_path / "nope"))


def test_presets_are_the_papers_runs():
  assert {"cifar10-resnet20-normal", "cifar10-resnet56-fixed", "cifar10-resnet110-random",
          "gtsrb-resnet20-fixed"} <= set(PRESETS)
  c = from_preset("cifar10-resnet110-fixed")
  assert (c.depth, c.drop, c.drop_rate, c.batch_size, c.momentum) == (110, "fixed", 0.9, 128, 0.9)
  assert from_preset("gtsrb-resnet20-random").use_hflip is False
  # He et al.'s ResNet-110 warms up for about one epoch; the shallower nets do not.
  assert c.warmup_epochs == 1.0 and from_preset("cifar10-resnet56-fixed").warmup_epochs == 0
  assert from_preset("cifar10-resnet20-normal", lr=0.2).lr == 0.2


@pytest.mark.parametrize("kw,msg", [(dict(drop="sometimes"), "drop must be"),
                                    (dict(drop_rate=1.5), "drop_rate"),
                                    (dict(depth=21), "6n\\+2"),
                                    (dict(dataset="mnist"), "unknown dataset"),
                                    (dict(parallel="xmap"), "parallel must be"),
                                    (dict(objective="uniform_noisy"), "need pixel dropping")])
def test_bad_config_raises(kw, msg):
  with pytest.raises(ValueError, match=msg):
    TrainConfig(**kw).validate()


def run_train(*args, env=None, timeout=600):
  e = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=e,
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_train_help_documents_every_flag():
  out = run_train("--help")
  assert out.returncode == 0
  import dataclasses
  for f in dataclasses.fields(TrainConfig):
    assert f"--{f.name}" in out.stdout
  assert "--preset" in out.stdout and "--workdir" in out.stdout


def test_train_cli_bad_flags_clear_errors(tmp_path):
  out = run_train("--workdir", str(tmp_path), "--dataset", "mnist")
  assert out.returncode == 2 and "unknown dataset 'mnist'" in out.stderr
  out = run_train("--workdir", str(tmp_path), "--dataset", "gtsrb", "--source", "local",
                  "--data_dir", str(tmp_path / "missing"))
  assert out.returncode == 2 and "does not exist" in out.stderr
  out = run_train("--workdir", str(tmp_path), "--drop_rate", "abc")
  assert out.returncode == 2 and "invalid float" in out.stderr


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_multi_host_two_processes_match_single_process(tiny_data_dir, tmp_path):
  """Two CPU processes (gloo collectives) form one 2-device mesh and train the
  same model as one process with 2 devices."""
  common = ["--dataset", "gtsrb", "--source", "local", "--data_dir", tiny_data_dir,
            "--val_size", "16", "--depth", "8", "--width", "4", "--epochs", "1",
            "--batch_size", "16", "--drop", "fixed", "--drop_rate", "0.5", "--lr", "0.05",
            "--no_progress"]
  port = free_port()
  one_dev = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(tmp_path / "mh"),
       *common, "--distributed", "--coordinator_address", f"127.0.0.1:{port}",
       "--num_processes", "2", "--process_id", str(i)],
      env={**os.environ, "JAX_PLATFORMS": "cpu", **one_dev}, cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  # stdout holds the result line, progress and epoch lines go to stderr
  assert "epoch 1:" not in outs[0][0] and "epoch 1:" in outs[0][1], outs[0][0]
  assert "finished=True" in outs[0][0].strip().splitlines()[-1]
  single_cfg = tiny_config(tiny_data_dir, epochs=1, eval_every_epochs=1)
  loop.train(single_cfg, str(tmp_path / "sh"), progress=False)  # 2 devices, 1 process
  a = json.loads((tmp_path / "mh" / "final_eval.json").read_text())
  b = json.loads((tmp_path / "sh" / "final_eval.json").read_text())
  assert a["step"] == b["step"] == 5
  assert abs(a["test_accuracy_clean"] - b["test_accuracy_clean"]) <= 0.05
  cfg = ckpt_lib.load_config(str(tmp_path / "mh"))
  model = state_lib.make_model(cfg, 43)
  tx = state_lib.make_optimizer(cfg, 5)
  template = state_lib.create_state(jax.random.PRNGKey(0), model, tx, (32, 32, 3))
  sa = ckpt_lib.Checkpointer(str(tmp_path / "mh")).restore(template)
  sb = ckpt_lib.Checkpointer(str(tmp_path / "sh")).restore(template)
  for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)


def test_validation_time_is_its_own_not_the_training_steps(tiny_data_dir, tmp_path,
                                                         monkeypatch):
  """A clock that moves only while the model is validated (100 s a pass): each val row
  says 100 s, and no train row's images/s counts them (a window of 0 s reads as a huge
  rate; one holding a validation would read <= its images / 100 s)."""
  import types

  clock = [0.0]
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  make = loop.make_evaluator

  def slow_evaluator(config, logits_fn):
    evaluate = make(config, logits_fn)

    def timed(*args):
      clock[0] += 100.0
      return evaluate(*args)
    return timed
  monkeypatch.setattr(loop, "make_evaluator", slow_evaluator)
  loop.train(tiny_config(tiny_data_dir, epochs=2, eval_every_epochs=1), str(tmp_path),
             progress=False)
  rows = files.read_jsonl(str(tmp_path / "metrics.jsonl"))
  val = [r for r in rows if r["kind"] == "val"]
  train = [r for r in rows if r["kind"] == "train"]
  assert [r["seconds"] for r in val] == [100.0, 100.0]
  assert len(train) >= 3 and train[-1]["step"] > val[0]["step"]
  assert all(r["images_per_s"] > 1e6 for r in train), train


def test_metric_writer_jsonl_truncate_and_tensorboard(tmp_path):
  from dropjax.training.metrics import MetricWriter
  w = MetricWriter(str(tmp_path), tensorboard=True)
  for s in (1, 2, 3):
    w.write({"kind": "train", "step": s, "loss": 1.0 / s})
  w.truncate_after(2)
  rows = files.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  events = [f for f in os.listdir(tmp_path / "tensorboard") if "tfevents" in f]
  assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0


def test_design_card_commands_default_workdirs(tiny_data_dir, tmp_path):
  """`train.py --dataset ...` without --workdir trains into runs/<derived name>
  (printed) and `evaluate.py --norm linf` without --workdir evaluates the run
  with the newest checkpoint (printed)."""
  common = ["--dataset", "gtsrb", "--source", "local", "--data_dir", tiny_data_dir,
            "--val_size", "16", "--depth", "8", "--width", "4", "--epochs", "1",
            "--batch_size", "16", "--no_progress"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  wd = os.path.join("runs", "gtsrb-resnet8-normal")
  assert f"workdir: {wd}" in out.stderr
  assert os.path.isfile(tmp_path / wd / "final_eval.json")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--norm", "linf",
                        "--num_examples", "8", "--batch_size", "8", "--steps", "1",
                        "--eot_samples", "1", "--num_masks", "1", "--no_progress"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"evaluating the most recent run: {wd}" in out.stderr
  assert os.path.isfile(tmp_path / wd / "eval" / "summary.jsonl")
  empty = tmp_path / "empty"
  empty.mkdir()
  out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py")], env=env, cwd=empty,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.startswith("error: no trained run")


def test_default_workdir_names():
  from dropjax import cli
  assert cli.default_workdir(from_preset("gtsrb-resnet20-random"), "gtsrb-resnet20-random") == \
      os.path.join("runs", "gtsrb-resnet20-random")
  cfg = from_preset(None, dataset="cifar10", drop="fixed", drop_rate=0.5, seed=3)
  assert cli.default_workdir(cfg, None) == os.path.join("runs", "cifar10-resnet20-fixed0.5-seed3")
