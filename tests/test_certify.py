"""Randomized-ablation certification (dropjax.certify) and exact-k ablation."""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropjax import certify, models, masks

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("d,k", [(10, 3), (16, 5), (30, 1), (12, 12)])
def test_delta_equals_exact_integer_binomials(d, k):
  for rho in range(0, d + 1):
    exact = 1 - Fraction(math.comb(d - rho, k), math.comb(d, k)) if rho <= d else 1
    assert abs(certify.delta(rho, d, k) - float(exact)) < 1e-12, (rho, d, k)


def test_clopper_pearson_against_reference_values():
  # References: the alpha-quantile of Beta(s, n - s + 1) (scipy.stats.beta.ppf,
  # computed once), and the closed forms at s = 0 and s = n.
  assert abs(certify.clopper_pearson_lower(9000, 10_000, 0.05) - 0.8949288834127698) < 1e-9
  assert abs(certify.clopper_pearson_lower(5100, 10_000, 0.05) - 0.5017259958859402) < 1e-9
  assert abs(certify.clopper_pearson_lower(37, 100, 0.001) - 0.22865237841951858) < 1e-9
  assert certify.clopper_pearson_lower(0, 50, 0.05) == 0.0
  assert certify.clopper_pearson_lower(50, 50, 0.05) == pytest.approx(0.05 ** (1 / 50))


def test_always_right_classifier_reaches_the_ceiling():
  """d = 1024, k = 75, n = 10,000, alpha = 0.05: all votes for the right class
  give p_lower = 0.05 ** 1e-4, and the radius is the largest rho with
  C(1024 - rho, 75) / C(1024, 75) > 1/2 + (1 - p_lower), computed here with
  exact integers."""
  p_lower = certify.clopper_pearson_lower(10_000, 10_000, 0.05)
  assert p_lower == pytest.approx(0.05 ** 1e-4)
  need = Fraction(1, 2) + (1 - Fraction(p_lower))
  ceiling = max(rho for rho in range(0, 1024 - 75 + 1)
                if Fraction(math.comb(1024 - rho, 75), math.comb(1024, 75)) > need)
  assert ceiling == 9  # a small number of pixels, as the issue says
  assert certify.certified_radius(p_lower, 1024, 75) == ceiling


def test_abstains_when_votes_split_evenly():
  p = certify.clopper_pearson_lower(5000, 10_000, 0.05)
  assert p < 0.5
  assert certify.certified_radius(p, 1024, 75) == -1


@pytest.mark.parametrize("shape,keep", [((4, 8, 8, 3), 10), ((2, 5, 7, 1), 30),
                                        ((2, 5, 7, 1), 35), ((3, 4, 4, 2), 0)])
def test_exact_k_ablation_keeps_exactly_k_pixels(shape, keep):
  m = np.asarray(masks.ablation_mask(KEY, shape, keep))
  np.testing.assert_array_equal(m, np.broadcast_to(m[..., :1], m.shape))  # whole pixels
  assert set(np.unique(m)) <= {0.0, 1.0}
  np.testing.assert_array_equal(m[..., 0].sum(axis=(-2, -1)), keep)
  if 0 < keep < shape[1] * shape[2]:
    assert len({m[i].tobytes() for i in range(shape[0])}) == shape[0]  # a subset per image


def test_ablation_is_uniform_over_pixels():
  m = np.asarray(masks.ablation_mask(KEY, (4000, 4, 4, 1), 4))[..., 0]
  freq = m.reshape(4000, 16).mean(0)  # each pixel kept with probability 4/16
  assert np.all(np.abs(freq - 0.25) < 0.03)


def test_ablate_and_the_doubled_encoding():
  x = jax.random.uniform(KEY, (2, 8, 8, 3), minval=-1, maxval=1)
  z, keep = masks.ablate(KEY, x, 20)
  m = masks.ablation_mask(KEY, x.shape, 20)
  np.testing.assert_array_equal(z, x * m)
  np.testing.assert_array_equal(keep, m[..., :1])
  dbl = np.asarray(models.encode_doubled(x, keep))
  assert dbl.shape == (2, 8, 8, 6)
  kept = np.asarray(m[..., 0]) == 1
  v = (np.asarray(x) + 1) / 2
  np.testing.assert_allclose(dbl[kept][:, :3] + dbl[kept][:, 3:], 1.0, rtol=1e-6)  # [v, 1-v]
  np.testing.assert_allclose(dbl[kept][:, :3], v[kept], rtol=1e-6)
  assert np.all(dbl[~kept] == 0)  # ablated: [0, 0], distinct from any real value
  # A real pixel is never [0, 0]: its two halves sum to 1.
  np.testing.assert_allclose(np.asarray(models.encode_doubled(x)).reshape(-1, 2, 3).sum(1), 1,
                             rtol=1e-6)


