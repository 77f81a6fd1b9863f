"""Native CPU kernels, compiled on first use and registered as XLA FFI targets.

One kernel so far: the weight gradient of a convolution
(``conv_weight_grad.cc``), which XLA:CPU otherwise computes through
transposed copies of both operands at a fraction of the forward speed
(``benchmarks/README.md``).  :mod:`dropjax.conv` uses it on CPU.

The source is compiled once per (source, jaxlib, compiler) into
``$DROPJAX_CACHE_DIR`` (default ``~/.cache/dropjax``) with the system C++
compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against the FFI headers that
ship with jaxlib.  Nothing here is required: without an x86-64 CPU with AVX2
and FMA, or without a compiler, :func:`conv_weight_grad_target` returns
``None``, :func:`unavailable_reason` says why, and callers use XLA's own
kernels (same results up to float rounding).
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

_SOURCE = Path(__file__).with_name("conv_weight_grad.cc")
_SYMBOL = "DropjaxConvWeightGrad"
TARGET = "dropjax_conv_weight_grad"

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
  return Path(os.environ.get("DROPJAX_CACHE_DIR",
                             Path.home() / ".cache" / "dropjax"))


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


def _build(compiler: str) -> Path:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  flags = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC",
           "-w"]
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           check=False).stdout.splitlines()[:1]
  key = hashlib.sha256(
      "\0".join([_SOURCE.read_text(), jaxlib.__version__, *version, *flags]).encode()
  ).hexdigest()[:16]
  out = cache_dir() / f"conv_weight_grad-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name, then rename: concurrent processes never see a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    proc = subprocess.run(
        [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp,
         "-lpthread"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def _load() -> str | None:
  import jax  # pylint: disable=g-import-not-at-top

  if os.environ.get("DROPJAX_NATIVE") == "0":
    _state["reason"] = "disabled by DROPJAX_NATIVE=0"
    return None
  if platform.machine().lower() not in ("x86_64", "amd64"):
    _state["reason"] = f"needs x86-64, this is {platform.machine()}"
    return None
  if not {"avx2", "fma"} <= _cpu_flags():
    _state["reason"] = "needs a CPU with AVX2 and FMA"
    return None
  compiler = _compiler()
  if compiler is None:
    _state["reason"] = "no C++ compiler found (set CXX)"
    return None
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, _SYMBOL)),
                                platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    _state["reason"] = f"{type(e).__name__}: {e}"
    logging.warning("dropjax: native CPU kernels unavailable, using XLA's (%s)",
                    _state["reason"])
    return None
  _state["library"] = library  # keep it loaded
  return TARGET


def conv_weight_grad_target() -> str | None:
  """Name of the registered FFI target, or ``None`` if it cannot be built here."""
  with _lock:
    if "target" not in _state:
      _state["target"] = _load()
    return _state["target"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
  """Why :func:`conv_weight_grad_target` is ``None`` (``None`` if available)."""
  return None if conv_weight_grad_target() else str(_state.get("reason"))
