"""Gradient-masking sanity checks (``evaluate.py --sanity``), after Athalye et
al. (2018) and Carlini et al. (2019, "On evaluating adversarial robustness").

On ``sanity_examples`` test images, at the evaluation's norm and (first)
test-time drop rate, with one untargeted CE attack, each check runs small
evaluations (:func:`dropjax.evaluation.protocol.evaluate`, rows kept under
``<out>/sanity/``) and compares their robust accuracy (the averaged defense,
without rejection: what the gradients attack):

1. ``large_budget``: with a budget covering the whole box (L-inf / L2) or a
   quarter of the pixels (L0) robust accuracy must fall to at most
   ``sanity_tolerance`` (a defense that "survives" that is masking gradients);
2. ``more_steps``: ``4 x steps`` must not give a higher robust accuracy than
   ``steps`` (beyond the tolerance);
3. ``more_eot``: EOT over 10 masks must not be weaker than over 1 mask;
4. ``black_box``: a gradient-free attack must not be much stronger than the
   white-box one: Sparse-RS for L0 (its proposals judged against the current
   set under the same masks, ``--comparison paired``: the stronger search
   against a randomized defense), a uniformly random point of the budget for
   L-inf / L2 (then only a floor: white-box must beat noise).

Each check is a row of ``<out>/sanity/checks.jsonl`` (name, pass, the numbers
compared); the APGD loss curve (mean loss, best loss and step size per
iteration, L-inf / L2) is ``<out>/sanity/loss_curve.jsonl``.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from dropjax import files
from dropjax.attacks import APGDConfig, paper_attack
from dropjax.attacks.apgd import make_apgd
from dropjax.data import augment
from dropjax.masks import DropSpec
from dropjax.training import checkpoint as ckpt_lib

LARGE_BUDGET = {"linf": 2.0, "l2": 64.0, "l0": 0.25}  # X units (linf, l2); fraction (l0)
CHECKS_FILE = "checks.jsonl"
CURVE_FILE = "loss_curve.jsonl"


def _robust(summary: dict) -> float:
  return summary["robust_accuracy_avg"]


def run(workdir: str, ev, out_dir: str, **kw) -> list[dict]:
  """Runs the checks; returns their rows (also written to ``out_dir/sanity``)."""
  from dropjax.evaluation import protocol  # pylint: disable=g-import-not-at-top
  sanity_dir = os.path.join(out_dir, "sanity")
  base = dataclasses.replace(ev, sanity=False, num_examples=ev.sanity_examples,
                             attack="pgd", losses=("ce",), modes=("untargeted",),
                             restarts=1, score_draws=1,
                             drop_rates=(ev.drop_rates[:1] if ev.drop_rates else None))
  base = base.validate()
  tol = ev.sanity_tolerance

  def one(name: str, **changes) -> dict:
    cfg = dataclasses.replace(base, **changes).validate()
    [summary] = protocol.evaluate(workdir, cfg, os.path.join(sanity_dir, name), **kw)
    return summary

  train_cfg = ckpt_lib.load_config(workdir)  # the dataset and drop settings only
  preset = paper_attack(train_cfg.dataset, ev.norm)
  eps = ev.eps[0] if ev.eps else (preset.l0_fraction if ev.norm == "l0" else preset.eps)
  checks = []
  ref = one("reference", eps=(eps,))
  big = LARGE_BUDGET[ev.norm]
  big_stated = big if ev.norm == "l0" or ev.budget_reading == "literal" else big / 2
  large = one("large_budget", eps=(big_stated,))
  checks.append({"check": "large_budget", "pass": _robust(large) <= tol,
                 "robust_accuracy": _robust(large), "eps": big_stated,
                 "rule": f"robust accuracy <= {tol} at a budget covering the box"})
  more = one("more_steps", eps=(eps,), steps=4 * ev.steps)
  checks.append({"check": "more_steps", "pass": _robust(more) <= _robust(ref) + tol,
                 "robust_accuracy_steps": _robust(ref), "steps": ev.steps,
                 "robust_accuracy_more_steps": _robust(more), "more_steps": 4 * ev.steps,
                 "rule": "4x steps not weaker (within the tolerance)"})
  eot1 = one("eot1", eps=(eps,), eot_samples=1)
  eot10 = ref if ev.eot_samples == 10 else one("eot10", eps=(eps,), eot_samples=10)
  checks.append({"check": "more_eot", "pass": _robust(eot10) <= _robust(eot1) + tol,
                 "robust_accuracy_eot1": _robust(eot1), "robust_accuracy_eot10": _robust(eot10),
                 "rule": "EOT 10 not weaker than EOT 1 (within the tolerance)"})
  if ev.norm == "l0":
    bb = one("black_box", eps=(eps,), attack="sparse_rs", losses=("margin",),
             comparison="paired")
    checks.append({"check": "black_box", "pass": _robust(bb) >= _robust(ref) - tol,
                   "robust_accuracy_white_box": _robust(ref),
                   "robust_accuracy_sparse_rs": _robust(bb), "queries": ev.queries,
                   "comparison": "paired",
                   "rule": "Sparse-RS not stronger than PGD (within the tolerance)"})
  else:
    noise = one("random_noise", eps=(eps,), steps=1, step_size=0.0, random_start=True)
    checks.append({"check": "black_box", "pass": _robust(ref) <= _robust(noise) + tol,
                   "robust_accuracy_white_box": _robust(ref),
                   "robust_accuracy_random_noise": _robust(noise),
                   "rule": "white-box at least as strong as random noise of the budget"})
    loss_curve(workdir, base, eps, train_cfg, sanity_dir, kw)
  for c in checks:
    c["tolerance"] = tol
    c["num_examples"] = ref["num_examples"]
    c["drop_rate"] = ref["drop_rate"]
  files.write_jsonl(os.path.join(sanity_dir, CHECKS_FILE), checks)
  return checks


def loss_curve(workdir: str, ev, eps: float, train_cfg, sanity_dir: str, kw: dict) -> None:
  """APGD-CE with EOT on the first images: per-iteration rows (mean loss, best
  loss, step size in units of X) to ``loss_curve.jsonl``."""
  # pylint: disable-next=g-import-not-at-top
  from dropjax.evaluation import protocol, settings
  _, variables, logits_fn, data = protocol.load_model(workdir, kw.get("data_dir"),
                                                      kw.get("source"))
  rate = ev.drop_rates[0] if ev.drop_rates else settings.default_drop_rate(
      train_cfg, data.image_shape[0] * data.image_shape[1])
  n = min(ev.batch_size, ev.num_examples or len(data.test), len(data.test))
  cfg = APGDConfig(norm=ev.norm, eps=eps, num_steps=ev.steps * 4, eot_samples=ev.eot_samples,
                   drop=DropSpec.fixed(rate, train_cfg.per_pixel),
                   budget_reading=ev.budget_reading)
  attack = jax.jit(make_apgd(logits_fn, cfg, trace=True))
  x = augment.to_float(data.test.x[:n])
  _, hist = attack(jax.random.PRNGKey(ev.seed), variables, x, data.test.y[:n].astype(np.int32))
  hist = jax.device_get(hist)
  rows = [{"iteration": i + 1, "loss_mean": float(hist["loss"][i].mean()),
           "loss_best_mean": float(hist["loss_best"][i].mean()),
           "step_size_mean_x_units": float(hist["eta"][i].mean()), "attack": "apgd-ce",
           "eot_samples": ev.eot_samples, "drop_rate": rate, "num_examples": n}
          for i in range(cfg.num_steps)]
  files.write_jsonl(os.path.join(sanity_dir, CURVE_FILE), rows)