def test_doubled_model_has_a_six_channel_stem_and_sees_the_mask():
  model = models.resnet(8, 5, width=4, input_encoding="doubled")
  x = jax.random.uniform(KEY, (3, 8, 8, 3), minval=-1, maxval=1)
  variables = model.init(KEY, x)
  assert variables["params"]["stem"]["kernel"].shape == (3, 3, 6, 4)
  z, keep = masks.ablate(KEY, x, 10)
  # Same kept values, different masks: a values model cannot tell them apart when
  # the ablated pixels happen to be 0; the doubled model can.
  zero_img = jnp.zeros_like(x)
  plain = models.resnet(8, 5, width=4)
  pv = plain.init(KEY, x)
  np.testing.assert_array_equal(plain.apply(pv, zero_img, keep=keep), plain.apply(pv, zero_img))
  assert not np.allclose(model.apply(variables, zero_img, keep=keep),
                         model.apply(variables, zero_img))
  with pytest.raises(ValueError, match="unknown input encoding"):
    models.resnet(8, 5, input_encoding="median").init(KEY, x)


def test_mean_encoding_shows_ablated_pixels_as_the_fill():
  """Levine & Feizi's mean encoding: kept pixels as they are, ablated ones at
  the per-channel fill; a mean-encoding model equals the plain model (same
  parameters, 3-channel stem) on the filled image."""
  x = jax.random.uniform(KEY, (3, 8, 8, 3), minval=-1, maxval=1)
  fill = (-0.1, 0.2, -0.3)
  z, keep = masks.ablate(KEY, x, 10)
  filled = np.asarray(models.encode_mean(z, keep, fill))
  kept = np.broadcast_to(np.asarray(keep, bool), x.shape)
  np.testing.assert_array_equal(filled[kept], np.asarray(x)[kept])
  np.testing.assert_array_equal(filled[~kept], np.broadcast_to(np.float32(fill), x.shape)[~kept])
  np.testing.assert_array_equal(np.asarray(models.encode_mean(x, None, fill)), np.asarray(x))
  model = models.resnet(8, 5, width=4, input_encoding="mean", fill=fill)
  plain = models.resnet(8, 5, width=4)
  variables = model.init(KEY, x)
  assert variables["params"]["stem"]["kernel"].shape == (3, 3, 3, 4)
  np.testing.assert_allclose(np.asarray(model.apply(variables, z, keep=keep)),
                             np.asarray(plain.apply(variables, jnp.asarray(filled))),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="one fill value per channel"):
    models.resnet(8, 5, input_encoding="mean", fill=(0.0,)).init(KEY, x)


def test_ablation_drop_spec_is_one_vocabulary():
  spec = masks.DropSpec.ablation(12)
  assert spec.drops and spec.describe() == "k = 12 pixels kept"
  m = np.asarray(masks.spec_mask(KEY, spec, (5, 6, 6, 3)))
  np.testing.assert_array_equal(m[..., 0].sum((1, 2)), 12)
  np.testing.assert_array_equal(m, masks.ablation_mask(KEY, (5, 6, 6, 3), 12))
  with pytest.raises(ValueError, match="at least one pixel"):
    masks.DropSpec("ablate", keep=0)


def _class_of_brightness(v, x, keep=None):
  """A fixed classifier: class 1 when the kept pixels are mostly bright."""
  s = jnp.sum(x, axis=(1, 2, 3))
  return jnp.stack([-s, s], -1) * v


def test_certify_end_to_end_is_deterministic_and_sound():
  x = jnp.concatenate([jnp.full((2, 8, 8, 3), 0.8), jnp.full((1, 8, 8, 3), -0.8),
                       jax.random.uniform(KEY, (1, 8, 8, 3), minval=-1, maxval=1) * 0.01])
  cfg = certify.CertifyConfig(keep=8, n0=20, n=400, alpha=0.05, samples_per_pass=50)
  run = certify.make_certify(_class_of_brightness, cfg)
  a = run(KEY, 1.0, x)
  b = run(KEY, 1.0, x)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # The bright and dark images: every ablated sample votes the same class.
  np.testing.assert_array_equal(a["prediction"][:3], [1, 1, 0])
  assert np.all(a["votes_top"][:3] == 400) and np.all(a["votes_n"] == 400)
  want = certify.certified_radius(0.05 ** (1 / 400), 64, 8)
  np.testing.assert_array_equal(a["radius"][:3], want)
  # Per-image randomness comes from the example index: the same image at index 0
  # alone gets the votes it got in the batch.
  alone = run(KEY, 1.0, x[:1], index=[0])
  np.testing.assert_array_equal(alone["votes_top"], a["votes_top"][:1])
  with pytest.raises(ValueError, match="exceeds"):
    certify.make_certify(_class_of_brightness, cfg.__class__(keep=65, n0=1, n=1))(KEY, 1.0, x)


def test_votes_depend_on_the_key_and_the_index_only():
  """A classifier that reads where the kept pixels are: its votes change with the
  key, not with the batch the image is in."""
  def left_half(v, x, keep):
    s = keep[..., :4, 0].sum((1, 2)) - keep[..., 4:, 0].sum((1, 2))
    return jnp.stack([-s, s], -1)

  cfg = certify.CertifyConfig(keep=8, n0=1, n=200, samples_per_pass=50)
  count = certify.make_vote_counter(left_half, cfg)
  x = jnp.zeros((3, 8, 8, 3))
  a = np.asarray(count(KEY, None, x, 200))
  b = np.asarray(count(jax.random.PRNGKey(1), None, x, 200))
  assert a.sum() == b.sum() == 3 * 200
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(count(KEY, None, x[1:2], 200, index=[1])), a[1:2])
  assert len({tuple(r) for r in a}) > 1  # each image its own samples
