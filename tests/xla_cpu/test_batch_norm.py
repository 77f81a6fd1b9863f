"""dropjax.xla_cpu.batch_norm.BatchNorm is the same layer as flax.linen.BatchNorm."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_gradients_per_setting
from dropjax import backend
from dropjax.xla_cpu import native
from dropjax.xla_cpu import batch_norm
from dropjax.xla_cpu.batch_norm import (BatchNorm, channel_affine, channel_affine_act,
                                        channel_moments, channel_sum, native_channel_sums,
                                        native_norm_act_forward, native_norm_act_grad)


@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 5, 5, 6), (2, 4, 4, 64), (7, 3)])
def test_channel_sum_matches_plain_sum(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  np.testing.assert_allclose(channel_sum(x), x.reshape(-1, shape[-1]).sum(0), rtol=1e-5, atol=1e-5)


def test_custom_vjps_match_autodiff_of_plain_expressions():
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
  x = jax.random.normal(k1, (3, 4, 4, 8))
  a, b = jax.random.normal(k2, (8,)), jax.random.normal(k3, (8,))
  g = jax.random.normal(k4, x.shape)
  plain = lambda x, a, b: jnp.sum((x * a + b) * g)
  ours = lambda x, a, b: jnp.sum(channel_affine(x, a, b) * g)
  for u, v in zip(jax.grad(plain, (0, 1, 2))(x, a, b), jax.grad(ours, (0, 1, 2))(x, a, b)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)

  def plain_m(x):
    m, m2 = jnp.mean(x, (0, 1, 2)), jnp.mean(x * x, (0, 1, 2))
    return jnp.sum(m * a) + jnp.sum(m2 * b)

  def ours_m(x):
    m, m2 = channel_moments(x)
    return jnp.sum(m * a) + jnp.sum(m2 * b)

  np.testing.assert_allclose(jax.grad(plain_m)(x), jax.grad(ours_m)(x), rtol=1e-5, atol=1e-6)


def _pair(**kw):
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, **kw), BatchNorm(momentum=0.9, epsilon=1e-5, **kw)


def test_same_variables_outputs_statistics_and_gradients_as_flax():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(2), (4, 6, 6, 16))
  flax_bn, ours = _pair(use_running_average=False)
  v_flax = flax_bn.init(jax.random.PRNGKey(0), x)
  v_ours = ours.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, v_flax) == jax.tree.map(jnp.shape, v_ours)
  # Non-trivial parameters and statistics.
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {"scale": 1 + 0.1 * jax.random.normal(keys[0], (16,)),
            "bias": jax.random.normal(keys[1], (16,))}
  stats = {"mean": jax.random.normal(keys[2], (16,)),
           "var": 1 + jax.random.uniform(keys[3], (16,))}
  v = {"params": params, "batch_stats": stats}
  y_f, up_f = flax_bn.apply(v, x, mutable=["batch_stats"])
  y_o, up_o = ours.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y_f, y_o, rtol=1e-4, atol=1e-4)
  for name in ("mean", "var"):
    np.testing.assert_allclose(up_f["batch_stats"][name], up_o["batch_stats"][name],
                               rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.PRNGKey(4), x.shape)

  def loss(bn, p, x):
    return jnp.sum(bn.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])[0] * g)

  gf = jax.grad(functools.partial(loss, flax_bn), (0, 1))(params, x)
  go = jax.grad(functools.partial(loss, ours), (0, 1))(params, x)
  for u, w in zip(jax.tree.leaves(gf), jax.tree.leaves(go)):
    np.testing.assert_allclose(u, w, rtol=1e-3, atol=1e-4)
  # Inference mode uses the running statistics.
  flax_eval, ours_eval = _pair(use_running_average=True)
  np.testing.assert_allclose(flax_eval.apply(v, x), ours_eval.apply(v, x), rtol=1e-5, atol=1e-5)


def test_pmap_axis_averages_statistics_like_flax():
  n = jax.local_device_count()
  assert n >= 2, "conftest provides 2 CPU devices"
  scale = jnp.arange(1, n + 1)[:, None, None, None, None]
  x = jax.random.normal(jax.random.PRNGKey(5), (n, 3, 4, 4, 8)) * scale
  flax_bn, ours = _pair(use_running_average=False, axis_name="d")
  v = ours.init(jax.random.PRNGKey(0), x[0])
  run = lambda bn: jax.pmap(lambda x: bn.apply(v, x, mutable=["batch_stats"]), axis_name="d")(x)
  (y_f, s_f), (y_o, s_o) = run(flax_bn), run(ours)
  np.testing.assert_allclose(y_f, y_o, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s_f["batch_stats"]["var"], s_o["batch_stats"]["var"], rtol=1e-5)


needs_native = pytest.mark.skipif(
    not native.load(), reason=f"native kernels unavailable here: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 5, 7), (5000, 16), (2, 33, 64), (9, 1)])
def test_native_channel_sums_match_float64_and_are_deterministic(shape):
  """One pass, float64 accumulation: matches NumPy in float64 to float32
  rounding, also for several parts (5000 rows) and odd channel counts; repeated
  calls agree bit for bit."""
  x = jax.random.normal(jax.random.PRNGKey(3), shape) + 3.0  # a mean, as after a conv
  f = jax.jit(native_channel_sums)
  s, s2 = f(x)
  x64 = np.asarray(x, np.float64).reshape(-1, shape[-1])
  np.testing.assert_allclose(s, x64.sum(0), rtol=2e-6)
  np.testing.assert_allclose(s2, (x64 * x64).sum(0), rtol=2e-6)
  for _ in range(2):
    again = f(x)
    np.testing.assert_array_equal(again[0], s)
    np.testing.assert_array_equal(again[1], s2)


@needs_native
def test_native_moments_in_training_match_xla_and_are_in_the_program(monkeypatch):
  monkeypatch.setenv("DROPJAX_NATIVE_CONV", "1")  # two test devices: force the kernels
  results, programs = train_gradients_per_setting(monkeypatch, "DROPJAX_NATIVE_MOMENTS", width=8)
  # "0" = XLA's moments, "1" (any value but 0) = native: same numbers up to rounding
  for a, b in zip(jax.tree.leaves(results["0"]), jax.tree.leaves(results["1"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  assert programs["1"].count(native.MOMENTS_TARGET) == 7  # every batch norm of depth 8
  assert native.MOMENTS_TARGET not in programs["0"]
  # dropjax's CPU convolutions off: none of the kernels
  assert not backend.resolve("cpu", 1, env={"DROPJAX_CPU_CONV": "0"}).describe()["native_moments"]


def _affine_act_case(shape, seed=6):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  c = shape[-1]
  x = jax.random.normal(k[0], shape) + 0.5
  a, b = jax.random.normal(k[1], (c,)), 0.3 * jax.random.normal(k[2], (c,))
  r = jax.random.normal(k[3], shape)
  ct = jax.random.normal(k[4], shape)
  return x, a, b, r, ct


@pytest.mark.parametrize("use_residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_affine_act_matches_autodiff_of_the_composition(use_residual, relu):
  """XLA's form of the custom VJP (``use_native=False``) against autodiff of
  ``relu(x * a + b + r)`` written with jax.nn.relu (mask 0 at 0)."""
  x, a, b, r, ct = _affine_act_case((3, 5, 5, 8))
  r = r if use_residual else None

  def plain(x, a, b, r):
    y = x * a + b + (0 if r is None else r)
    return jnp.sum((jax.nn.relu(y) if relu else y) * ct)

  ours = lambda x, a, b, r: jnp.sum(channel_affine_act(x, a, b, r, relu, False) * ct)
  np.testing.assert_array_equal(plain(x, a, b, r), plain(x, a, b, r))
  np.testing.assert_allclose(ours(x, a, b, r), plain(x, a, b, r), rtol=1e-6)
  argnums = (0, 1, 2, 3) if use_residual else (0, 1, 2)
  for u, v in zip(jax.grad(plain, argnums)(x, a, b, r), jax.grad(ours, argnums)(x, a, b, r)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 6, 6, 32), (2, 4, 4, 64), (5000, 8),
                                   (3, 5, 7), (9, 1)])
def test_native_norm_act_grad_matches_float64_and_is_deterministic(shape):
  """The masked gradient bit for bit (0 where h <= 0, including h == 0), its sums
  against NumPy in float64 (AVX2 lanes where C % 8 == 0, scalar code else;
  several parts at 5000 rows); repeated calls agree bit for bit."""
  x, a, b, r, dh = _affine_act_case(shape, seed=7)
  h = jnp.maximum(x * a + b + r, 0).at[..., 0].set(0.0)  # exact zeros: masked
  f = jax.jit(native_norm_act_grad)
  g, s, sx = f(dh, h, x)
  g64 = np.where(np.asarray(h) > 0, np.asarray(dh, np.float64), 0.0)
  np.testing.assert_array_equal(g, g64.astype(np.float32))
  c = shape[-1]
  np.testing.assert_allclose(s, g64.reshape(-1, c).sum(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(sx, (g64 * np.asarray(x, np.float64)).reshape(-1, c).sum(0),
                             rtol=1e-5, atol=1e-4)
  for u, v in zip(f(dh, h, x), (g, s, sx)):
    np.testing.assert_array_equal(u, v)


@needs_native
@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (2, 4, 4, 64), (3, 5, 5, 128), (3, 5, 7), (0, 8)])
@pytest.mark.parametrize("use_residual", [False, True])
def test_native_norm_act_forward_matches_xla(shape, use_residual):
  """max(x * a + b + r, 0) against XLA's ops: AVX2 lanes with the per-channel
  values in registers (C % 8 == 0, up to 64), scalar code else, no rows."""
  x, a, b, r, _ = _affine_act_case(shape, seed=9)
  r = r if use_residual else None
  want = jnp.maximum(x * a + b + (0 if r is None else r), 0)
  got = jax.jit(native_norm_act_forward)(x, a, b, r)
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # x * a + b: one FMA here
  assert bool(jnp.all(got >= 0))


@needs_native
def test_native_kernels_reject_mismatched_operands():
  dh = jnp.ones((2, 4, 4, 8))
  with pytest.raises(Exception, match="same size"):
    jax.jit(native_norm_act_grad)(dh, jnp.ones((2, 4, 4, 4)), dh)
  with pytest.raises(Exception, match="one value per channel"):
    jax.jit(native_norm_act_forward)(dh, jnp.ones(4), jnp.ones(8), None)
  with pytest.raises(Exception, match="residual and h must have"):
    jax.jit(native_norm_act_forward)(dh, jnp.ones(8), jnp.ones(8), dh[:1])


@needs_native
@pytest.mark.parametrize("use_residual", [False, True])
def test_affine_act_native_norm_act_matches_xla(use_residual):
  x, a, b, r, ct = _affine_act_case((4, 8, 8, 16))
  r = r if use_residual else None
  grads = {}
  for use_native in (False, True):
    loss = lambda x, a, b, r, n=use_native: jnp.sum(channel_affine_act(x, a, b, r, True, n) * ct)
    grads[use_native] = jax.jit(jax.grad(loss, (0, 1, 2, 3) if use_residual else (0, 1, 2)))(
        x, a, b, r)
  for u, v in zip(grads[False], grads[True]):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("native_norm_act", [False, True])
def test_norm_with_residual_and_relu_equals_the_composition(native_norm_act):
  """``BatchNorm(x, residual, relu=True)`` (the training layer's call) against
  ``relu(BatchNorm(x) + residual)``: values, statistics and gradients, and
  :func:`batch_norm.conv_norm_act` against :func:`dropjax.models.conv_norm_act`,
  also for flax's norm (passed through to the composition)."""
  if native_norm_act and not native.load():
    pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
  from dropjax import models
  x, _, _, r, ct = _affine_act_case((4, 6, 6, 16), seed=8)
  bn = BatchNorm(native_moments=False, native_norm_act=native_norm_act)
  v = bn.init(jax.random.PRNGKey(0), x)

  def composed(p, x, r):
    y, upd = bn.apply({**v, "params": p}, x, mutable=["batch_stats"])
    return jnp.sum(jax.nn.relu(y + r) * ct), upd

  def fused(p, x, r):
    y, upd = bn.apply({**v, "params": p}, x, r, True, mutable=["batch_stats"])
    return jnp.sum(y * ct), upd

  (l1, u1), g1 = jax.value_and_grad(composed, (0, 1, 2), has_aux=True)(v["params"], x, r)
  (l2, u2), g2 = jax.value_and_grad(fused, (0, 1, 2), has_aux=True)(v["params"], x, r)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for u, w in zip(jax.tree.leaves((u1, g1)), jax.tree.leaves((u2, g2))):
    np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-5)

  class Layer(nn.Module):
    norm_cls: type
    fn: object

    @nn.compact
    def __call__(self, x, r):
      return self.fn(nn.Conv(16, (3, 3), use_bias=False), self.norm_cls(), x, r)

  for norm_cls in (functools.partial(BatchNorm, native_norm_act=native_norm_act),
                   functools.partial(nn.BatchNorm, use_running_average=False)):
    plain = Layer(norm_cls, models.conv_norm_act)
    ours = Layer(norm_cls, batch_norm.conv_norm_act)
    lv = plain.init(jax.random.PRNGKey(1), x, r)
    run = lambda m, lv: jax.value_and_grad(
        lambda p: jnp.sum(m.apply({**lv, "params": p}, x, r, mutable=["batch_stats"])[0] * ct))(
            lv["params"])
    for u, w in zip(jax.tree.leaves(run(plain, lv)), jax.tree.leaves(run(ours, lv))):
      np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_norm_act_in_training_matches_xla_and_is_in_the_program(monkeypatch):
  monkeypatch.setenv("DROPJAX_NATIVE_CONV", "1")  # two test devices: force the kernels
  results, programs = train_gradients_per_setting(monkeypatch, "DROPJAX_NATIVE_NORM_ACT",
                                                  width=8)
  for a, b in zip(jax.tree.leaves(results["0"]), jax.tree.leaves(results["1"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  for target in (native.NORM_ACT_TARGET, native.NORM_ACT_GRAD_TARGET):
    assert programs["1"].count(f"@{target}(") == 7, target  # every batch norm of depth 8
    assert target not in programs["0"]
  described = backend.resolve("cpu", 1, env={"DROPJAX_NATIVE_NORM_ACT": "0"}).describe()
  assert not described["native_norm_act"]
  assert backend.resolve("cpu", 1, env={}).describe()["native_norm_act"]
