"""Public boundaries check their contract (dropjax.contracts), and the paper's
code imports nothing backend-specific."""
import ast
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dropjax import defense, masks
from dropjax.attacks import AttackConfig, make_pgd
from dropjax.masks import DropSpec

KEY = jax.random.PRNGKey(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear_logits(v, x):
  return x.reshape(x.shape[0], -1) @ v


V = jax.random.normal(KEY, (4 * 4 * 3, 5))
GOOD = jax.random.uniform(KEY, (3, 4, 4, 3), minval=-1, maxval=1)
LABELS = jnp.array([0, 1, 4])

BAD_IMAGES = [
    (GOOD * 127.5 + 127.5, r"\[-1, 1\].*\[0, 255\]"),       # forgot to scale uint8 images
    (GOOD + 1.5, r"must lie in \[-1, 1\]"),
    (GOOD.at[0, 0, 0, 0].set(jnp.nan), "non-finite"),
    (GOOD.astype(jnp.int32), "float array"),
]


@pytest.mark.parametrize("x,msg", BAD_IMAGES)
def test_bad_images_are_refused_everywhere(x, msg):
  attack = make_pgd(linear_logits, AttackConfig(num_steps=1, eot_samples=0))
  calls = [lambda: masks.spec_drop(KEY, DropSpec.fixed(0.5), x),
           lambda: masks.drop_pixels(KEY, x, 0.5),
           lambda: attack(KEY, V, x, LABELS),
           lambda: defense.mask_average_probs(KEY, linear_logits, V, x, DropSpec.fixed(0.5), 2),
           lambda: defense.masked_probs(KEY, linear_logits, V, x, DropSpec.fixed(0.5))]
  for call in calls:
    with pytest.raises(ValueError, match=msg):
      call()


@pytest.mark.parametrize("y,msg", [(jnp.array([0.0, 1.0, 2.0]), "integer class indices"),
                                   (jnp.array([0, 1, 5]), r"\[0, 5\)"),
                                   (jnp.array([-1, 0, 1]), r"\[0, 5\)"),
                                   (jnp.array([0, 1]), "does not match the batch")])
def test_bad_labels_are_refused_by_the_attack(y, msg):
  attack = make_pgd(linear_logits, AttackConfig(num_steps=1, eot_samples=0))
  with pytest.raises(ValueError, match=msg):
    attack(KEY, V, GOOD, y)
  targeted = make_pgd(linear_logits, AttackConfig(num_steps=1, eot_samples=0, targeted=True))
  if y.shape == LABELS.shape and jnp.issubdtype(y.dtype, jnp.integer):
    with pytest.raises(ValueError, match=msg.replace("labels", "target")):
      targeted(KEY, V, GOOD, LABELS, y)


def test_valid_inputs_pass_and_jit_checks_only_shapes_and_dtypes():
  attack = make_pgd(linear_logits, AttackConfig(num_steps=1, eot_samples=0))
  out = attack(KEY, V, GOOD, LABELS)
  assert out.shape == GOOD.shape
  jitted = jax.jit(attack)
  jitted(KEY, V, GOOD * 3, LABELS)  # values unknown under jit: not checked
  with pytest.raises(ValueError, match="integer class indices"):
    jitted(KEY, V, GOOD, LABELS.astype(jnp.float32))  # dtypes are


# Modules that state the paper's method; they must not depend on a backend.
PAPER_MODULES = ["dropjax/models.py", "dropjax/masks.py", "dropjax/defense.py",
                 "dropjax/objectives.py", "dropjax/attacks/pgd.py", "dropjax/attacks/norms.py",
                 "dropjax/attacks/losses.py", "dropjax/attacks/presets.py", "dropjax/certify.py"]
ALLOWED_ROOTS = {"__future__", "dataclasses", "functools", "math", "typing", "jax", "flax",
                 "numpy", "chex", "dropjax"}
BACKEND_SPECIFIC = ("dropjax.xla_cpu", "dropjax.backend")


@pytest.mark.parametrize("path", PAPER_MODULES)
def test_paper_modules_import_nothing_backend_specific(path):
  tree = ast.parse(pathlib.Path(ROOT, path).read_text())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names.append(node.module or "")
      names += [f"{node.module}.{a.name}" for a in node.names]
  for name in names:
    assert name.split(".")[0] in ALLOWED_ROOTS, (path, name)
    assert not name.startswith(BACKEND_SPECIFIC), (path, name)
  with open(os.path.join(ROOT, path)) as f:
    assert "os.environ" not in f.read()


def test_only_the_backend_reads_performance_switches():
  readers = []
  for base, _, files in os.walk(os.path.join(ROOT, "dropjax")):
    for f in files:
      if f.endswith(".py"):
        text = pathlib.Path(base, f).read_text()
        if any(s in text for s in ('"DROPJAX_NATIVE', '"DROPJAX_CPU_CONV', '"DROPJAX_POLYPHASE',
                                   '"DROPJAX_LOOP_UNROLL', '"DROPJAX_HOST_MALLOC',
                                   '"DROPJAX_CONV_BARRIER', '"DROPJAX_BLOCK_BARRIER',
                                   '"DROPJAX_EOT_IMPL', '"DROPJAX_NO_XLA_DEFAULTS')):
          readers.append(os.path.relpath(os.path.join(base, f), ROOT))
  assert readers == ["dropjax/backend.py"]


def test_importing_and_plotting_change_nothing_in_the_process(tmp_path):
  """Importing the library (its plotting included) and drawing a figure neither
  imports pyplot nor chooses a matplotlib backend, nor sets process flags."""
  code = f"""
import os, sys
import matplotlib
flags = os.environ.get("XLA_FLAGS")
import dropjax, dropjax.plots, dropjax.explain, dropjax.evaluation, dropjax.certification
fig, ax = dropjax.plots.new_figure(figsize=(2, 2))
ax.plot([0, 1], [0, 1])
paths = dropjax.plots.save_figure(fig, {str(tmp_path)!r}, "f")
assert all(os.path.getsize(p) > 0 for p in paths), paths
assert "matplotlib.pyplot" not in sys.modules
assert matplotlib.rcParams._get_backend_or_none() is None
assert os.environ.get("XLA_FLAGS") == flags
print("ok")
"""
  env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "XLA_FLAGS")}
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
