"""Per-backend performance defaults, chosen in exactly one place.

Importing :mod:`dropjax` calls :func:`configure_xla_flags` *before* JAX is
imported, so the CPU defaults below take effect for every entry point
(``train.py``, ``evaluate.py``, benchmarks, tests).  A user's own ``XLA_FLAGS``
always win: a flag the user already set is never overridden, and setting
``DROPJAX_NO_XLA_DEFAULTS=1`` disables the defaults entirely.

Measured choices (see ``benchmarks/README.md`` for the numbers and commands):

* ``--xla_cpu_experimental_ynn_fusion_type=`` (empty) makes the XLA:CPU
  ResNet-20 train step faster on the 2-core AVX2 development machine.
* XLA:CPU fuses batch norm / ReLU / residual chains into the transposes that
  feed each convolution's weight gradient, which makes them very slow; on CPU
  the model puts its training-mode convolution inputs behind a
  :func:`dropjax.fusion.fusion_barrier` (``barrier_conv_inputs``).
* XLA:CPU's convolutions are slow for these shapes (the 3-channel stem most
  of all), its weight gradients go through transposed copies, and its input
  gradients of strided convolutions through a dilated-input convolution; on
  CPU the model's convolutions use :mod:`dropjax.conv` (``cpu_conv``): native
  forward, input-gradient and weight-gradient kernels (:mod:`dropjax.native`)
  and a polyphase input gradient.
* Inside a rolled ``lax.fori_loop`` XLA:CPU loses most of its convolution
  speed, so on CPU the attack loops are fully unrolled (``loop_unroll``).
  On GPU/TPU a rolled loop compiles faster and runs as fast.
"""
from __future__ import annotations

import os

# Flags added to XLA_FLAGS on CPU unless the user already set the same flag.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def configure_xla_flags() -> None:
  """Adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS``.

  XLA reads ``XLA_FLAGS`` when the first backend is created, so this works as
  long as no JAX computation has run yet in the process.
  """
  if os.environ.get("DROPJAX_NO_XLA_DEFAULTS") == "1":
    return
  current = os.environ.get("XLA_FLAGS", "")
  have = {f.split("=")[0] for f in current.split()}
  extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in have]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def loop_unroll(num_steps: int) -> int | bool:
  """How much to unroll an on-device attack loop of ``num_steps`` steps.

  Returns ``True`` (full unroll) on CPU, where a rolled ``while`` loop around
  convolutions runs several times slower, and ``1`` (rolled) elsewhere.
  Override with ``DROPJAX_LOOP_UNROLL`` (an integer, or ``full``).
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ.get("DROPJAX_LOOP_UNROLL")
  if env:
    return True if env == "full" else max(1, int(env))
  if jax.default_backend() == "cpu":
    return True if num_steps <= 200 else 10
  return 1


def barrier_conv_inputs(train: bool) -> bool:
  """Whether the model routes convolution inputs through a fusion barrier.

  True on CPU in training mode (the weight-gradient transposes, see
  :mod:`dropjax.fusion`); False in inference mode (attacks and evaluation take
  no weight gradients) and on GPU/TPU, where a conditional per convolution
  would only add overhead.  Override with ``DROPJAX_CONV_BARRIER`` (0 or 1).
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ.get("DROPJAX_CONV_BARRIER")
  if env in ("0", "1"):
    return env == "1"
  return train and jax.default_backend() == "cpu"


def cpu_conv() -> bool:
  """Whether the model's convolutions use :mod:`dropjax.conv` (faster on CPU).

  True on CPU: native forward and input-gradient convolutions (training,
  inference, attacks), the native weight gradient (training) and the
  polyphase input gradient of strided convolutions.  On GPU/TPU XLA's own
  convolutions are used.  Override with ``DROPJAX_CPU_CONV`` (0 or 1);
  ``DROPJAX_NATIVE_CONV=0`` keeps dropjax.conv but only XLA's kernels,
  ``DROPJAX_NATIVE_FORWARD=0`` XLA's forward and input-gradient convolutions
  (:func:`dropjax.conv.use_native_conv`, :func:`dropjax.conv.use_native_weight_grad`).
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ.get("DROPJAX_CPU_CONV")
  if env in ("0", "1"):
    return env == "1"
  return jax.default_backend() == "cpu"


def eot_impl() -> str:
  """Default way to compute the EOT gradient (see ``attacks.pgd.eot_gradient``).

  Override with ``DROPJAX_EOT_IMPL`` (vmap, batch or scan).
  """
  return os.environ.get("DROPJAX_EOT_IMPL", "vmap")
