import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropjax import explain, files, models, objectives
from dropjax.config import TrainConfig
from dropjax.training import step as step_lib

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def tiny_model():
  m = models.resnet(8, 5, width=4)
  x = jax.random.uniform(KEY, (2, 8, 8, 3), minval=-1, maxval=1)
  v = m.init(KEY, x)
  return step_lib.make_logits_fn(m), v, x


def test_input_gradient_matches_finite_differences(tiny_model):
  jax.config.update("jax_enable_x64", True)
  try:
    logits_fn, v, x = tiny_model
    v64 = jax.tree.map(lambda a: a.astype(jnp.float64), v)
    m64 = models.CifarResNet(depth=8, num_classes=5, width=4, dtype=jnp.float64)
    f64 = lambda vv, xx: m64.apply(vv, xx.astype(jnp.float64))
    x64 = x.astype(jnp.float64)
    y = jnp.array([1, 3])
    signed = jax.grad(lambda xx: jnp.sum(f64(v64, xx)[jnp.arange(2), y]))(x64)
    rng = np.random.RandomState(0)
    for _ in range(6):
      b, i, j, c = rng.randint(2), rng.randint(8), rng.randint(8), rng.randint(3)
      h = 1e-5
      e = jnp.zeros_like(x64).at[b, i, j, c].set(h)
      fd = (f64(v64, x64 + e)[b, y[b]] - f64(v64, x64 - e)[b, y[b]]) / (2 * h)
      np.testing.assert_allclose(signed[b, i, j, c], fd, rtol=1e-4, atol=1e-8)
    got = explain.input_gradient(logits_fn, v, x, y)
    np.testing.assert_allclose(got, np.abs(signed), rtol=1e-3, atol=1e-5)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_four_maps_of_a_linear_model_are_its_weights_masked():
  """For logits z = x·V the explanation map is |V_y| exactly (an independent
  reference), so E(X) = E(X') = |V_y|, E(X')∘M keeps it on kept values only,
  and the kept share of the mass is the kept share of |V_y|."""
  v = jax.random.normal(KEY, (8 * 8 * 3, 5))
  logits_fn = lambda vv, xx: xx.reshape(xx.shape[0], -1) @ vv
  x = jax.random.uniform(KEY, (2, 8, 8, 3), minval=-1, maxval=1)
  y = jnp.array([0, 4])
  maps = explain.four_maps(KEY, logits_fn, v, x, y, 0.7)
  want = np.abs(np.asarray(v)[:, [0, 4]].T.reshape(2, 8, 8, 3))
  np.testing.assert_allclose(maps["E(X)"], want, rtol=1e-6)
  np.testing.assert_allclose(maps["E(X')"], want, rtol=1e-6)
  m = np.asarray(maps["mask"])
  assert set(np.unique(m)) == {0.0, 1.0} and abs(m.mean() - 0.3) < 0.1  # kept with p = 1 - r
  np.testing.assert_allclose(maps["E(X')*M"], want * m, rtol=1e-6)
  np.testing.assert_allclose(maps["E(X')*(1-M)"], want * (1 - m), rtol=1e-6)
  np.testing.assert_array_equal(maps["x_dropped"], np.asarray(x) * m)
  mass = explain.gradient_mass(maps)
  np.testing.assert_allclose(mass["kept_mass_fraction"],
                             (want * m).sum((1, 2, 3)) / want.sum((1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(mass["kept_pixel_fraction"], m.mean((1, 2, 3)), rtol=1e-6)


def test_uniform_objective_minimum_is_log_c():
  c = 7
  uniform = jnp.zeros((3, c))
  np.testing.assert_allclose(objectives.uniform_cross_entropy(uniform), np.log(c), rtol=1e-6)
  other = jax.random.normal(KEY, (100, c)) * 3
  assert bool(jnp.all(objectives.uniform_cross_entropy(other) > np.log(c)))
  g = jax.grad(lambda z: jnp.sum(objectives.uniform_cross_entropy(z)))(uniform)
  np.testing.assert_allclose(g, 0.0, atol=1e-7)


def test_noisy_images_are_plus_minus_eps():
  x = jnp.zeros((2, 4, 4, 3))
  n = objectives.noisy_images(KEY, x, 16 / 255)
  np.testing.assert_allclose(jnp.abs(n), 16 / 255, rtol=1e-6)
  assert 0.3 < float(jnp.mean(n > 0)) < 0.7


@pytest.mark.parametrize("objective", ["uniform_original", "uniform_noisy"])
def test_auxiliary_objectives_as_per_example_terms(objective):
  cfg = TrainConfig(drop="fixed", drop_rate=0.5, objective=objective, aux_weight=0.5,
                    crop_pad=0).validate()
  x = jax.random.uniform(KEY, (4, 8, 8, 3), minval=-1, maxval=1)
  m = (jax.random.uniform(jax.random.PRNGKey(1), x.shape) > 0.5).astype(jnp.float32)
  labels = jnp.array([0, 1, 2, 0])
  seen = []
  w = jax.random.normal(KEY, (192, 3))

  def apply_logits(images):
    seen.append(images)
    return images.reshape(images.shape[0], -1) @ w

  keys = jax.random.split(KEY, 4)
  loss, logits = step_lib.per_example_loss(cfg, apply_logits, x, x * m, m, keys, labels)
  assert loss.shape == (4,) and logits.shape == (4, 3)
  [batch] = seen  # one forward pass over the concatenated batch
  assert batch.shape[0] == 8
  np.testing.assert_array_equal(batch[:4], x * m)
  if objective == "uniform_original":
    np.testing.assert_array_equal(batch[4:], x)
  else:  # (x + eps V) ∘ M: zero where dropped, |diff| = 2 eps where kept (unclipped)
    aux = np.asarray(batch[4:])
    assert (aux[np.asarray(m) == 0] == 0).all()
  want = (objectives.cross_entropy(logits, labels)
          + 0.5 * objectives.uniform_cross_entropy(apply_logits(batch[4:])))
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_figures_written_with_expected_size(tiny_model, tmp_path):
  logits_fn, v, x = tiny_model
  maps = explain.four_maps(KEY, logits_fn, v, x, jnp.array([0, 1]), 0.9)
  paths = explain.plot_gradients([("a", {"x": x, **maps}), ("b", {"x": x, **maps})],
                                 str(tmp_path))
  from PIL import Image
  with Image.open(paths[0]) as img:
    w, h = img.size
  assert w > 6 * 100 and h > 4 * 100  # 6 columns x (2 models x 2 images)
  tiles = explain.first_layer_filters(v)
  assert tiles.shape == (4, 3, 3, 3) and tiles.min() == 0 and tiles.max() == 1
  full = explain.first_layer_filters(models.resnet(20, 10).init(KEY, jnp.zeros((1, 8, 8, 3))))
  assert full.shape == (16, 3, 3, 3)
  paths = explain.plot_filters([("n", full), ("f", full), ("r", full)], str(tmp_path))
  with Image.open(paths[0]) as img:
    w2, h2 = img.size
  assert w2 > 3 * h2 and os.path.exists(paths[1])


def test_explain_cli_on_trained_checkpoint(tiny_workdir, tmp_path):
  assert explain.main(["--workdirs", tiny_workdir, tiny_workdir, "--out", str(tmp_path),
                       "--num_images", "2", "--num_examples", "16", "--batch_size", "8"]) == 0
  rows = files.read_jsonl(str(tmp_path / "gradient_mass.jsonl"))
  assert len(rows) == 2 and 0 <= rows[0]["kept_mass_fraction"] <= 1
  assert (tmp_path / "gradients.png").exists() and (tmp_path / "filters.svg").exists()
