"""Process-wide settings for XLA:CPU: an XLA flag and glibc's allocator.

Both change the whole process, so nothing applies them at import: an entry
point calls :func:`dropjax.backend.configure_process` first thing in ``main``
(before JAX creates its CPU client), and a library user may call it too.  The
functions here take their switches as arguments; :mod:`dropjax.backend` reads
them from the environment.

* ``--xla_cpu_experimental_ynn_fusion_type=`` (empty) made the XLA:CPU
  ResNet-20 train step faster on the 2-core AVX2 development machine
  (``benchmarks/README.md``).
* XLA:CPU allocates each run's temporaries (~200 MB for a ResNet-20 train
  step) with ``posix_memalign`` on a worker thread; glibc serves that from
  ``mmap`` and returns it with ``munmap``, so every step page-faults (and the
  kernel zeroes) all of it again: ~50,000 faults and ~0.16 s of system time per
  train step.  :func:`configure_host_allocator` keeps freed memory in the
  process for reuse (``mallopt``).
"""
from __future__ import annotations

import ctypes
import importlib.util
import sys

# Flags added to XLA_FLAGS on CPU unless the user already set the same flag.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)

# glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# JAX plugins whose presence means the process will most likely compute on an accelerator.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def with_cpu_xla_flags(xla_flags: str) -> str:
  """``xla_flags`` plus each of :data:`CPU_XLA_FLAGS` that it does not set yet.

  A flag the user already set (with any value) is never overridden.  XLA reads
  ``XLA_FLAGS`` when the first backend is created, so the result must be in
  the environment before any JAX computation runs.
  """
  have = {f.split("=")[0] for f in xla_flags.split()}
  extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in have]
  return " ".join([xla_flags, *extra]).strip()


def runs_on_cpu(jax_platforms: str) -> bool:
  """Whether JAX will compute on the CPU: ``JAX_PLATFORMS`` starts with ``cpu``,
  or it is empty and no GPU/TPU plugin is installed."""
  if jax_platforms:
    return jax_platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def configure_host_allocator() -> bool:
  """Makes glibc keep and reuse large freed blocks; returns whether it did.

  Sets one malloc arena for all threads (large blocks of other arenas are
  always ``mmap``-ed), no ``mmap`` for large blocks and no trimming of the
  heap, so the memory of one XLA:CPU run's temporaries is reused by the next
  instead of being unmapped and faulted in again.  The process then keeps its
  peak host memory until it exits.  Linux with glibc only (``False`` elsewhere);
  call it before JAX's threads allocate.
  """
  if sys.platform != "linux":
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # glibc only (musl has other knobs)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
