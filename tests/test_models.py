import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_gradients_per_setting
from dropjax import backend, models

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
  import functools
  import flax.linen as nn
  conv = functools.partial(nn.Conv, padding=models.PAD1, use_bias=False)
  block = models.BasicBlock(filters=8, strides=2, conv=conv, norm=lambda: (lambda y: y))
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


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def test_checkpoint_written_before_the_layer_refactor_restores():
  """A checkpoint written by commit 1a819f3 (the model with backend choices
  inside) restores into today's model, plain flax layers or the CPU backend's,
  and computes the logits recorded then."""
  from dropjax.training import checkpoint as ckpt_lib, state as state_lib, step as step_lib
  wd = os.path.join(DATA, "checkpoint_1a819f3")
  expected = np.load(os.path.join(wd, "expected.npz"))
  cfg = ckpt_lib.load_config(wd)
  for layers in (models.ModelLayers(), backend.resolve().layers(train=False)):
    model = state_lib.make_model(cfg, 43, layers)
    tx = state_lib.make_optimizer(cfg, 1)
    template = state_lib.create_state(KEY, model, tx, (32, 32, 3))
    ckpt = ckpt_lib.Checkpointer(wd)
    try:
      state = ckpt.restore(template)
    finally:
      ckpt.close()
    assert int(state.step) == int(expected["step"])
    np.testing.assert_array_equal(state.params["stem"]["kernel"], expected["stem_kernel"])
    logits = step_lib.make_logits_fn(model)(state.variables, jnp.asarray(expected["x"]))
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-4, atol=1e-4)


def torch_state_dict_names(depth: int, num_classes: int) -> dict[str, tuple]:
  """The parameter and buffer names and shapes of the PyTorch reference
  ``resnet{depth}`` (conv weights OIHW, linear (out, in))."""
  n = (depth - 2) // 6
  names = {"conv1.weight": (16, 3, 3, 3)}
  bn = lambda p, c: {f"{p}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}
  names.update(bn("bn1", 16))
  cin = 16
  for s, c in enumerate((16, 32, 64), start=1):
    for b in range(n):
      p = f"layer{s}.{b}"
      names[f"{p}.conv1.weight"] = (c, cin, 3, 3)
      names[f"{p}.conv2.weight"] = (c, c, 3, 3)
      names.update(bn(f"{p}.bn1", c))
      names.update(bn(f"{p}.bn2", c))
      cin = c
  names.update({"linear.weight": (num_classes, 64), "linear.bias": (num_classes,)})
  return names


def torch_name_to_flax(name: str) -> tuple[str, tuple[str, ...]]:
  """(collection, path) of a PyTorch reference name in dropjax's variables."""
  parts = name.split(".")
  leaf = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  if parts[0] == "linear":
    return "params", ("head", "kernel" if parts[1] == "weight" else "bias")
  if parts[0] == "conv1":
    return "params", ("stem", "kernel")
  if parts[0] == "bn1":
    coll = "batch_stats" if parts[1].startswith("running") else "params"
    return coll, ("stem_bn", leaf[parts[1]])
  block = f"stage{parts[0][-1]}_block{int(parts[1]) + 1}"
  layer = {"conv1": "Conv_0", "conv2": "Conv_1",
           "bn1": "BatchNorm_0", "bn2": "BatchNorm_1"}[parts[2]]
  if parts[2].startswith("conv"):
    return "params", (block, layer, "kernel")
  coll = "batch_stats" if parts[3].startswith("running") else "params"
  return coll, (block, layer, leaf[parts[3]])


@pytest.mark.parametrize("depth", [20, 56])
def test_pytorch_reference_names_map_one_to_one(depth):
  """Every tensor of the PyTorch reference's state_dict has exactly one
  variable here with the transposed shape (OIHW -> HWIO, (out, in) -> (in,
  out)), and nothing is left over: published weights load one-to-one."""
  v = jax.eval_shape(lambda: models.resnet(depth, 10).init(KEY, jnp.zeros((1, 32, 32, 3))))
  flat = {(coll, tuple(k.key for k in path)): leaf.shape
          for coll in ("params", "batch_stats")
          for path, leaf in jax.tree_util.tree_flatten_with_path(v[coll])[0]}
  seen = set()
  for name, shape in torch_state_dict_names(depth, 10).items():
    key = torch_name_to_flax(name)
    assert key in flat, (name, key)
    want = shape[::-1] if len(shape) == 2 else (shape[2:] + shape[1::-1] if len(shape) == 4
                                                 else shape)
    assert flat[key] == want, (name, flat[key], want)
    seen.add(key)
  assert seen == set(flat)


def test_backend_layers_compute_what_flax_layers_compute():
  """The CPU backend's layers (native convolutions, fusion barriers, its batch
  norm) give the training-mode outputs, statistics and gradients of plain
  nn.Conv + nn.BatchNorm, up to float32 rounding; same variables."""
  x = jax.random.normal(KEY, (4, 16, 16, 3))
  plain = models.resnet(8, 5, width=8)
  fast = models.resnet(8, 5, width=8, **backend.resolve(num_devices=1).layers(True).as_kwargs())
  v = plain.init(KEY, x)
  assert jax.tree.structure(v) == jax.tree.structure(fast.init(KEY, x))

  def run(m):
    def loss(p):
      out, upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out)), upd
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])

  for a, b in zip(jax.tree.leaves(run(plain)), jax.tree.leaves(run(fast))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
