"""Test setup, before JAX loads: 2 virtual CPU devices (multi-device paths), and XLA's
CPU backend at optimization level 0 (compiling dominates a suite of tiny models)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
# Tiny models run for a few steps, so compiling dominates the suite; XLA's CPU backend
# at optimization level 0 (its LLVM code generation) compiles an attack program ~2x
# faster.  The native kernels are prebuilt, unaffected.  Set the flag yourself to test
# at another level:
#   XLA_FLAGS=--xla_backend_optimization_level=2 python -m pytest -q tests
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dropjax import backend  # noqa: E402

backend.configure_process()  # the CPU XLA defaults, as the entry points apply them
import jax  # noqa: E402
import pytest  # noqa: E402
import tempfile  # noqa: E402

# Identical programs compiled by several tests (each training run builds its
# own step) are compiled once: a persistent cache private to this test session.
_CACHE = tempfile.mkdtemp(prefix="dropjax-jit-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # subprocesses share it
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def pytest_unconfigure(config):
  """The cache goes with the session (~26 MB after a full run)."""
  import shutil
  shutil.rmtree(_CACHE, ignore_errors=True)

# The prepared datasets: $DROPJAX_DATA_DIR, else the repo's .data (where the README's
# quick start unpacks them), so the test command finds them in a fresh shell too.
REAL_DATA_DIR = os.environ.get("DROPJAX_DATA_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".data")


@pytest.fixture(scope="session")
def real_data_dir():
  if not REAL_DATA_DIR or not os.path.isdir(REAL_DATA_DIR):
    pytest.skip("real datasets not prepared: run `python ../shared/datasets/prepare.py .data` "
                "(or set DROPJAX_DATA_DIR)")
  return REAL_DATA_DIR


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.devices()}"


def write_tiny_gtsrb(root, n_train=96, n_test=40, num_labels=4, seed=0):
  """A tiny learnable GTSRB-format npz: class = which quadrant is bright."""
  import numpy as np
  rng = np.random.RandomState(seed)

  def make(n):
    y = rng.randint(0, num_labels, n)
    x = rng.randint(0, 60, (n, 32, 32, 3))
    for i, c in enumerate(y):
      r, q = divmod(int(c), 2)
      x[i, r * 16:(r + 1) * 16, q * 16:(q + 1) * 16] += 180
    return x.astype(np.uint8), y.astype(np.uint8)

  x_train, y_train = make(n_train)
  x_test, y_test = make(n_test)
  os.makedirs(os.path.join(root, "gtsrb"), exist_ok=True)
  np.savez(os.path.join(root, "gtsrb", "gtsrb32.npz"), x_train=x_train, y_train=y_train,
           x_test=x_test, y_test=y_test,
           train_track=np.repeat(np.arange(n_train // 8), 8).astype(np.int16))
  return str(root)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  return write_tiny_gtsrb(tmp_path_factory.mktemp("data"))


def tiny_config(data_dir, **kw):
  from dropjax.config import TrainConfig
  base = dict(dataset="gtsrb", source="local", data_dir=data_dir, val_size=16, depth=8,
              width=4, epochs=2, batch_size=16, lr=0.05, log_every=2,
              eval_batch_size=32, drop="fixed", drop_rate=0.5)
  base.update(kw)
  return TrainConfig(**base).validate()


@pytest.fixture(scope="session")
def tiny_workdir(tiny_data_dir, tmp_path_factory):
  """A briefly trained tiny checkpoint (fixed r = 0.5)."""
  from dropjax.training import loop
  wd = str(tmp_path_factory.mktemp("run"))
  loop.train(tiny_config(tiny_data_dir, epochs=2, eval_every_epochs=0), wd, progress=False)
  return wd


def another_model(load_model):
  """``load_model`` (:func:`dropjax.evaluation.protocol.load_model`) returning
  other variables (each scaled by 1.01): the same run as seen by another model."""
  def load(*args, **kw):
    import jax
    train_cfg, variables, logits_fn, data = load_model(*args, **kw)
    return train_cfg, jax.tree_util.tree_map(lambda v: v * 1.01, variables), logits_fn, data
  return load


def train_gradients_per_setting(monkeypatch, env_var: str, width: int):
  """Loss, gradients and batch statistics of a depth-8 ResNet in training mode,
  and its lowered program, with ``env_var`` set to "0" and to "1" (the model's
  layers from ``dropjax.backend.resolve`` under each setting).  Returns
  ``(results, programs)`` keyed by "0"/"1"."""
  import jax.numpy as jnp
  from dropjax import models

  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = models.resnet(8, 5, width=width).init(jax.random.PRNGKey(1), x)

  def make_loss(model):
    def loss(params):
      out, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             train=True, mutable=["batch_stats"])
      return jnp.sum(out ** 2), upd
    return loss

  results, programs = {}, {}
  for flag in ("0", "1"):
    monkeypatch.setenv(env_var, flag)
    model = models.resnet(8, 5, width=width, **backend.resolve().layers(train=True).as_kwargs())
    fn = jax.jit(jax.value_and_grad(make_loss(model), has_aux=True))
    results[flag] = fn(variables["params"])
    programs[flag] = fn.lower(variables["params"]).as_text()
  return results, programs


def conv_reference(x, w, strides, pads):
  """Convolution in NumPy (float64): sum over taps of strided, shifted windows."""
  import numpy as np
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  (sh, sw) = strides
  ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for a in range(kh):
    for b in range(kw):
      win = xp[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw]
      out += np.einsum("nhwi,io->nhwo", win, w[a, b])
  return out
