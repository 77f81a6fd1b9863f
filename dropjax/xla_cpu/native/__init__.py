"""Native CPU kernels, compiled on first use and registered as XLA FFI targets.

Three sources (six targets), used on CPU by :mod:`dropjax.xla_cpu.conv` and
:mod:`dropjax.xla_cpu.batch_norm` (``benchmarks/README.md`` has the measurements):

* ``conv_weight_grad.cc``: the weight gradient of a convolution, which
  XLA:CPU otherwise computes through transposed copies of both operands at a
  fraction of the forward speed (target :data:`TARGET`); AVX2 or AVX-512 tiles,
  as the call asks;
* ``conv_forward.cc``: a convolution, faster than XLA:CPU's for the
  CIFAR ResNet shapes and ~6x faster for a 3-channel input; it also serves
  input gradients (target :data:`FORWARD_TARGET`); AVX2 tiles, or AVX-512
  tiles (compiled by a target attribute) when the call asks for them; its
  fused form (target :data:`FUSED_TARGET`) applies inference batch norm, a
  residual and a ReLU to each tile as it stores it (:mod:`dropjax.xla_cpu.conv_norm`);
* ``batch_norm.cc``: training-mode batch norm: per-channel sum and sum of
  squares in one pass, the statistics (target :data:`MOMENTS_TARGET`); the
  normalization's affine map with the block's residual and ReLU (target
  :data:`NORM_ACT_TARGET`) and its backward pass (the masked gradient and its
  two per-channel sums in one pass; target :data:`NORM_ACT_GRAD_TARGET`).

The sources are compiled once per (sources, jaxlib, compiler) into one library in
the ``cache_dir`` given to :func:`load` (:mod:`dropjax.backend` passes
``$DROPJAX_CACHE_DIR``, default ``~/.cache/dropjax``) with the system C++
compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against the FFI headers that
ship with jaxlib.  Nothing here is required: without an x86-64 CPU with AVX2
and FMA, or without a compiler, :func:`load` returns ``False``,
:func:`unavailable_reason` says why, and callers use XLA's own kernels (same
results up to float rounding).  Nothing here reads the environment.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_SOURCES = tuple(Path(__file__).with_name(f)
                 for f in ("conv_weight_grad.cc", "conv_forward.cc", "batch_norm.cc"))
_HEADERS = tuple(Path(__file__).with_name(f) for f in ("work_queue.h", "weight_grad_tile.inc"))
TARGET = "dropjax_conv_weight_grad"
FORWARD_TARGET = "dropjax_conv_forward"
FUSED_TARGET = "dropjax_conv_forward_fused"
MOMENTS_TARGET = "dropjax_channel_moments"
NORM_ACT_TARGET = "dropjax_norm_act"
NORM_ACT_GRAD_TARGET = "dropjax_norm_act_grad"
_SYMBOLS = {TARGET: "DropjaxConvWeightGrad", FORWARD_TARGET: "DropjaxConvForward",
            FUSED_TARGET: "DropjaxConvForwardFused", MOMENTS_TARGET: "DropjaxChannelMoments",
            NORM_ACT_TARGET: "DropjaxNormAct", NORM_ACT_GRAD_TARGET: "DropjaxNormActGrad"}

_lock = threading.Lock()
_state: dict[str, object] = {}


DEFAULT_CACHE_DIR = Path.home() / ".cache" / "dropjax"


def _cpu_flags() -> set[str]:
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return set()
  for line in text.splitlines():
    if line.startswith("flags"):
      return set(line.split(":", 1)[1].split())
  return set()


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _build(compiler: str, cache_dir: Path) -> Path:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  flags = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC",
           "-w"]
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           check=False).stdout.splitlines()[:1]
  key = hashlib.sha256(
      "\0".join([*(src.read_text() for src in _SOURCES + _HEADERS), jaxlib.__version__, *version,
                 *flags]).encode()
  ).hexdigest()[:16]
  out = Path(cache_dir) / f"dropjax_kernels-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name, then rename: concurrent processes never see a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    proc = subprocess.run(
        [compiler, *flags, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp,
         "-lpthread"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling the native kernels failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def _load(cache_dir: Path) -> bool:
  import jax  # pylint: disable=g-import-not-at-top

  if platform.machine().lower() not in ("x86_64", "amd64"):
    _state["reason"] = f"needs x86-64, this is {platform.machine()}"
    return False
  if not {"avx2", "fma"} <= _cpu_flags():
    _state["reason"] = "needs a CPU with AVX2 and FMA"
    return False
  compiler = _compiler()
  if compiler is None:
    _state["reason"] = "no C++ compiler found (set CXX)"
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(compiler, cache_dir)))
    for target, symbol in _SYMBOLS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    _state["reason"] = f"{type(e).__name__}: {e}"
    logging.warning("dropjax: native CPU kernels unavailable, using XLA's (%s)",
                    _state["reason"])
    return False
  _state["library"] = library  # keep it loaded
  return True


def has_avx512() -> bool:
  """Whether this CPU has AVX-512F (for the convolution kernels' AVX-512 tiles)."""
  return platform.machine().lower() in ("x86_64", "amd64") and "avx512f" in _cpu_flags()


def load(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> bool:
  """Builds (once per process and cache) and registers the kernels' FFI targets
  (:data:`TARGET`, :data:`FORWARD_TARGET`, :data:`FUSED_TARGET`, :data:`MOMENTS_TARGET`,
  :data:`NORM_ACT_TARGET`, :data:`NORM_ACT_GRAD_TARGET`) on the CPU
  platform; returns whether they are usable.  Later calls return the first answer."""
  with _lock:
    if "loaded" not in _state:
      _state["loaded"] = _load(Path(cache_dir))
    return bool(_state["loaded"])


def unavailable_reason() -> str | None:
  """Why :func:`load` returned ``False`` (``None`` if the kernels are loaded or
  :func:`load` was not called yet)."""
  return None if _state.get("loaded", True) else str(_state.get("reason"))
