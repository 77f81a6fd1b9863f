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
* XLA:CPU allocates each run's temporaries (~200 MB for a ResNet-20 train
  step) with ``posix_memalign`` on a worker thread; glibc serves that from
  ``mmap`` and returns it with ``munmap``, so every step page-faults (and the
  kernel zeroes) all of it again: ~50,000 faults and ~0.16 s of system time per
  train step on the development machine.  ``configure_host_allocator`` keeps
  freed memory in the process for reuse (``mallopt``), where JAX will run on
  the CPU.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

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


# glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# JAX plugins whose presence means the process will most likely compute on an accelerator.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def _runs_on_cpu() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def configure_host_allocator() -> bool:
  """Makes glibc keep and reuse large freed blocks; returns whether it did.

  Sets one malloc arena for all threads (large blocks of other arenas are
  always ``mmap``-ed), no ``mmap`` for large blocks and no trimming of the
  heap, so the memory of one XLA:CPU run's temporaries is reused by the next
  instead of being unmapped and faulted in again.  The process then keeps its
  peak host memory until it exits.  Applied at ``import dropjax`` (before
  JAX's threads allocate) on Linux with glibc, when JAX will run on the CPU
  (``JAX_PLATFORMS`` starts with ``cpu``, or no GPU/TPU plugin is installed).
  ``DROPJAX_HOST_MALLOC=0`` leaves the allocator alone, ``=1`` applies it anyway.
  """
  env = os.environ.get("DROPJAX_HOST_MALLOC")
  if env == "0" or os.environ.get("DROPJAX_NO_XLA_DEFAULTS") == "1":
    return False
  if sys.platform != "linux" or (env != "1" and not _runs_on_cpu()):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # glibc only (musl has other knobs)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


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


def barrier_block_inputs(train: bool) -> bool:
  """Whether the model materializes each residual block's input behind a fusion barrier.

  Without it XLA:CPU fuses the residual stream's elementwise chain (batch norm,
  ReLU and additions of every earlier block of a stage) into each consumer that
  is not a convolution (the next shortcut addition, the backward pass) and
  recomputes the chain there.  Same default and override as
  :func:`barrier_conv_inputs`; ``DROPJAX_BLOCK_BARRIER`` (0 or 1) sets it alone.
  """
  env = os.environ.get("DROPJAX_BLOCK_BARRIER")
  if env in ("0", "1"):
    return env == "1"
  return barrier_conv_inputs(train)


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
