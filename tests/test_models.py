import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_gradients_per_setting
from dropjax import models

KEY = jax.random.PRNGKey(0)


def count(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("depth,expected", [(20, 269_722), (56, 853_018), (110, 1_727_962)])
def test_parameter_counts_match_pytorch_reference(depth, expected):
  # Counts of the standard PyTorch CIFAR ResNets (conv + BN + head, option A).
  m = models.resnet(depth, 10)
  v = jax.eval_shape(lambda: m.init(KEY, jnp.zeros((1, 32, 32, 3))))
  assert count(v) == expected


def torch_conv2d(x, w, stride):
  """Reference: PyTorch conv2d (cross-correlation), padding=1, NHWC / HWIO."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  n, h, wd, c = x.shape
  kh, kw, _, o = w.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((n, oh, ow, o))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
  return out


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_padding_is_symmetric_like_pytorch(stride):
  import flax.linen as nn
  conv = nn.Conv(4, (3, 3), strides=(stride, stride), padding=models.PAD1, use_bias=False)
  x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
  v = conv.init(KEY, x)
  got = conv.apply(v, x)
  want = torch_conv2d(x, np.asarray(v["params"]["kernel"]), stride)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # XLA 'SAME' pads stride-2 convs asymmetrically and would differ.
  if stride == 2:
    same = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", use_bias=False).apply(v, x)
    assert not np.allclose(same, want, atol=1e-3)


def test_option_a_shortcut_subsamples_and_zero_pads():
  block = models.BasicBlock(filters=8, strides=2, norm=lambda: (lambda y: y))
  x = jax.random.normal(KEY, (2, 8, 8, 4))
  v = block.init(KEY, x)
  zero = jax.tree.map(jnp.zeros_like, v)  # residual branch -> 0
  out = block.apply(zero, x)
  want = jax.nn.relu(jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2))))
  np.testing.assert_allclose(out, want)


def test_forward_shapes_num_classes_and_stage_widths():
  m = models.resnet(8, 43)
  x = jnp.zeros((3, 32, 32, 3))
  v = m.init(KEY, x)
  assert m.apply(v, x).shape == (3, 43)
  p = v["params"]
  assert p["stem"]["kernel"].shape == (3, 3, 3, 16)
  assert p["stage2_block1"]["Conv_0"]["kernel"].shape == (3, 3, 16, 32)
  assert p["stage3_block1"]["Conv_1"]["kernel"].shape == (3, 3, 64, 64)
  assert "bias" not in p["stem"]
  assert v["batch_stats"]["stem_bn"]["mean"].shape == (16,)


def test_he_normal_init_scale():
  v = models.resnet(20, 10).init(KEY, jnp.zeros((1, 32, 32, 3)))
  k = v["params"]["stage3_block3"]["Conv_1"]["kernel"]  # fan_in 3*3*64
  assert abs(float(jnp.std(k)) - np.sqrt(2 / (9 * 64))) < 0.01


def test_batchnorm_train_mode_updates_stats_with_pytorch_momentum():
  m = models.resnet(8, 10)
  x = jax.random.normal(KEY, (16, 8, 8, 3)) * 3 + 1
  v = m.init(KEY, x)
  import flax.linen as nn
  _, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
  stem = nn.Conv(16, (3, 3), padding=models.PAD1, use_bias=False).apply(
      {"params": v["params"]["stem"]}, x)
  # PyTorch momentum 0.1: running = 0.9 * 0 + 0.1 * batch mean.
  np.testing.assert_allclose(upd["batch_stats"]["stem_bn"]["mean"],
                             0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_half_precision_computes_bf16_keeps_f32_params():
  m = models.resnet(8, 10, half_precision=True)
  x = jnp.ones((2, 16, 16, 3))
  v = m.init(KEY, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
  out = m.apply(v, x)
  assert out.dtype == jnp.float32
  f32 = models.resnet(8, 10).apply(v, x)
  np.testing.assert_allclose(out, f32, atol=0.1)  # bf16 compute: close, not equal
  jaxpr = str(jax.make_jaxpr(lambda v, x: m.apply(v, x))(v, x))
  assert "bf16" in jaxpr


@pytest.mark.parametrize("depth", [7, 21, 2])
def test_bad_depth_raises(depth):
  with pytest.raises(ValueError, match="6n\\+2"):
    models.resnet(depth, 10).init(KEY, jnp.zeros((1, 8, 8, 3)))


def test_bad_input_rank_raises():
  with pytest.raises(ValueError, match="B, H, W, C"):
    models.resnet(8, 10).init(KEY, jnp.zeros((8, 8, 3)))


def assert_same_up_to_fusion_rounding(a, b):
  """A barrier is an identity, but it changes which ops XLA fuses, and a fused
  ``a * b + c`` may round once (FMA) where an unfused one rounds twice: float32
  results may differ in the last bits, never more."""
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=1e-6)


def test_fusion_barrier_changes_no_numbers_only_the_compiled_program(monkeypatch):
  """Training-mode loss, gradients and batch statistics are the same with and
  without the CPU fusion barrier on the convolution inputs, and the barrier is
  really in the compiled program (as conditionals) only when switched on."""
  results, programs = train_gradients_per_setting(monkeypatch, "DROPJAX_CONV_BARRIER", width=4)
  assert_same_up_to_fusion_rounding(results["0"], results["1"])
  num_convs = 1 + 2 * 3  # stem + two per block, depth 8 = one block per stage
  assert programs["1"].count("stablehlo.case") + programs["1"].count("stablehlo.if") >= num_convs
  assert "stablehlo.case" not in programs["0"] and "stablehlo.if" not in programs["0"]


def test_block_input_barrier_changes_no_numbers_one_per_block(monkeypatch):
  """The residual-stream barrier (each block's input materialized once, for its
  convolution, its shortcut and the backward pass) leaves training numbers the
  same and adds exactly one conditional per block (and one in the backward pass)."""
  monkeypatch.setenv("DROPJAX_CONV_BARRIER", "0")  # only the block barrier varies
  results, programs = train_gradients_per_setting(monkeypatch, "DROPJAX_BLOCK_BARRIER", width=4)
  assert_same_up_to_fusion_rounding(results["0"], results["1"])
  count = lambda p: p.count("stablehlo.case") + p.count("stablehlo.if")
  num_blocks = 3  # depth 8: one block per stage
  assert count(programs["0"]) == 0
  assert count(programs["1"]) == 2 * num_blocks  # each barrier and its transpose
