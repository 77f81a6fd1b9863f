"""The native CPU convolution kernels (dropjax.xla_cpu.native, dropjax.xla_cpu.conv):
the weight gradient and the stride-1 convolution (forward and input gradients),
and the switches dropjax.backend.resolve reads for them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import conv_reference, train_gradients_per_setting
from dropjax import backend, models
from dropjax.xla_cpu import conv, native

DN = ("NHWC", "HWIO", "NHWC")

needs_native = pytest.mark.skipif(
    not native.load(), reason=f"native kernel unavailable here: {native.unavailable_reason()}")
needs_avx512 = pytest.mark.skipif(not (native.load() and native.has_avx512()),
                                  reason="the AVX-512 tiles need a CPU with AVX-512F")

# The convolution with every fast path (what the CPU backend trains with on one device).
FAST = conv.make_conv_general_dilated(
    conv.ConvOptions(native_forward=True, native_weight_grad=True, polyphase=True))
XLA_ONLY_GRADS = conv.make_conv_general_dilated(conv.ConvOptions(polyphase=True))


def _grads(fn, x, w, strides, pads):
  def loss(x, w):  # a non-linear loss, so dy differs per position and channel
    return jnp.sum(jnp.sin(fn(x, w, strides, pads, dimension_numbers=DN)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def _weight_grad_reference(x, dy, kh, kw, strides, pads):
  """dw[a, b, i, o] = sum_{n, p, q} xpad[n, p*s + a, q*s + b, i] dy[n, p, q, o] in NumPy."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  _, ho, wo, _ = dy.shape
  dw = np.zeros((kh, kw, x.shape[-1], dy.shape[-1]))
  for a in range(kh):
    for b in range(kw):
      win = xp[:, a:a + strides[0] * ho:strides[0], b:b + strides[1] * wo:strides[1], :]
      dw[a, b] = np.einsum("nhwi,nhwo->io", win, dy)
  return dw


# Weight-gradient cases: (x shape, kernel size, strides, pads).
WEIGHT_GRAD_CASES = [
    ((3, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),     # stem: 3 input channels
    ((2, 8, 8, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),    # stride-2 block entry
    ((2, 9, 7, 7), (3, 3), (1, 1), ((1, 1), (1, 1))),     # 6 + 1 channel blocks, odd sizes
    ((2, 6, 6, 20), (3, 3), (1, 1), ((1, 1), (1, 1))),    # 6 x 3 + 2, or (AVX-512) 8 + 8 + 4
    ((2, 9, 9, 5), (3, 2), (2, 3), ((0, 2), (2, 0))),     # asymmetric everything
    # AVX-512 tap tiles (stride-1 width, 3 wide): columns where only some taps are valid
    ((2, 5, 6, 9), (3, 3), (1, 1), ((0, 0), (0, 0))),     # no padding: 8 + 1 channels
    ((2, 6, 4, 3), (3, 3), (2, 1), ((2, 1), (0, 2))),     # asymmetric pads, row stride 2
    ((2, 4, 1, 16), (3, 3), (1, 1), ((1, 1), (1, 1))),    # one column: the middle tap only
    ((1, 3, 2, 5), (3, 3), (1, 1), ((1, 1), (3, 0))),     # a tap valid nowhere
]


@needs_native
@pytest.mark.parametrize("shape,kernel,strides,pads", WEIGHT_GRAD_CASES + [
    ((1, 5, 5, 8), (1, 1), (1, 1), ((0, 0), (0, 0))),     # 1x1 kernel
])
@pytest.mark.parametrize("cout", [8, 16, 24])            # 8-wide, 16-wide and mixed tiles
def test_native_weight_grad_matches_reference(shape, kernel, strides, pads, cout):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  dy_shape = lax.conv_general_dilated(x, jnp.zeros(kernel + (shape[-1], cout)), strides,
                                      pads, dimension_numbers=DN).shape
  dy = jax.random.normal(jax.random.PRNGKey(1), dy_shape)
  got = jax.jit(conv.weight_grad, static_argnums=(2, 3, 4))(
      x, dy, kernel + (shape[-1], cout), strides, pads)
  want = _weight_grad_reference(x, dy, *kernel, strides, pads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@needs_avx512
@pytest.mark.parametrize("shape,kernel,strides,pads", WEIGHT_GRAD_CASES)
# 8 (AVX2 tile only), 16, 16 + 8, 32, 32 + 8, 32 + 16, 2 x 32 output channels
@pytest.mark.parametrize("cout", [8, 16, 24, 32, 40, 48, 64])
def test_native_weight_grad_avx512_tiles_equal_avx2_bit_for_bit(shape, kernel, strides, pads,
                                                                cout):
  x = jax.random.normal(jax.random.PRNGKey(2), shape)
  dy_shape = lax.conv_general_dilated(x, jnp.zeros(kernel + (shape[-1], cout)), strides,
                                      pads, dimension_numbers=DN).shape
  dy = jax.random.normal(jax.random.PRNGKey(3), dy_shape)
  f = jax.jit(conv.weight_grad, static_argnums=(2, 3, 4), static_argnames="avx512")
  wide = np.asarray(f(x, dy, kernel + (shape[-1], cout), strides, pads, avx512=True))
  narrow = np.asarray(f(x, dy, kernel + (shape[-1], cout), strides, pads, avx512=False))
  np.testing.assert_array_equal(wide, narrow)
  np.testing.assert_allclose(wide, _weight_grad_reference(x, dy, *kernel, strides, pads),
                             rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_conv_gradients_equal_xla_and_use_the_kernel(strides):
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 6))
  w = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 6, 16))
  pads = ((1, 1), (1, 1))
  out = FAST(x, w, strides, pads, dimension_numbers=DN)
  want = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)  # native forward
  (dx, dw), (rx, rw) = (_grads(FAST, x, w, strides, pads),
                        _grads(lax.conv_general_dilated, x, w, strides, pads))
  # native / polyphase of native; sums of 144 products in another order than XLA's
  # differ by up to ~2e-5 (either order is as far from a float64 sum)
  np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=5e-5)
  np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-4)
  grad_both = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(FAST(
      x, w, strides, pads, dimension_numbers=DN))), argnums=(0, 1)))
  hlo = grad_both.lower(x, w).as_text()
  assert native.TARGET in hlo
  # forward + input gradient (stride 1: one conv; stride 2: 4 phases)
  assert hlo.count(native.FORWARD_TARGET) == (2 if strides == (1, 1) else 5)


