"""The fused convolution + inference batch norm + residual + ReLU
(dropjax.xla_cpu.conv_norm, the native kernel's epilogue), against independent
references: NumPy for the kernel, XLA's ops for the gradients, the plain
module composition for the model."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import conv_reference
from dropjax import backend, models
from dropjax.xla_cpu import batch_norm, conv, conv_norm, native

needs_native = pytest.mark.skipif(
    not native.load(), reason=f"native kernel unavailable here: {native.unavailable_reason()}")
needs_avx512 = pytest.mark.skipif(not (native.load() and native.has_avx512()),
                                  reason="the AVX-512 tiles need a CPU with AVX-512F")

OPTS = conv.ConvOptions(native_forward=True, native_weight_grad=True)
NO_RESIDUAL = jnp.zeros((0,), jnp.float32)

# (x shape, kernel, strides, pads)
CASES = [
    ((3, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),     # the stem: 3 input channels
    ((2, 9, 7, 7), (3, 3), (1, 1), ((1, 1), (1, 1))),     # odd sizes: tiles wrap rows
    ((2, 2, 2, 5), (3, 3), (1, 1), ((1, 1), (1, 1))),     # fewer positions than a tile
    ((2, 8, 8, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),    # the stride-2 block entry
    ((2, 4, 16, 16), (3, 3), (1, 1), ((1, 1), (1, 1))),   # AVX-512 row tiles
]


def _operands(x_shape, kernel, strides, pads, cout, residual, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(k[0], x_shape)
  w = jax.random.normal(k[1], kernel + (x_shape[-1], cout)) * 0.3
  scale = jax.random.uniform(k[2], (cout,), minval=0.5, maxval=1.5)
  shift = jax.random.normal(k[3], (cout,))
  ho = (x_shape[1] + sum(pads[0]) - kernel[0]) // strides[0] + 1
  wo = (x_shape[2] + sum(pads[1]) - kernel[1]) // strides[1] + 1
  res = jax.random.normal(k[4], (x_shape[0], ho, wo, cout)) if residual else NO_RESIDUAL
  return x, w, scale, shift, res


def _numpy_reference(x, w, scale, shift, res, strides, pads, relu):
  y = conv_reference(x, w, strides, pads) * np.float64(scale) + np.float64(shift)
  if res.size:
    y = y + np.asarray(res, np.float64)
  return np.maximum(y, 0) if relu else y


@needs_native
@pytest.mark.parametrize("x_shape,kernel,strides,pads", CASES)
@pytest.mark.parametrize("cout", [3, 40])  # a partial block; 2.5 blocks of 16
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False),
                                           (False, False)])
def test_fused_kernel_matches_reference(x_shape, kernel, strides, pads, cout, residual, relu):
  ops = _operands(x_shape, kernel, strides, pads, cout, residual)
  f = jax.jit(conv_norm.conv_affine, static_argnums=(5, 6, 7, 8))
  got = np.asarray(f(*ops, strides, pads, relu, OPTS))
  np.testing.assert_allclose(got, _numpy_reference(*ops, strides, pads, relu),
                             rtol=1e-5, atol=1e-4)
  if relu:
    assert (got >= 0).all()


@needs_avx512
@pytest.mark.parametrize("x_shape,kernel,strides,pads", CASES)
@pytest.mark.parametrize("cout", [3, 16, 32, 40, 48])
def test_fused_avx512_tiles_equal_avx2_bit_for_bit(x_shape, kernel, strides, pads, cout):
  """Both tile sets apply the epilogue's FMA, add and max in the same order."""
  ops = _operands(x_shape, kernel, strides, pads, cout, residual=True, seed=1)
  f = jax.jit(conv_norm.conv_affine, static_argnums=(5, 6, 7, 8))
  wide = f(*ops, strides, pads, True, conv.ConvOptions(native_forward=True, native_avx512=True))
  narrow = f(*ops, strides, pads, True, conv.ConvOptions(native_forward=True))
  np.testing.assert_array_equal(np.asarray(wide), np.asarray(narrow))


