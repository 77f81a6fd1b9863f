"""What is computed for one chunk of test examples: the defense's decisions
(:func:`make_defense_fn`, :func:`prediction_columns`), every attack
configuration's output scored by them in independent draws, the worst case
per example and metric (:func:`evaluate_chunk`), as columns that become rows
(:func:`to_rows`).  Randomness comes from the chunk's key only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dropjax import backend as backend_lib
from dropjax import defense
from dropjax.attacks import APGDConfig, SparseRSConfig, make_apgd, make_pgd, make_sparse_rs
from dropjax.attacks import norms as norms_lib
from dropjax.data import augment
from dropjax.evaluation import worst_case
from dropjax.masks import DropSpec


def make_defense_fn(logits_fn, drop: DropSpec, num_masks: int):
  """Jitted ``defend(key, variables, x) -> dict`` of (B, C) probabilities."""

  @jax.jit
  def defend(key, variables, x):
    k_single, k_avg = jax.random.split(key)
    return {
        "plain": jax.nn.softmax(logits_fn(variables, x), -1),
        "single": defense.masked_probs(k_single, logits_fn, variables, x, drop),
        "avg": defense.mask_average_probs(k_avg, logits_fn, variables, x, drop, num_masks),
    }

  return defend


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack configuration of an evaluation: a name, its compiled attack
  ``(key, variables, x, y, target) -> x_adv``, and for targeted attacks the
  rank of its target among the clean prediction's other classes."""
  name: str
  run: Callable
  target_rank: int | None = None


def compile_attack(logits_fn, config, backend: backend_lib.Backend) -> Callable:
  """The jitted attack of one configuration (PGD, APGD or Sparse-RS), its loop
  unrolled as ``backend`` chooses."""
  unroll = backend.loop_unroll(config.num_steps)
  if isinstance(config, APGDConfig):
    return jax.jit(make_apgd(logits_fn, config, unroll=unroll))
  if isinstance(config, SparseRSConfig):
    return jax.jit(make_sparse_rs(logits_fn, config))
  return jax.jit(make_pgd(logits_fn, config, unroll=unroll))