@needs_native
def test_native_weight_grad_is_deterministic():
  x = jax.random.normal(jax.random.PRNGKey(4), (16, 16, 16, 16))
  dy = jax.random.normal(jax.random.PRNGKey(5), (16, 16, 16, 32))
  f = jax.jit(conv.weight_grad, static_argnums=(2, 3, 4))
  args = (x, dy, (3, 3, 16, 32), (1, 1), ((1, 1), (1, 1)))
  first = np.asarray(f(*args))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(*args)), first)


@pytest.mark.parametrize("case", ["cout_not_multiple_of_8", "bfloat16", "groups", "dilation"])
def test_unsupported_cases_fall_back_to_xla_exactly(case):
  fn = FAST
  if case == "cout_not_multiple_of_8":  # the forward kernel takes any cout: test dW alone
    fn = conv.make_conv_general_dilated(conv.ConvOptions(native_weight_grad=True))
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.PRNGKey(7), (3, 3, 4, 8))
  kwargs = {}
  if case == "cout_not_multiple_of_8":
    w = w[..., :4]
  elif case == "bfloat16":
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  elif case == "groups":
    w, kwargs = w[:, :, :2], {"feature_group_count": 2}
  else:
    kwargs = {"rhs_dilation": (2, 2)}

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=DN, **kwargs)))
  got = jax.grad(loss(fn), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  hlo = jax.jit(jax.grad(loss(fn), argnums=(0, 1))).lower(x, w).as_text()
  assert native.TARGET not in hlo and native.FORWARD_TARGET not in hlo


@needs_native
def test_model_train_gradients_native_vs_xla(monkeypatch):
  """A training-mode ResNet gives the same loss, gradients and batch statistics
  with the native weight gradient as with XLA's (up to summation order), and
  the native kernel really is in the program only when switched on."""
  results, programs = train_gradients_per_setting(monkeypatch, "DROPJAX_NATIVE_CONV", width=8)
  for a, b in zip(jax.tree.leaves(results["0"]), jax.tree.leaves(results["1"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  assert programs["1"].count(native.TARGET) == 1 + 2 * 3  # every conv of depth 8
  # 7 forward; input gradients: 4 stride-1 convs (the stem's input is not
  # differentiated) and the 2 strided convs, 4 phases each.
  assert programs["1"].count(native.FORWARD_TARGET) == 7 + 4 + 2 * 4
  assert "custom_call" not in programs["0"]


def _choices(num_devices=None, **env):
  return backend.resolve("cpu", num_devices, env=env).describe()


def test_native_kernels_need_one_device_unless_forced():
  assert jax.device_count() == 2  # the test session's two virtual CPU devices
  ok = native.load()
  assert not _choices()["native_weight_grad"]  # two devices: off
  assert _choices(num_devices=1)["native_weight_grad"] == ok
  assert _choices(DROPJAX_NATIVE_CONV="1")["native_weight_grad"] == ok
  assert not _choices(num_devices=1, DROPJAX_NATIVE_CONV="0")["native_weight_grad"]
  assert not _choices(num_devices=1, DROPJAX_CPU_CONV="0")["native_forward"]
  assert not _choices(num_devices=1, DROPJAX_NATIVE="0")["native_kernels"]
  assert "DROPJAX_NATIVE=0" in _choices(num_devices=1, DROPJAX_NATIVE="0")["native_unavailable"]
  gpu = backend.resolve("gpu", 1, env={})
  assert gpu.layers(True) == gpu.layers(False) == models.ModelLayers()  # plain flax layers
  with pytest.raises(ValueError, match="DROPJAX_CPU_CONV must be 0 or 1"):
    backend.resolve("cpu", 1, env={"DROPJAX_CPU_CONV": "yes"})


def test_attack_loops_unroll_only_around_xlas_own_convolutions():
  """XLA:CPU's convolutions lose their fast path in a rolled loop: the attack
  loops are unrolled where they run (fully up to 200 steps, by 10 past), rolled
  around the native kernels and on GPU/TPU; DROPJAX_LOOP_UNROLL decides over both."""
  xla = backend.resolve("cpu", 1, env={"DROPJAX_NATIVE_FORWARD": "0"})
  assert xla.loop_unroll(20) is True and xla.loop_unroll(201) == 10
  assert xla.describe()["unroll_loops"]
  assert backend.resolve("cpu", 2, env={}).loop_unroll(20) is True  # two devices: XLA's
  assert backend.resolve("gpu", 1, env={}).loop_unroll(20) == 1
  with_native = backend.resolve("cpu", 1, env={})
  assert with_native.loop_unroll(20) == (1 if native.load() else True)
  assert with_native.describe()["unroll_loops"] == (not native.load())
  for env, want in (({"DROPJAX_LOOP_UNROLL": "full"}, True), ({"DROPJAX_LOOP_UNROLL": "4"}, 4)):
    for b in (backend.resolve("cpu", 1, env=env), backend.resolve("cpu", 1, env={
        **env, "DROPJAX_NATIVE_FORWARD": "0"}), backend.resolve("gpu", 1, env=env)):
      assert b.loop_unroll(20) == want
  with pytest.raises(ValueError, match="DROPJAX_LOOP_UNROLL must be"):
    backend.resolve("cpu", 1, env={"DROPJAX_LOOP_UNROLL": "lots"})


def _input_grad_reference(dy, w, strides, pads, x_shape):
  """Scatter form in NumPy: every output position adds w @ dy to its window."""
  dy, w = np.asarray(dy, np.float64), np.asarray(w, np.float64)
  (pt, pb), (pl, pr) = pads
  b, h, wd, c = x_shape
  xp = np.zeros((b, h + pt + pb, wd + pl + pr, c))
  _, ho, wo, _ = dy.shape
  for a in range(w.shape[0]):
    for e in range(w.shape[1]):
      xp[:, a:a + strides[0] * ho:strides[0], e:e + strides[1] * wo:strides[1]] += np.einsum(
          "nhwo,io->nhwi", dy, w[a, e])
  return xp[:, pt:pt + h, pl:pl + wd]


@pytest.mark.parametrize("x_shape,kernel,strides,pads", [
    ((2, 8, 8, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),     # the ResNet block entry
    ((2, 9, 9, 3), (3, 3), (3, 3), ((1, 1), (1, 1))),      # stride 3, shifted phases
    ((2, 8, 6, 4), (3, 3), (2, 1), ((0, 2), (2, 1))),      # rectangular stride, odd pads
    ((1, 12, 12, 5), (5, 5), (3, 3), ((2, 0), (1, 1))),    # 5x5 kernel
    ((1, 8, 8, 4), (2, 2), (2, 2), ((0, 0), (0, 0))),      # stride = kernel (no overlap)
])
def test_polyphase_input_grad_matches_reference(x_shape, kernel, strides, pads):
  w = jax.random.normal(jax.random.PRNGKey(8), kernel + (x_shape[-1], 8))
  dy_shape = lax.conv_general_dilated(jnp.zeros(x_shape), w, strides, pads,
                                      dimension_numbers=DN).shape
  dy = jax.random.normal(jax.random.PRNGKey(9), dy_shape)
  got = jax.jit(conv.input_grad_polyphase, static_argnums=(2, 3, 4, 5))(
      dy, w, strides, pads, x_shape, conv.ConvOptions())
  want = _input_grad_reference(dy, w, strides, pads, x_shape)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_strided_conv_gradients_without_polyphase_fall_back_to_xla():
  """Odd input size with stride 2: the polyphase split does not apply, XLA's form does."""
  x = jax.random.normal(jax.random.PRNGKey(10), (2, 7, 7, 4))
  w = jax.random.normal(jax.random.PRNGKey(11), (3, 3, 4, 8))
  (dx, dw), (rx, rw) = (_grads(XLA_ONLY_GRADS, x, w, (2, 2), ((1, 1), (1, 1))),
                        _grads(lax.conv_general_dilated, x, w, (2, 2), ((1, 1), (1, 1))))
  np.testing.assert_array_equal(dx, rx)
  np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-4)


def test_input_only_gradient_never_runs_the_weight_kernel():
  """An attack differentiates the input only: no weight-gradient kernel in the
  program (symbolic zeros), and the input gradient equals XLA's."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = models.resnet(8, 5, width=8).init(jax.random.PRNGKey(1), x)
  grads, programs = {}, {}
  for flag in ("0", "1"):
    layers = backend.resolve("cpu", 1, env={"DROPJAX_CPU_CONV": flag}).layers(train=False)
    model = models.resnet(8, 5, width=8, **layers.as_kwargs())
    fn = jax.jit(jax.grad(lambda x, model=model: jnp.sum(model.apply(variables, x) ** 2)))
    grads[flag], programs[flag] = fn(x), fn.lower(x).as_text()
  np.testing.assert_allclose(grads["1"], grads["0"], rtol=1e-4, atol=1e-5)
  assert native.TARGET not in programs["1"]
  if native.load():  # forward and input gradients: the stride-1 kernel
    assert native.FORWARD_TARGET in programs["1"]
  assert "custom_call" not in programs["0"]


def test_missing_compiler_or_cpu_gives_a_reason(monkeypatch, tmp_path):
  monkeypatch.setattr(native, "_compiler", lambda: None)
  monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
  monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
  monkeypatch.setattr(native, "_state", {})
  assert native.load(tmp_path) is False
  assert "compiler" in native.unavailable_reason()
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setattr(native, "_cpu_flags", lambda: {"sse2"})
  assert native.load(tmp_path) is False
  assert "AVX2" in native.unavailable_reason()


@needs_native
@pytest.mark.parametrize("x_shape,kernel,strides,pads", [
    ((3, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),     # the stem: 3 input channels
    ((2, 9, 7, 7), (3, 3), (1, 1), ((1, 1), (1, 1))),     # odd sizes: tiles wrap rows
    ((2, 5, 6, 4), (3, 2), (1, 1), ((0, 2), (2, 0))),     # asymmetric kernel and pads
    ((2, 2, 2, 5), (3, 3), (1, 1), ((1, 1), (1, 1))),     # fewer than 6 positions
    ((1, 6, 6, 8), (1, 1), (1, 1), ((0, 0), (0, 0))),     # 1x1 kernel
    ((2, 12, 10, 2), (5, 5), (1, 1), ((2, 2), (0, 4))),   # 5x5 kernel, one-sided pads
    ((2, 8, 8, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),    # the stride-2 block entry
    ((2, 9, 8, 3), (3, 2), (3, 2), ((0, 1), (2, 0))),     # strides 3 x 2, unused rows
])
@pytest.mark.parametrize("cout", [3, 16, 40])  # a partial block, one and 2.5 blocks of 16
def test_native_conv_matches_reference(x_shape, kernel, strides, pads, cout):
  x = jax.random.normal(jax.random.PRNGKey(12), x_shape)
  w = jax.random.normal(jax.random.PRNGKey(13), kernel + (x_shape[-1], cout))
  got = jax.jit(conv.native_conv, static_argnums=(2, 3))(x, w, strides, pads)
  np.testing.assert_allclose(np.asarray(got), conv_reference(x, w, strides, pads),
                             rtol=1e-5, atol=1e-4)


@needs_avx512
@pytest.mark.parametrize("x_shape,kernel,strides,pads", [
    ((3, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),     # the stem
    ((2, 9, 7, 7), (3, 3), (1, 1), ((1, 1), (1, 1))),     # 63 positions: 12- and 8-tiles wrap
    ((2, 2, 2, 5), (3, 3), (1, 1), ((1, 1), (1, 1))),     # fewer positions than a tile
    ((2, 12, 10, 2), (5, 5), (1, 1), ((2, 2), (0, 4))),   # 5x5 kernel, one-sided pads
    ((2, 8, 8, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),    # the stride-2 block entry
    ((2, 9, 8, 3), (3, 2), (3, 2), ((0, 1), (2, 0))),     # strides 3 x 2
    # row tiles (a whole output row per tile; input channels and stride compiled in)
    ((2, 16, 16, 16), (3, 3), (1, 1), ((1, 1), (1, 1))),  # 16 channels, stride 1
    ((2, 6, 16, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),    # the stem's 3 channels
    ((2, 4, 16, 32), (3, 3), (1, 1), ((1, 1), (1, 1))),   # 32 channels
    ((2, 4, 8, 64), (3, 3), (1, 1), ((1, 1), (1, 1))),    # 64 channels
    ((2, 8, 16, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),   # stride 2 from 16 channels
    ((2, 8, 16, 32), (3, 3), (2, 2), ((1, 1), (1, 1))),   # stride 2 from 32 channels
    ((2, 6, 16, 16), (5, 5), (1, 1), ((2, 2), (2, 2))),   # 16 channels, no tap sharing
])
# one partial block, one block, a pair, a pair + a partial one, a pair + one block
@pytest.mark.parametrize("cout", [3, 16, 32, 40, 48])
def test_native_conv_avx512_tiles_equal_avx2_bit_for_bit(x_shape, kernel, strides, pads, cout):
  """The AVX-512 tiles (12 x 16 and 8 x 32) run each output's multiply-adds in
  the AVX2 tiles' order: the same values bit for bit, and the reference's."""
  x = jax.random.normal(jax.random.PRNGKey(18), x_shape)
  w = jax.random.normal(jax.random.PRNGKey(19), kernel + (x_shape[-1], cout))
  f = jax.jit(conv.native_conv, static_argnums=(2, 3), static_argnames="avx512")
  wide = np.asarray(f(x, w, strides, pads, avx512=True))
  np.testing.assert_array_equal(wide, np.asarray(f(x, w, strides, pads, avx512=False)))
  np.testing.assert_allclose(wide, conv_reference(x, w, strides, pads), rtol=1e-5, atol=1e-4)


@needs_avx512
def test_model_gradients_avx512_equal_avx2():
  """A ResNet's input gradient (what an attack takes) through either tile set."""
  model_x = jax.random.normal(jax.random.PRNGKey(20), (4, 8, 8, 3))
  kernels = [jax.random.normal(jax.random.PRNGKey(21 + i), (3, 3, c_in, c_out)) * 0.2
             for i, (c_in, c_out) in enumerate([(3, 16), (16, 32), (32, 32)])]

  def loss(x, avx512):
    fn = conv.make_conv_general_dilated(conv.ConvOptions(native_forward=True,
                                                         native_avx512=avx512))
    for k in kernels:
      x = jnp.tanh(fn(x, k, (1, 1), "SAME", dimension_numbers=DN))
    return jnp.sum(x ** 2)

  grads = [np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(model_x, a)) for a in (False, True)]
  np.testing.assert_array_equal(grads[0], grads[1])


@needs_avx512
def test_model_train_gradients_avx512_equal_avx2(monkeypatch):
  """A training step's loss, gradients and batch statistics (forward, input and
  weight gradients by the native kernels) are the same bits with either tile
  set: a run may resume on a machine with the other one exactly."""
  monkeypatch.setenv("DROPJAX_NATIVE_CONV", "1")  # the test session has two devices
  results, programs = train_gradients_per_setting(monkeypatch, "DROPJAX_NATIVE_AVX512",
                                                  width=16)
  for a, b in zip(jax.tree.leaves(results["0"]), jax.tree.leaves(results["1"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for flag, isa in (("0", 2), ("1", 512)):  # the switch reaches every native call
    assert native.TARGET in programs[flag] and native.FORWARD_TARGET in programs[flag]
    calls = programs[flag].count(native.TARGET) + programs[flag].count(native.FORWARD_TARGET)
    assert programs[flag].count(f"isa = {isa} : i64") == calls


@needs_native
def test_native_conv_is_deterministic_and_per_image():
  """Each output is one fixed-order sum: repeated calls agree bit for bit, and
  so does a batch with the same images convolved one at a time."""
  x = jax.random.normal(jax.random.PRNGKey(14), (6, 16, 16, 16))
  w = jax.random.normal(jax.random.PRNGKey(15), (3, 3, 16, 32))
  f = jax.jit(lambda x, w: conv.native_conv(x, w, (1, 1), ((1, 1), (1, 1))))
  first = np.asarray(f(x, w))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(x, w)), first)
  singles = np.concatenate([np.asarray(f(x[i:i + 1], w)) for i in range(6)])
  np.testing.assert_array_equal(singles, first)


@needs_native
def test_native_conv_under_vmap():
  """vmap over images (the EOT masks) folds into one call; a per-example kernel
  falls back to XLA's convolution; both equal the loop over examples."""
  x = jax.random.normal(jax.random.PRNGKey(16), (3, 2, 6, 6, 4))
  w = jax.random.normal(jax.random.PRNGKey(17), (3, 3, 3, 4, 8))
  pads = ((1, 1), (1, 1))
  f = lambda a, b: conv.native_conv(a, b, (1, 1), pads)
  shared = jax.jit(jax.vmap(f, (0, None)))
  got = shared(x, w[0])
  assert shared.lower(x, w[0]).as_text().count(native.FORWARD_TARGET) == 1
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(f(x[i], w[0])))
  per_example = jax.jit(jax.vmap(f))(x, w)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(per_example[i]),
                               conv_reference(x[i], w[i], (1, 1), pads), rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="non-negative"):
    conv.native_conv(x[0], w[0], (1, 1), ((-1, 1), (1, 1)))


def test_native_forward_switches():
  ok = native.load()
  assert _choices(num_devices=1)["native_forward"] == ok
  off = _choices(num_devices=1, DROPJAX_NATIVE_FORWARD="0")
  assert not off["native_forward"]
  assert off["native_weight_grad"] == ok  # dW unaffected
  assert not _choices()["native_forward"]  # two test devices: off unless forced
  assert not _choices(num_devices=1, DROPJAX_POLYPHASE="0")["polyphase"]
  # the AVX-512 tiles: on where the CPU has them, never without the native forward kernel
  assert _choices(num_devices=1)["native_avx512"] == (ok and native.has_avx512())
  assert not _choices(num_devices=1, DROPJAX_NATIVE_AVX512="0")["native_avx512"]
  assert not _choices(num_devices=1, DROPJAX_NATIVE_CONV="0",
                      DROPJAX_NATIVE_AVX512="1")["native_avx512"]


def test_native_avx512_forced_on_a_cpu_without_it_is_an_error(monkeypatch):
  if not native.load():
    pytest.skip(f"native kernel unavailable here: {native.unavailable_reason()}")
  monkeypatch.setattr(native, "has_avx512", lambda: False)
  assert not _choices(num_devices=1, DROPJAX_NATIVE_AVX512="")["native_avx512"]
  with pytest.raises(ValueError, match="AVX-512F"):
    _choices(num_devices=1, DROPJAX_NATIVE_AVX512="1")
