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
  np.testing.assert_array_equal(masks.drop_many(KEY, x, 0.5, 10), many)
  assert len({np.asarray(m).tobytes() for m in many}) == 10


def test_rates_sampler_uniform():
  r = masks.sample_drop_rates(KEY, 20000)
  assert r.shape == (20000,)
  assert float(r.min()) >= 0 and float(r.max()) < 1
  assert abs(float(r.mean()) - 0.5) < 0.01


@pytest.mark.parametrize("rate,msg", [
    (-0.1, r"\[0, 1\]"), (1.5, r"\[0, 1\]"), (float("nan"), "NaN"),
    (np.zeros((5,)), "prefix"), (np.zeros((4, 2)), "prefix")])
def test_bad_rate_raises(rate, msg):
  with pytest.raises(ValueError, match=msg):
    masks.drop_pixels(KEY, images(), rate)


def test_bad_image_shape_raises():
  with pytest.raises(ValueError, match="H, W, C"):
    masks.drop_pixels(KEY, jnp.ones((8, 8)), 0.5)
