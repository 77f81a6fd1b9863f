import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dropjax import masks

KEY = jax.random.PRNGKey(0)
settings.register_profile("fast", max_examples=15, deadline=None)
settings.load_profile("fast")


def images(shape=(4, 8, 8, 3), seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1, maxval=1)


def test_same_key_same_mask_different_key_different_mask():
  x = images()
  a = masks.drop_pixels(KEY, x, 0.5)
  b = masks.drop_pixels(KEY, x, 0.5)
  c = masks.drop_pixels(jax.random.PRNGKey(1), x, 0.5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@given(rate=st.floats(0.0, 1.0), per_pixel=st.booleans(), seed=st.integers(0, 2**30))
def test_keep_rate_within_binomial_bound(rate, per_pixel, seed):
  shape = (64, 32, 32, 3)
  m = masks.sample_mask(jax.random.PRNGKey(seed), shape, rate, per_pixel=per_pixel)
  n = np.prod(shape[:-1]) if per_pixel else np.prod(shape)
  keep = float(jnp.mean(m))
  sd = np.sqrt(max(rate * (1 - rate), 1e-12) / n)
  assert abs(keep - (1 - rate)) <= 6 * sd + 1e-7


@given(per_pixel=st.booleans())
def test_rate_zero_identity_rate_one_zeros(per_pixel):
  x = images()
  np.testing.assert_array_equal(masks.drop_pixels(KEY, x, 0.0, per_pixel=per_pixel), x)
  np.testing.assert_array_equal(masks.drop_pixels(KEY, x, 1.0, per_pixel=per_pixel),
                                jnp.zeros_like(x))


def test_per_pixel_equal_across_channels_and_per_element_not():
  m = masks.sample_mask(KEY, (8, 16, 16, 3), 0.5, per_pixel=True)
  np.testing.assert_array_equal(m[..., 0], m[..., 1])
  np.testing.assert_array_equal(m[..., 0], m[..., 2])
  m2 = masks.sample_mask(KEY, (8, 16, 16, 3), 0.5, per_pixel=False)
  assert not np.array_equal(m2[..., 0], m2[..., 1])


@given(dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
       shape=st.sampled_from([(8, 8, 3), (2, 8, 8, 3), (2, 3, 5, 7, 1)]))
def test_shape_and_dtype_preserved(dtype, shape):
  x = jnp.ones(shape, dtype)
  y = masks.drop_pixels(KEY, x, 0.3)
  assert y.shape == x.shape and y.dtype == x.dtype


def test_per_example_rates():
  x = jnp.ones((3, 32, 32, 3))
  y = masks.drop_pixels(KEY, x, jnp.array([0.0, 1.0, 0.5]))
  assert float(y[0].mean()) == 1.0
  assert float(y[1].mean()) == 0.0
  assert 0.4 < float(y[2].mean()) < 0.6


def test_jit_and_vmap_over_keys():
  x = images((8, 8, 3))
  f = jax.jit(lambda k, x: masks.drop_pixels(k, x, 0.5))
  keys = jax.random.split(KEY, 10)
  many = jax.vmap(f, (0, None))(keys, x)
  assert many.shape == (10, 8, 8, 3)
  np.testing.assert_array_equal(many[3], f(keys[3], x))
  assert len({np.asarray(m).tobytes() for m in many}) == 10


def test_random_spec_rates_are_uniform_and_fixed_spec_is_constant():
  r = masks.spec_rates(KEY, masks.DropSpec("random"), (20000,))
  assert r.shape == (20000,)
  assert float(r.min()) >= 0 and float(r.max()) < 1
  assert abs(float(r.mean()) - 0.5) < 0.01
  assert abs(float(np.mean(np.asarray(r) < 0.25)) - 0.25) < 0.01  # uniform, not just mean 0.5
  np.testing.assert_array_equal(masks.spec_rates(KEY, masks.DropSpec.fixed(0.3), (4,)),
                                np.full(4, 0.3, np.float32))


def test_spec_mask_is_rate_then_mask():
  """random: per image, the rate from split(key)[0], the Bernoulli mask from
  split(key)[1] at that rate (an independent reference built from the parts);
  fixed: sample_mask with the key itself; none: all ones."""
  shape = (64, 16, 16, 3)
  k_rate, k_mask = jax.random.split(KEY)
  rates = jax.random.uniform(k_rate, (64,))
  u = jax.random.uniform(k_mask, shape)
  want = (u >= rates[:, None, None, None]).astype(np.float32)
  got = masks.spec_mask(KEY, masks.DropSpec("random"), shape)
  np.testing.assert_array_equal(got, want)
  kept = np.asarray(got).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(kept, 1 - np.asarray(rates), atol=0.06)  # each image at its own rate
  np.testing.assert_array_equal(masks.spec_mask(KEY, masks.DropSpec.fixed(0.7), shape),
                                masks.sample_mask(KEY, shape, 0.7))
  np.testing.assert_array_equal(masks.spec_mask(KEY, masks.DropSpec(), shape), np.ones(shape))
  x = images((2, 8, 8, 3))
  np.testing.assert_array_equal(masks.spec_drop(KEY, masks.DropSpec("random"), x),
                                x * masks.spec_mask(KEY, masks.DropSpec("random"), x.shape))


def test_spec_per_pixel_and_vmap_per_example():
  spec = masks.DropSpec("fixed", 0.5, per_pixel=True)
  m = masks.spec_mask(KEY, spec, (4, 8, 8, 3))
  np.testing.assert_array_equal(m, np.broadcast_to(m[..., :1], m.shape))
  keys = jax.random.split(KEY, 4)  # one key per example, rate drawn per example
  per = jax.vmap(lambda k: masks.spec_mask(k, masks.DropSpec("random"), (8, 8, 3)))(keys)
  assert per.shape == (4, 8, 8, 3)
  assert len({float(v) for v in np.asarray(per).mean(axis=(1, 2, 3))}) == 4


@pytest.mark.parametrize("kw,msg", [({"mode": "sometimes"}, "unknown drop mode"),
                                    ({"mode": "fixed", "rate": 1.5}, r"\[0, 1\]")])
def test_bad_spec_raises(kw, msg):
  with pytest.raises(ValueError, match=msg):
    masks.DropSpec(**kw)


@pytest.mark.parametrize("rate,msg", [
    (-0.1, r"\[0, 1\]"), (1.5, r"\[0, 1\]"), (float("nan"), "NaN"),
    (np.zeros((5,)), "prefix"), (np.zeros((4, 2)), "prefix")])
def test_bad_rate_raises(rate, msg):
  with pytest.raises(ValueError, match=msg):
    masks.drop_pixels(KEY, images(), rate)


def test_bad_image_shape_raises():
  with pytest.raises(ValueError, match="H, W, C"):
    masks.drop_pixels(KEY, jnp.ones((8, 8)), 0.5)
