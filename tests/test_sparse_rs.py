"""Sparse-RS (dropjax.attacks.sparse_rs): never more than k pixels, box, schedule, success."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropjax.attacks import norms
from dropjax import defense
from dropjax.attacks import losses
from dropjax.attacks.sparse_rs import (SparseRSConfig, alpha_schedule, defended_loss,
                                       make_sparse_rs)
from dropjax.masks import DropSpec
from test_attacks import KEY, NUM_CLASSES, data, linear_logits, linear_model


def test_alpha_schedule_is_the_published_one():
  got = [float(alpha_schedule(q, 10_000, 0.3)) for q in (0, 10, 11, 50, 51, 200, 201, 500,
                                                          501, 1000, 1001, 2001, 4001, 6001, 8001)]
  want = [0.3, 0.3, 0.15, 0.15, 0.075, 0.075, 0.06, 0.06, 0.05, 0.05, 0.0375, 0.03, 0.025,
          0.02, 0.015]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Scaled to the budget: query 100 of 1,000 is query 1,000 of 10,000.
  assert float(alpha_schedule(100, 1000, 0.3)) == pytest.approx(0.05)


@pytest.mark.parametrize("pixels,drop",
                         [(3, DropSpec()), (10, DropSpec.fixed(0.5)), (0, DropSpec())])
def test_never_more_than_k_pixels_and_in_the_box(pixels, drop):
  x, y = data(12)
  cfg = SparseRSConfig(pixels=pixels, num_queries=30, num_masks=3, drop=drop)
  x_adv = jax.jit(make_sparse_rs(linear_logits, cfg))(KEY, linear_model(), x, y)
  counts = np.asarray(norms.l0_count(x_adv - x, "pixel"))
  assert counts.max() <= pixels
  assert float(jnp.min(x_adv)) >= -1 and float(jnp.max(x_adv)) <= 1
  if pixels:  # changed pixels sit at vertices of the colour cube
    changed = np.asarray(jnp.any(x_adv != x, -1))
    assert set(np.unique(np.abs(np.asarray(x_adv)[changed]))) <= {1.0}


def test_deterministic_and_finds_adversarial_examples_without_gradients():
  x, y = data(32)
  v = {"w": linear_model()["w"] * 5, "b": linear_model()["b"]}
  y = jnp.argmax(linear_logits(v, x), -1)
  cfg = SparseRSConfig(pixels=12, num_queries=200, num_masks=1)
  attack = jax.jit(make_sparse_rs(linear_logits, cfg))
  a, b = attack(KEY, v, x, y), attack(KEY, v, x, y)
  np.testing.assert_array_equal(a, b)
  fooled = np.mean(np.asarray(jnp.argmax(linear_logits(v, a), -1)) != np.asarray(y))
  start = make_sparse_rs(linear_logits, cfg.replace(num_queries=1))(KEY, v, x, y)
  fooled_start = np.mean(np.asarray(jnp.argmax(linear_logits(v, start), -1)) != np.asarray(y))
  assert fooled > fooled_start and fooled > 0.5
  target = (y + 1) % NUM_CLASSES
  t = jax.jit(make_sparse_rs(linear_logits, cfg.replace(targeted=True)))(KEY, v, x, y, target)
  assert np.mean(np.asarray(jnp.argmax(linear_logits(v, t), -1)) == np.asarray(target)) > 0.3


def test_paired_comparison_takes_the_fresh_decisions_without_masks():
  """Query i draws the same proposal under either comparison, so on a deterministic
  defense (r = 0: the current set's loss is the best loss) both end in the same set."""
  x, y = data(16)
  v = {"w": linear_model()["w"] * 5, "b": linear_model()["b"]}
  cfg = SparseRSConfig(pixels=8, num_queries=60, num_masks=2)
  fresh = jax.jit(make_sparse_rs(linear_logits, cfg))(KEY, v, x, y)
  paired = jax.jit(make_sparse_rs(linear_logits, cfg.replace(comparison="paired")))(KEY, v, x, y)
  np.testing.assert_array_equal(fresh, paired)
  assert np.any(np.asarray(fresh) != np.asarray(x))  # the search moved


def test_paired_comparison_under_masks_stays_in_budget_and_is_deterministic():
  x, y = data(12)
  cfg = SparseRSConfig(pixels=6, num_queries=40, num_masks=3, drop=DropSpec.fixed(0.7),
                       comparison="paired")
  attack = jax.jit(make_sparse_rs(linear_logits, cfg))
  a, b = attack(KEY, linear_model(), x, y), attack(KEY, linear_model(), x, y)
  np.testing.assert_array_equal(a, b)
  assert np.asarray(norms.l0_count(a - x, "pixel")).max() <= 6
  fresh = jax.jit(make_sparse_rs(linear_logits, cfg.replace(comparison="fresh")))(
      KEY, linear_model(), x, y)
  assert np.any(np.asarray(fresh) != np.asarray(a))  # under masks the rules decide apart


def test_defended_loss_averages_independent_draws_of_the_defense():
  """Against a reference written out: the mean over split(key, d) of the
  rejection-aware loss of each draw's mask-averaged probabilities; one draw is
  the defense evaluated with the key itself (the rows computed before draws)."""
  x, y = data(6)
  v = linear_model()
  cfg = SparseRSConfig(num_masks=3, drop=DropSpec.fixed(0.6), entropy_weight=0.5)

  def reference(key, draws):
    keys = [key] if draws == 1 else list(jax.random.split(key, draws))
    per_draw = [losses.rejection_aware(defense.mask_average_probs(k, linear_logits, v, x,
                                                                  cfg.drop, cfg.num_masks),
                                       y, False, cfg.entropy_weight) for k in keys]
    return np.mean(np.stack([np.asarray(p) for p in per_draw]), axis=0)

  for draws in (1, 4):
    got = defended_loss(KEY, linear_logits, v, x, y, cfg.replace(draws=draws))
    assert got.shape == (6,)
    np.testing.assert_allclose(np.asarray(got), reference(KEY, draws), rtol=1e-5, atol=1e-6)
  # Without masks every draw is the same evaluation: the average is that one.
  det = cfg.replace(drop=DropSpec())
  np.testing.assert_allclose(np.asarray(defended_loss(KEY, linear_logits, v, x, y,
                                                      det.replace(draws=4))),
                             np.asarray(defended_loss(KEY, linear_logits, v, x, y, det)),
                             rtol=1e-6)


def test_more_draws_stay_in_budget_and_are_deterministic():
  x, y = data(8)
  cfg = SparseRSConfig(pixels=5, num_queries=20, num_masks=2, drop=DropSpec.fixed(0.7),
                       comparison="paired", draws=3)
  attack = jax.jit(make_sparse_rs(linear_logits, cfg))
  a, b = attack(KEY, linear_model(), x, y), attack(KEY, linear_model(), x, y)
  np.testing.assert_array_equal(a, b)
  assert np.asarray(norms.l0_count(a - x, "pixel")).max() <= 5
  one = jax.jit(make_sparse_rs(linear_logits, cfg.replace(draws=1)))(KEY, linear_model(), x, y)
  assert np.any(np.asarray(one) != np.asarray(a))  # the draws change the decisions


def test_bad_configs():
  with pytest.raises(ValueError, match="draws"):
    SparseRSConfig(draws=0).validate()
  with pytest.raises(ValueError, match="comparison"):
    SparseRSConfig(comparison="best").validate()
  with pytest.raises(ValueError, match="alpha_init"):
    SparseRSConfig(alpha_init=0).validate()
  with pytest.raises(ValueError, match="num_queries"):
    SparseRSConfig(num_queries=0).validate()
  x, y = data(2)
  with pytest.raises(ValueError, match="H\\*W/2"):
    make_sparse_rs(linear_logits, SparseRSConfig(pixels=40))(KEY, linear_model(), x, y)