@needs_native
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("relu", [True, False])
def test_fused_gradients_equal_xlas(strides, relu):
  """Every argument's cotangent from the custom VJP equals autodiff of XLA's ops;
  an input-only gradient (an attack's) forms no weight gradient."""
  pads = ((1, 1), (1, 1))
  ops = _operands((2, 8, 8, 16), (3, 3), strides, pads, 32, residual=True, seed=2)

  def loss(fn):  # non-linear, so the output gradient differs per position and channel
    return lambda *a: jnp.sum(jnp.sin(fn(*a)))

  fused = loss(lambda *a: conv_norm.conv_affine(*a, strides, pads, relu, OPTS))
  ref = loss(lambda *a: conv_norm.reference(*a, strides, pads, relu))
  got = jax.jit(jax.grad(fused, argnums=(0, 1, 2, 3, 4)))(*ops)
  want = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3, 4)))(*ops)
  for name, a, b in zip(("x", "w", "scale", "shift", "residual"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4, err_msg=name)
  dx_only = jax.jit(jax.grad(fused))
  np.testing.assert_allclose(np.asarray(dx_only(*ops)), np.asarray(want[0]),
                             rtol=2e-4, atol=2e-4)
  program = dx_only.lower(*ops).as_text()
  assert native.FUSED_TARGET in program and native.TARGET not in program


@needs_native
def test_fused_under_vmap():
  """vmap over images (the EOT masks) folds into one fused call, with a shared or
  a per-image residual; a per-example kernel falls back to XLA's ops."""
  pads, strides = ((1, 1), (1, 1)), (1, 1)
  x, w, scale, shift, res = _operands((2, 6, 6, 4), (3, 3), strides, pads, 8, residual=True)
  xs = jnp.stack([x, -x, 2 * x])
  res_b = jnp.stack([res, res + 1, -res])
  f = lambda a, b, r: conv_norm.conv_affine(a, b, scale, shift, r, strides, pads, True, OPTS)
  for r_axis, r in ((0, res_b), (None, res)):
    batched = jax.jit(jax.vmap(f, (0, None, r_axis)))
    got = batched(xs, w, r)
    assert batched.lower(xs, w, r).as_text().count(native.FUSED_TARGET) == 1
    for i in range(3):
      ri = r[i] if r_axis == 0 else r
      np.testing.assert_allclose(np.asarray(got[i]),
                                 _numpy_reference(xs[i], w, scale, shift, ri, strides, pads, True),
                                 rtol=1e-5, atol=1e-4)
  ws = jnp.stack([w, 2 * w, -w])
  per_example = jax.jit(jax.vmap(f, (0, 0, 0)))(xs, ws, res_b)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(per_example[i]),
                               _numpy_reference(xs[i], ws[i], scale, shift, res_b[i], strides,
                                                pads, True), rtol=1e-5, atol=1e-4)


def _model_pair(depth=8, width=16):
  """The inference model with the fused layer and with the plain composition,
  and variables with non-trivial batch statistics."""
  layers = backend.resolve("cpu", 1, env={}).layers(train=False)
  assert layers.conv_norm_act is not models.conv_norm_act
  fused = models.resnet(depth, 10, width=width, **layers.as_kwargs())
  plain = models.resnet(depth, 10, width=width,
                        **{**layers.as_kwargs(), "conv_norm_act": models.conv_norm_act})
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 16, 16, 3), minval=-1, maxval=1)
  v = plain.init(jax.random.PRNGKey(4), x)
  v_fused = fused.init(jax.random.PRNGKey(4), x)  # initialization composes the modules
  assert jax.tree.structure(v) == jax.tree.structure(v_fused)
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_fused)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: (0.1 * jax.random.normal(jax.random.PRNGKey(len(str(path))), a.shape)
                       if "mean" in str(path[-1]) else
                       jax.random.uniform(jax.random.PRNGKey(len(str(path))), a.shape,
                                          minval=0.5, maxval=1.5)), v["batch_stats"])
  params = jax.tree.map(lambda a: a * 1.0, v["params"])
  return fused, plain, {"params": params, "batch_stats": stats}, x