def perturbation_norms(x_adv: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
  """L-inf and L2 in units of X ([-1, 1]) and on the [0, 1] pixel scale, L0 in
  pixels; each (B,)."""
  d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
  flat = d.reshape(d.shape[0], -1)
  linf, l2 = np.abs(flat).max(1), np.sqrt((flat ** 2).sum(1))
  return {"linf": linf, "l2": l2, "linf_pixel01": linf / 2, "l2_pixel01": l2 / 2,
          "l0": np.asarray(norms_lib.l0_count(jnp.asarray(d), "pixel"))}


def prediction_columns(probs: dict, thresholds: dict, prefix: str) -> dict[str, np.ndarray]:
  """Row columns from :func:`make_defense_fn` outputs: predictions for plain /
  single / avg, entropies and rejection flags for single / avg."""
  probs = jax.device_get(probs)
  cols = {f"{prefix}pred_{kind}": probs[kind].argmax(-1) for kind in ("plain", "single", "avg")}
  for kind in ("single", "avg"):
    h = np.asarray(defense.entropy(probs[kind]))
    cols[f"{prefix}entropy_{kind}"] = h
    cols[f"{prefix}rejected_{kind}"] = h > thresholds[kind]
  return cols


def top_other_classes(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """(B, k) the k most probable classes other than ``labels``, most probable first."""
  p = np.array(probs, np.float64)
  p[np.arange(len(labels)), labels] = -np.inf
  return np.argsort(-p, axis=1, kind="stable")[:, :k]


def subset_calls(todo: np.ndarray, size: int):
  """``(t, part, idx)`` per call of at most ``size`` of the examples ``todo``:
  ``part`` the call's examples, ``idx`` them padded to ``size`` by repeating the
  last one (one compiled shape serves every call)."""
  for t, lo in enumerate(range(0, len(todo), size)):
    part = todo[lo:lo + size]
    yield t, part, np.concatenate([part, np.full(size - len(part), part[-1])])


def attack_subset(attack: Attack, key, variables, x, y, target, todo: np.ndarray,
                  size: int):
  """``x`` (B, H, W, C) with the examples ``todo`` replaced by ``attack``'s
  outputs, computed in calls of ``size`` examples (call ``t`` under
  ``fold_in(key, t)``, :func:`subset_calls`); the other examples stay clean."""
  x_adv = np.array(x)
  for t, part, idx in subset_calls(todo, size):
    out = attack.run(jax.random.fold_in(key, t), variables, x[idx], y[idx],
                     None if target is None else target[idx])
    x_adv[part] = np.asarray(out)[:len(part)]
  return jnp.asarray(x_adv)


def score_subset(defend, key, variables, x_adv, todo: np.ndarray, size: int,
                 thresholds: dict, filler: dict) -> dict:
  """One draw of the defense's decision columns (:func:`prediction_columns`,
  prefix ``adv_``) on the examples ``todo`` of ``x_adv``, in calls of ``size``
  (call ``t`` under ``fold_in(key, t)``); ``filler``'s values elsewhere."""
  cols = {k: np.array(v) for k, v in filler.items()}
  for t, part, idx in subset_calls(todo, size):
    dec = prediction_columns(defend(jax.random.fold_in(key, t), variables, x_adv[idx]),
                             thresholds, "adv_")
    for k, v in dec.items():
      cols[k][part] = np.asarray(v)[:len(part)]
  return cols


def evaluate_chunk(key, defend, attacks: Sequence[Attack], variables, batch: dict,
                   thresholds: dict, score_draws: int = 1,
                   cascade_batch: int | None = None) -> dict:
  """Rows (as columns of (B,) arrays) of one chunk.

  Clean: predictions, entropies and rejections (:func:`prediction_columns`).
  With ``attacks``: every attack runs; each output is scored by the defense's
  decision in ``score_draws`` independent draws; per metric of
  :mod:`dropjax.evaluation.worst_case` the row keeps the worst attack's name
  (``adv_attack_<metric>``) and its draws (``adv_broken_<metric>``, a list of
  bools); ``adv_*`` prediction columns are the first draw's decision on the
  headline metric's (``avg_with_rejection``) worst attack, ``norm_*`` the
  largest perturbation of any attack, ``adv_attacks_run`` how many attacks
  ran on the example.

  ``cascade_batch`` (``None``: off): the attacks after the first run only on
  the examples no earlier attack broke in every draw for every metric, in
  calls of ``cascade_batch`` examples (:func:`attack_subset`), and only there
  are their outputs scored (:func:`score_subset`); the others count as not
  broken by those attacks.  Their worst case cannot change: it is already
  broken everywhere, and the first attack wins ties.  Where the padded calls
  would cover as many examples as the chunk, the attack runs on the whole
  chunk as without the cascade.

  ``key`` is the chunk's key; ``batch`` holds uint8 ``image`` (B, H, W, C),
  ``label`` and ``index``.
  """
  k_attack, k_score, k_clean = jax.random.split(key, 3)
  x = augment.to_float(jnp.asarray(batch["image"]))
  y = jnp.asarray(batch["label"], jnp.int32)
  y_np = np.asarray(batch["label"])
  clean = defend(k_clean, variables, x)
  cols = {"index": batch["index"], "label": batch["label"],
          **prediction_columns(clean, thresholds, "")}
  if not attacks:
    return cols
  ranks = [a.target_rank for a in attacks if a.target_rank is not None]
  targets = (top_other_classes(np.asarray(clean["avg"]), y_np, max(ranks) + 1)
             if ranks else None)
  broken = {m: [] for m in worst_case.METRICS}
  decisions, worst_norms = [], None
  done = np.zeros(len(y_np), bool)  # broken in every draw for every metric
  attacks_run = np.zeros(len(y_np), np.int32)
  unattacked = (None if cascade_batch is None  # decisions where no attack ran
                else prediction_columns(clean, thresholds, "adv_"))
  for j, attack in enumerate(attacks):
    target = None if attack.target_rank is None else jnp.asarray(
        targets[:, attack.target_rank], jnp.int32)
    k_j = jax.random.fold_in(k_attack, j)
    left = int(np.sum(~done))
    if cascade_batch is None or j == 0 or -(-left // cascade_batch) * cascade_batch >= len(y_np):
      attacked = np.ones(len(y_np), bool)
      x_adv = attack.run(k_j, variables, x, y, target)
      score = lambda k, x_adv=x_adv: prediction_columns(defend(k, variables, x_adv),
                                                        thresholds, "adv_")
    else:  # only the examples not yet broken everywhere; scored only there
      attacked, todo = ~done, np.flatnonzero(~done)
      x_adv = attack_subset(attack, k_j, variables, x, y, target, todo,
                            cascade_batch) if len(todo) else x
      score = lambda k, x_adv=x_adv, todo=todo: score_subset(
          defend, k, variables, x_adv, todo, cascade_batch, thresholds, unattacked)
    attacks_run += attacked
    norms_j = perturbation_norms(x_adv, x)
    worst_norms = norms_j if worst_norms is None else {
        n: np.maximum(worst_norms[n], v) for n, v in norms_j.items()}
    per_draw = {m: [] for m in worst_case.METRICS}
    first = None
    for r in range(score_draws):  # the same draws score every attack
      dec = score(jax.random.fold_in(k_score, r))
      first = dec if first is None else first
      for m, v in worst_case.broken({k[4:]: v for k, v in dec.items()}, y_np).items():
        per_draw[m].append(v & attacked)
    decisions.append(first)
    for m in worst_case.METRICS:
      broken[m].append(np.stack(per_draw[m]))  # (R, B)
    done |= np.all([broken[m][-1].all(axis=0) for m in worst_case.METRICS], axis=0)
  names = np.array([a.name for a in attacks])
  for m in worst_case.METRICS:
    winner, draws = worst_case.select(np.stack(broken[m]))  # (J, R, B)
    cols[f"adv_attack_{m}"] = names[winner]
    cols[f"adv_broken_{m}"] = draws
    if m == worst_case.HEADLINE:
      head = winner
  b = np.arange(len(y_np))
  for col in decisions[0]:
    cols[col] = np.stack([d[col] for d in decisions])[head, b]
  for n, v in worst_norms.items():
    cols[f"norm_{n}"] = v
  cols["adv_attacks_run"] = attacks_run
  return cols


def to_rows(cols: dict, n_valid: int) -> list[dict]:
  """The first ``n_valid`` rows (JSON-ready dicts) of columns of (B, ...) arrays."""
  def item(v, i):
    v = np.asarray(v)[i]
    return v.tolist() if v.ndim else v.item()
  return [{k: item(v, i) for k, v in cols.items()} for i in range(n_valid)]
