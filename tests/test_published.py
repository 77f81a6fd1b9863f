"""Published PyTorch CIFAR ResNet weights as dropjax variables (dropjax.published)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropjax import models, published
from test_models import torch_name_to_flax, torch_state_dict_names


def torch_layout(variables, depth, num_classes, prefix=""):
  """An independent inverse: the reference's state dict (OIHW, (out, in)) of
  dropjax ``variables``, by the name table of test_models."""
  sd = {}
  for name in torch_state_dict_names(depth, num_classes):
    coll, path = torch_name_to_flax(name)
    leaf = variables[coll]
    for p in path:
      leaf = leaf[p]
    leaf = np.asarray(leaf)
    sd[prefix + name] = (np.transpose(leaf, (3, 2, 0, 1)) if leaf.ndim == 4
                         else leaf.T if leaf.ndim == 2 else leaf)
  return sd


@pytest.mark.parametrize("depth,num_classes", [(20, 10), (56, 43)])
def test_a_state_dict_round_trips_to_the_same_variables_and_logits(depth, num_classes):
  model = models.resnet(depth, num_classes)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  v = model.init(jax.random.key(0), x)
  # Non-trivial running statistics, so that a swapped mean / var would show.
  v = {"params": v["params"], "batch_stats": jax.tree.map(
      lambda a: a + jax.random.uniform(jax.random.key(a.size), a.shape), v["batch_stats"])}
  sd = torch_layout(v, depth, num_classes, prefix="module.")
  sd["module.bn1.num_batches_tracked"] = np.array(7)
  got = published.variables_from_state_dict(sd)
  assert published.architecture(got) == (depth, num_classes)
  assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(np.asarray, v))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v)):
    np.testing.assert_array_equal(a, np.asarray(b))
  np.testing.assert_array_equal(model.apply(got, x), model.apply(v, x))


def test_bad_state_dicts_are_refused_with_the_reason():
  v = models.resnet(20, 10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  sd = torch_layout(v, 20, 10)
  with pytest.raises(ValueError, match="not a tensor"):
    published.variables_from_state_dict({**sd, "fc.weight": np.zeros((10, 64))})
  with pytest.raises(ValueError, match="missing"):
    published.variables_from_state_dict(
        {k: a for k, a in sd.items() if k != "layer2.1.bn2.running_var"})
  with pytest.raises(ValueError, match="OIHW"):
    published.variables_from_state_dict({**sd, "conv1.weight": np.zeros((16, 27))})
  with pytest.raises(ValueError, match="wrong shapes"):
    published.variables_from_state_dict({**sd, "conv1.weight": np.zeros((16, 6, 3, 3))})
  with pytest.raises(ValueError, match="head"):
    published.variables_from_state_dict({k: a for k, a in sd.items() if "linear" not in k})


def test_reference_input_normalizes_per_channel():
  img = np.array([[[[0, 255, 128]]]], np.uint8)
  out = published.reference_input(img)
  want = (np.array([0, 1, 128 / 255]) - published.REFERENCE_MEAN) / published.REFERENCE_STD
  np.testing.assert_allclose(out[0, 0, 0], want, rtol=1e-6)
  assert out.dtype == np.float32
  with pytest.raises(ValueError, match="uint8"):
    published.reference_input(img.astype(np.float32))
