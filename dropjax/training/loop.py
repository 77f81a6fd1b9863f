"""The training driver: data order, steps, logging, checkpoints, final eval.

Python only drives steps and epochs; every step is one compiled call.  The
data order of epoch ``e`` is ``default_rng([seed, e]).permutation(N)`` and the
step's randomness is ``fold_in(key, step)``, so a run resumed from the
checkpoint of step ``s`` continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from dropjax import backend as backend_lib
from dropjax import files, inference
from dropjax.config import TrainConfig
from dropjax.data import load_dataset
from dropjax.training import checkpoint as ckpt_lib
from dropjax.training import parallel, state as state_lib, step as step_lib
from dropjax.training.metrics import MetricWriter

log = logging.getLogger("dropjax.train")

# Stream offsets of the root key (fold_in(PRNGKey(seed), stream)).
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 0, 1, 2
FINAL_EVAL_FILE = "final_eval.json"


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The data order of ``epoch`` (computed once per epoch, not once per step)."""
  order = np.random.default_rng([seed, epoch]).permutation(n)
  order.flags.writeable = False
  return order


def steps_per_epoch(n: int, batch_size: int) -> int:
  if n < batch_size:
    raise ValueError(f"the training set has {n} images, fewer than one batch of "
                     f"{batch_size}; lower --batch_size")
  return n // batch_size


def local_batch(images, labels, config: TrainConfig, step: int, spe: int) -> dict:
  """This process's rows of the global batch for ``step``."""
  epoch, i = divmod(step, spe)
  order = epoch_order(config.seed, epoch, len(labels))
  rows = order[i * config.batch_size:(i + 1) * config.batch_size]
  lb = config.batch_size // jax.process_count()
  lo = jax.process_index() * lb
  rows = rows[lo:lo + lb]
  return {"image": images[rows], "label": labels[rows],
          "index": np.arange(lo, lo + lb, dtype=np.int32)}


def _agreed(flag: bool) -> bool:
  """``flag`` as process 0 sees it, on every process (one decision for all hosts)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def make_evaluator(config: TrainConfig, logits_fn):
  """``evaluate(variables, split, key) -> dict``: clean accuracy and accuracy at
  the run's drop rate (single mask).  Compiled once per run."""
  clean = inference.make_predict(logits_fn)
  dropped = (inference.make_predict(logits_fn, config.drop_spec,
                                    pass_mask=config.model_takes_mask)
             if config.drop_spec.drops else None)

  def evaluate(variables, split, key) -> dict:
    variables = jax.device_put(variables, jax.local_devices()[0])
    out = {"accuracy_clean": inference.accuracy(clean, variables, split.x, split.y,
                                                 config.eval_batch_size, key)}
    if dropped is not None:
      out["accuracy_dropped"] = inference.accuracy(dropped, variables, split.x, split.y,
                                                   config.eval_batch_size, key)
    return out

  return evaluate