@needs_native
def test_model_fused_equals_composition():
  """The inference ResNet through the fused layer: the plain composition's
  logits, input gradient (also vmapped over masks, as EOT takes it) and
  parameter gradients; every convolution is a fused call."""
  fused, plain, v, x = _model_pair()
  logits = {m: jax.jit(lambda x, m=m: m.apply(v, x))(x) for m in (fused, plain)}
  assert float(jnp.abs(logits[plain]).max()) > 0.1  # the check is not vacuous
  np.testing.assert_allclose(np.asarray(logits[fused]), np.asarray(logits[plain]),
                             rtol=1e-5, atol=1e-5)
  program = jax.jit(lambda x: fused.apply(v, x)).lower(x).as_text()
  assert program.count(native.FUSED_TARGET) == 7  # stem + 3 blocks x 2 (ResNet-8)

  keep = jax.random.bernoulli(jax.random.PRNGKey(5), 0.7, (3,) + x.shape[:3] + (1,))
  def input_grads(m):
    g = jax.grad(lambda x, k: jnp.sum(jnp.sin(m.apply(v, x, keep=k))))
    return jax.jit(g)(x, keep[0]), jax.jit(jax.vmap(g, (None, 0)))(x, keep)
  for a, b in zip(input_grads(fused), input_grads(plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

  def param_grads(m):
    return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(
        m.apply({"params": p, "batch_stats": v["batch_stats"]}, x)))))(v["params"])
  for a, b in zip(jax.tree.leaves(param_grads(fused)), jax.tree.leaves(param_grads(plain))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@needs_native
def test_fused_layer_falls_back_where_it_does_not_apply():
  """Training-mode batch norm, bfloat16 and flax options the kernel does not
  take compose the modules: the plain layer's values, no fused call."""
  fused, plain, v, x = _model_pair()
  train = lambda m: jax.jit(lambda x: m.apply(v, x, train=True, mutable=["batch_stats"]))
  out_f, out_p = train(fused)(x), train(plain)(x)
  for a, b in zip(jax.tree.leaves(out_f), jax.tree.leaves(out_p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert native.FUSED_TARGET not in train(fused).lower(x).as_text()

  layer = backend.resolve("cpu", 1, env={}).layers(train=False).conv_norm_act

  class Unit(nn.Module):
    norm: object
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
      return layer(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                           dtype=self.dtype), self.norm(use_running_average=True), x)

  xs = x[..., :3]
  for norm, dtype in ((nn.BatchNorm, jnp.bfloat16),
                      (lambda **kw: nn.BatchNorm(use_scale=False, **kw), jnp.float32)):
    unit = Unit(norm, dtype)
    variables = unit.init(jax.random.PRNGKey(0), xs)
    fn = jax.jit(lambda x, unit=unit, variables=variables: unit.apply(variables, x))
    assert native.FUSED_TARGET not in fn.lower(xs).as_text()

  # A user's own convolution (a subclass, or another conv_general_dilated) is
  # called as it is, never replaced by the kernel's plain convolution.
  class Doubled(nn.Conv):
    def __call__(self, inputs):
      return 2 * super().__call__(inputs)

  doubled = lambda *a, **kw: 2 * jax.lax.conv_general_dilated(*a, **kw)
  for conv_cls in (Doubled, functools.partial(nn.Conv, conv_general_dilated=doubled)):
    user = models.resnet(8, 10, width=16, conv=conv_cls, norm=nn.BatchNorm,
                         conv_norm_act=layer)
    ref = models.resnet(8, 10, width=16, conv=conv_cls, norm=nn.BatchNorm)
    variables = ref.init(jax.random.PRNGKey(0), x)
    fn = jax.jit(lambda x, m=user, variables=variables: m.apply(variables, x))
    assert native.FUSED_TARGET not in fn.lower(x).as_text()
    np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(ref.apply(variables, x)),
                               rtol=1e-5, atol=1e-5)
  unit = Unit(nn.BatchNorm)  # flax's own BatchNorm with both parameters: fused
  variables = unit.init(jax.random.PRNGKey(0), xs)
  fn = jax.jit(lambda x: unit.apply(variables, x))
  assert native.FUSED_TARGET in fn.lower(xs).as_text()
  ref = jax.nn.relu(nn.BatchNorm(use_running_average=True).apply(
      {"params": variables["params"]["BatchNorm_0"],
       "batch_stats": variables["batch_stats"]["BatchNorm_0"]},
      jax.lax.conv_general_dilated(xs, variables["params"]["Conv_0"]["kernel"], (1, 1),
                                   ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  np.testing.assert_allclose(np.asarray(fn(xs)), np.asarray(ref), rtol=1e-5, atol=1e-5)


@needs_native
def test_fused_kernel_rejects_bad_operands():
  x, w, scale, shift, res = _operands((2, 6, 6, 4), (3, 3), (1, 1), ((1, 1), (1, 1)), 8, True)
  # pylint: disable-next=protected-access
  call = conv_norm._fused_fn((1, 1), ((1, 1), (1, 1)), True, False)
  with pytest.raises(Exception, match="one value per output channel"):
    jax.block_until_ready(call(x, w, scale[:4], shift, res))
  with pytest.raises(Exception, match="residual must have the output's shape"):
    jax.block_until_ready(call(x, w, scale, shift, res[:1]))
  with pytest.raises(ValueError, match="native forward"):
    conv_norm.make_conv_norm_act(conv.ConvOptions())


def test_backend_passes_the_fused_layer_to_inference_only():
  on = backend.resolve("cpu", 1, env={})
  # training: the norm adds the residual and applies the ReLU (test_batch_norm.py)
  assert on.layers(train=True).conv_norm_act is batch_norm.conv_norm_act
  assert on.describe()["fused_conv_norm"] == native.load()
  assert (on.layers(train=False).conv_norm_act is not models.conv_norm_act) == native.load()
  for env in ({"DROPJAX_FUSED_CONV_NORM": "0"}, {"DROPJAX_NATIVE_FORWARD": "0"}):
    off = backend.resolve("cpu", 1, env=env)
    assert off.layers(train=False).conv_norm_act is models.conv_norm_act
    assert not off.describe()["fused_conv_norm"]
  assert backend.resolve("gpu", 1, env={}).layers(train=False).conv_norm_act is (
      models.conv_norm_act)