def recorded_final_eval(workdir: str, total_steps: int) -> dict | None:
  """The test numbers a finished run recorded (``final_eval.json``), or None when there
  are none for ``total_steps`` (an unfinished run, or one of another length)."""
  path = os.path.join(workdir, FINAL_EVAL_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    final = json.load(f)
  if final.get("finished") and final.get("step") == total_steps:
    return final
  return None


def train(config: TrainConfig, workdir: str, *, stop_after_steps: int | None = None,
          should_stop: Callable[[], bool] | None = None, progress: bool | None = None,
          backend: backend_lib.Backend | None = None) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns the final metrics.

  Args:
    config: validated training config.
    workdir: holds config.json, checkpoints/, metrics.jsonl, final_eval.json.
    stop_after_steps: stop after this many steps of *this call* (as if
      killed right after the last checkpoint); used by tests and time-boxed runs.
    should_stop: asked after every step (e.g. a :class:`dropjax.deadlines.StopRequest`);
      when it says True the run checkpoints that step, so that it resumes from there
      exactly, and returns unfinished (``"stopped": True``).  With several processes
      process 0's answer is every process's, asked every ``log_every`` steps and at
      epoch ends (a collective, kept off the other steps).
    progress: show a progress bar (default: when stderr is a terminal).
    backend: the model's layers (default :func:`dropjax.backend.resolve`).
  """
  config.validate()
  backend = backend or backend_lib.resolve()
  if os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
    ckpt_lib.check_compatible(ckpt_lib.load_config(workdir), config, workdir)
  data = load_dataset(config.dataset, source=config.source, data_dir=config.data_dir,
                      val_size=config.val_size, seed=config.seed)
  train_split = data.train.subset(config.train_examples, config.seed)
  spe = steps_per_epoch(len(train_split), config.batch_size)
  skipped = len(train_split) - spe * config.batch_size
  if skipped:
    log.warning("each epoch uses %d of %d training images: the last %d of that epoch's "
                "random order do not fill a batch (a different subset every epoch)",
                spe * config.batch_size, len(train_split), skipped)
  total_steps = config.epochs * spe

  root = jax.random.PRNGKey(config.seed)
  bn_axis = parallel.PMAP_AXIS if config.parallel == "pmap" else None
  model = state_lib.make_model(config, data.num_classes, backend.layers(train=True),
                               bn_axis_name=bn_axis)
  eval_model = state_lib.make_model(config, data.num_classes, backend.layers(train=False))
  evaluate = make_evaluator(config, step_lib.make_logits_fn(eval_model))
  tx = state_lib.make_optimizer(config, spe)
  host_state = state_lib.create_state(jax.random.fold_in(root, INIT_STREAM), model, tx,
                                      data.image_shape)
  train_step = step_lib.make_train_step(
      config, model, tx, axis_name=parallel.PMAP_AXIS if config.parallel == "pmap" else None,
      unroll=backend.loop_unroll(config.adv_steps))
  runner = parallel.make_runner(config.parallel, train_step, config.batch_size)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  ckpt_lib.save_config(workdir, config)
  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
  if ckpt.latest_step() is not None:
    host_state = ckpt.restore(host_state)
    log.info("resumed from %s/%d", ckpt.directory, ckpt.latest_step())
  start = int(host_state.step)
  writer.truncate_after(start)
  dstate = runner.put_state(host_state)
  train_key = jax.random.fold_in(root, TRAIN_STREAM)
  eval_key = jax.random.fold_in(root, EVAL_STREAM)

  end = total_steps if stop_after_steps is None else min(total_steps, start + stop_after_steps)
  bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True,
             disable=(None if progress is None else not progress) or jax.process_index() != 0)
  pending, t_last, n_last, stopped = [], time.perf_counter(), start, False
  for step in range(start, end):
    batch = local_batch(train_split.x, train_split.y, config, step, spe)
    dstate, metrics = runner.step(dstate, runner.put_batch(batch), train_key)
    pending.append(metrics)
    done = step + 1
    epoch_end = done % spe == 0
    # With several processes the answer is a collective: asked where the loop logs anyway.
    ask = jax.process_count() == 1 or done % config.log_every == 0 or epoch_end
    stopped = done < total_steps and should_stop is not None and ask and _agreed(should_stop())
    if done % config.log_every == 0 or epoch_end or done == end or stopped:
      vals = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      now = time.perf_counter()
      vals["images_per_s"] = (done - n_last) * config.batch_size / max(now - t_last, 1e-9)
      t_last, n_last, pending = now, done, []
      writer.write({"kind": "train", "step": done, "epoch": done / spe, **vals})
      bar.set_postfix(loss=f"{vals['loss']:.3f}", acc=f"{vals['accuracy']:.3f}",
                      img_s=f"{vals['images_per_s']:.0f}")
    if ((config.checkpoint_every and done % config.checkpoint_every == 0)
        or (not config.checkpoint_every and epoch_end) or done == total_steps or stopped):
      ckpt.save(done, runner.checkpoint_state(dstate))
    if stopped:
      bar.update(1)
      log.warning("stopped after step %d of %d: the checkpoint of that step resumes it "
                  "exactly (run the same command again)", done, total_steps)
      break
    if (epoch_end and len(data.val) and config.eval_every_epochs
        and (done // spe) % config.eval_every_epochs == 0):
      t_val = time.perf_counter()
      val = evaluate(runner.host_state(dstate).variables, data.val, eval_key)
      seconds = time.perf_counter() - t_val
      t_last += seconds  # the next row's images_per_s times training steps only
      writer.write({"kind": "val", "step": done, "epoch": done // spe, **val,
                    "seconds": seconds})
      bar.write(f"epoch {done // spe}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()),
                file=sys.stderr)  # progress; stdout holds the result line only
    bar.update(1)
  bar.close()
  ckpt.wait()
  final_state = runner.host_state(dstate)
  result = {"step": int(final_state.step), "total_steps": total_steps,
            "finished": int(final_state.step) == total_steps, "stopped": stopped}
  # A finished run invoked again: its test numbers stand (one process only, so that no
  # host skips an evaluation whose collectives the others enter).
  recorded = (recorded_final_eval(workdir, total_steps)
              if start == total_steps and jax.process_count() == 1 else None)
  if recorded is not None:
    log.info("%s finished earlier: %s", workdir, FINAL_EVAL_FILE)
    result = recorded
  elif result["finished"]:
    test = evaluate(final_state.variables, data.test, eval_key)
    result.update({f"test_{k}": v for k, v in test.items()})
    result["test_examples"] = len(data.test)
    if jax.process_index() == 0:
      files.write_atomic(os.path.join(workdir, FINAL_EVAL_FILE),
                         json.dumps(result, indent=2, sort_keys=True))
    writer.write({"kind": "test", **result})
  ckpt.close()
  result["state"] = final_state
  return result
