"""Backend choices, resolved in one place and passed to the code that runs.

The model, masks, attacks, defense and certification are written for any
backend and import nothing from here.  Whoever owns the devices (``train.py``,
``evaluate.py``, benchmarks, a user's script) calls:

* :func:`configure_process` first thing in ``main``, before JAX computes
  anything: the XLA:CPU flag and the host-allocator setting
  (:mod:`dropjax.xla_cpu.process`).  ``import dropjax`` changes nothing in the
  process; a library user calls it or not.
* :func:`resolve` once: a :class:`Backend` with the model's layers for
  training and for inference (``conv``, ``norm``, ``conv_norm_act``, ``block_input``, given to
  :class:`dropjax.models.CifarResNet`), the attack loops' unroll and the EOT
  form.  On GPU/TPU the layers are plain ``flax.linen.Conv`` and
  ``flax.linen.BatchNorm`` and attack loops stay rolled.  On CPU they are the
  measured speed-ups of :mod:`dropjax.xla_cpu` (``benchmarks/README.md``):

  - convolutions by native AVX2 kernels (forward, input and weight
    gradients; single-device runs, since XLA cannot partition a custom call),
    by AVX-512 tiles on CPUs that have AVX-512F (bit-identical results), and
    polyphase input gradients of strided convolutions;
  - in training, a fusion barrier on every convolution input and on every
    residual block's input (XLA:CPU otherwise fuses, and recomputes, the
    batch-norm/ReLU/residual chain inside the weight-gradient transposes and
    every other consumer);
  - batch norm with wide per-channel reductions and native one-pass moments;
    in training it adds the block's residual and applies the ReLU itself, the
    three one native pass and their backward pass another;
  - in inference, each convolution, its batch norm, residual and ReLU in one
    native pass (:mod:`dropjax.xla_cpu.conv_norm`; the activation is written
    once, not once more by an elementwise loop);
  - attack loops fully unrolled where XLA:CPU's own convolutions run in them
    (a rolled ``while`` loop around those runs ~5x slower, jax-ml/jax#12868);
    around the native kernels a rolled loop runs as fast and compiles sooner,
    so with them the loops stay rolled.

This module is the only place that reads the performance switches:

=============================  ===================================================
``DROPJAX_NO_XLA_DEFAULTS=1``  :func:`configure_process` changes nothing
``DROPJAX_HOST_MALLOC=0|1``    the allocator setting off / on even off-CPU
``DROPJAX_CPU_CONV=0|1``       :mod:`dropjax.xla_cpu.conv` at all (default: on CPU)
``DROPJAX_NATIVE=0``           never build or load the native kernels
``DROPJAX_NATIVE_CONV=0|1``    native kernels off / on even with several devices
``DROPJAX_NATIVE_FORWARD=0``   XLA's forward and input-gradient convolutions
``DROPJAX_NATIVE_AVX512=0|1``  AVX-512 tiles of the native kernels (default: if the CPU has them)
``DROPJAX_NATIVE_MOMENTS=0``   XLA's batch-norm sums instead of the native pass
``DROPJAX_NATIVE_NORM_ACT=0``  training: XLA's passes for norm + residual + ReLU and their gradient
``DROPJAX_FUSED_CONV_NORM=0``  inference: conv, norm, residual, ReLU as separate ops
``DROPJAX_POLYPHASE=0``        XLA's input gradient of strided convolutions
``DROPJAX_CONV_BARRIER=0|1``   barrier on convolution inputs (training; default: CPU)
``DROPJAX_BLOCK_BARRIER=0|1``  barrier on block inputs (default: as the conv barrier)
``DROPJAX_LOOP_UNROLL=N|full`` attack-loop unroll (default: full with XLA:CPU's convolutions, else 1)
``DROPJAX_EOT_IMPL=vmap|batch|scan``  default EOT form (vmap)
``DROPJAX_CACHE_DIR=DIR``      where the native kernels are compiled to
=============================  ===================================================
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping

import flax.linen as nn

from dropjax import models
from dropjax.models import ModelLayers

log = logging.getLogger("dropjax.backend")

# Attack loops longer than this are unrolled by this factor on CPU instead of fully.
_FULL_UNROLL_MAX_STEPS, _PARTIAL_UNROLL = 200, 10


@dataclasses.dataclass(frozen=True)
class Backend:
  """The resolved choices for one platform and device count.

  Attributes:
    platform: ``jax.default_backend()`` at resolution ("cpu", "gpu", "tpu").
    train_layers / eval_layers: the model's layers in training / inference mode.
    unroll_loops: whether on-device loops around the model are unrolled by
      default: XLA:CPU's own convolutions lose their fast path inside a rolled
      ``while`` loop (jax-ml/jax#12868), the native kernels and GPU/TPU
      convolutions do not.
    unroll_override: ``DROPJAX_LOOP_UNROLL`` (``True`` = full), else ``None``.
    eot_impl: default EOT form for attacks (``vmap``, ``batch`` or ``scan``).
    choices: what was chosen and why, for logs and benchmark records.
  """
  platform: str
  train_layers: ModelLayers
  eval_layers: ModelLayers
  unroll_loops: bool = False
  unroll_override: int | bool | None = None
  eot_impl: str = "vmap"
  choices: tuple[tuple[str, Any], ...] = ()

  def layers(self, train: bool) -> ModelLayers:
    return self.train_layers if train else self.eval_layers

  def loop_unroll(self, num_steps: int) -> int | bool:
    """Unroll of an on-device loop of ``num_steps`` steps around the model
    (``lax.fori_loop(..., unroll=)``): full where ``unroll_loops`` (partial
    past 200 steps), else rolled."""
    if self.unroll_override is not None:
      return self.unroll_override
    if self.unroll_loops:
      return True if num_steps <= _FULL_UNROLL_MAX_STEPS else _PARTIAL_UNROLL
    return 1

  def describe(self) -> dict[str, Any]:
    return {"platform": self.platform, **dict(self.choices)}


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
  value = env.get(name)
  if value in (None, ""):
    return default
  if value not in ("0", "1"):
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")
  return value == "1"


def _unroll_override(env: Mapping[str, str]) -> int | bool | None:
  value = env.get("DROPJAX_LOOP_UNROLL")
  if not value:
    return None
  if value == "full":
    return True
  try:
    return max(1, int(value))
  except ValueError:
    raise ValueError(f"DROPJAX_LOOP_UNROLL must be an integer or 'full', got {value!r}") from None


def _cpu_layers(env: Mapping[str, str], num_devices: int) -> tuple[ModelLayers, ModelLayers, dict]:
  """The XLA:CPU training and inference layers, and the choices made."""
  # pylint: disable-next=g-import-not-at-top
  from dropjax.xla_cpu import batch_norm, conv, conv_norm, fusion, native

  cpu_conv = _switch(env, "DROPJAX_CPU_CONV", True)
  conv_barrier = _switch(env, "DROPJAX_CONV_BARRIER", True)
  block_barrier = _switch(env, "DROPJAX_BLOCK_BARRIER", conv_barrier)
  if not cpu_conv:
    kernels, reason = False, "DROPJAX_CPU_CONV=0"
  elif env.get("DROPJAX_NATIVE") == "0":
    kernels, reason = False, "disabled by DROPJAX_NATIVE=0"
  else:
    kernels = native.load(env.get("DROPJAX_CACHE_DIR") or native.DEFAULT_CACHE_DIR)
    reason = native.unavailable_reason()
  # XLA cannot partition a custom call over a multi-device mesh (it would
  # gather the operands): the kernels run on single-device runs unless forced.
  native_ok = kernels and _switch(env, "DROPJAX_NATIVE_CONV", num_devices == 1)
  native_forward = native_ok and env.get("DROPJAX_NATIVE_FORWARD") != "0"
  avx512 = _switch(env, "DROPJAX_NATIVE_AVX512", native.has_avx512())
  if avx512 and native_ok and not native.has_avx512():
    raise ValueError("DROPJAX_NATIVE_AVX512=1 on a CPU without AVX-512F")
  options = dict(native_forward=native_forward,
                 native_weight_grad=native_ok,
                 polyphase=cpu_conv and env.get("DROPJAX_POLYPHASE") != "0",
                 native_avx512=native_ok and avx512)
  norm = functools.partial(
      batch_norm.BatchNorm, native_moments=native_ok and env.get("DROPJAX_NATIVE_MOMENTS") != "0",
      native_norm_act=native_ok and env.get("DROPJAX_NATIVE_NORM_ACT") != "0")

  def conv_cls(input_barrier: bool):
    opts = conv.ConvOptions(**options, input_barrier=input_barrier)
    if opts == conv.ConvOptions(polyphase=False):
      return nn.Conv
    return functools.partial(nn.Conv, conv_general_dilated=conv.make_conv_general_dilated(opts))

  train = ModelLayers(conv=conv_cls(conv_barrier), norm=norm,
                      conv_norm_act=batch_norm.conv_norm_act,
                      block_input=fusion.fusion_barrier if block_barrier else None)
  fused = native_forward and env.get("DROPJAX_FUSED_CONV_NORM") != "0"
  infer = ModelLayers(conv=conv_cls(False), norm=norm,
                      conv_norm_act=(conv_norm.make_conv_norm_act(conv.ConvOptions(**options))
                                     if fused else models.conv_norm_act))
  choices = {**options, "native_moments": norm.keywords["native_moments"],
             "native_norm_act": norm.keywords["native_norm_act"],
             "fused_conv_norm": fused,
             "native_kernels": bool(kernels), "native_unavailable": None if kernels else reason,
             "conv_barrier": conv_barrier, "block_barrier": block_barrier,
             "num_devices": num_devices}
  return train, infer, choices


@functools.lru_cache(maxsize=None)
def _resolve(platform: str, num_devices: int, env_items: tuple[tuple[str, str], ...]) -> Backend:
  env = dict(env_items)
  eot_impl = env.get("DROPJAX_EOT_IMPL") or "vmap"  # checked by AttackConfig.validate
  if platform == "cpu":
    train, infer, choices = _cpu_layers(env, num_devices)
    # The attacks' loops hold forward and input-gradient convolutions: the native
    # kernels' where native_forward, else XLA's (benchmarks/README.md).
    unroll_loops = not choices["native_forward"]
  else:
    train = infer = ModelLayers()
    choices = {"layers": "flax.linen.Conv + flax.linen.BatchNorm"}
    unroll_loops = False
  choices["unroll_loops"] = unroll_loops
  backend = Backend(platform=platform, train_layers=train, eval_layers=infer,
                    unroll_loops=unroll_loops, unroll_override=_unroll_override(env),
                    eot_impl=eot_impl,
                    choices=tuple(sorted(choices.items())))
  log.info("dropjax backend: %s", backend.describe())
  return backend


def resolve(platform: str | None = None, num_devices: int | None = None,
            env: Mapping[str, str] | None = None) -> Backend:
  """The :class:`Backend` for ``platform`` (default ``jax.default_backend()``)
  with ``num_devices`` (default ``jax.device_count()``) under the switches in
  ``env`` (default ``os.environ``; see the module docstring).

  The same arguments return the same object, so models built from it compare
  equal and compiled functions are reused.  On CPU this may compile the
  native kernels (~10 s, once per machine; cached).
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ if env is None else env
  items = tuple(sorted((k, v) for k, v in env.items() if k.startswith("DROPJAX_")))
  return _resolve(platform or jax.default_backend(),
                  jax.device_count() if num_devices is None else num_devices, items)


def configure_process(env: Mapping[str, str] | None = None) -> dict[str, bool]:
  """Applies the XLA:CPU process settings; returns which were applied.

  Adds :data:`dropjax.xla_cpu.process.CPU_XLA_FLAGS` to ``XLA_FLAGS`` (never
  overriding a flag the user set) and makes glibc reuse XLA:CPU's
  temporaries, when JAX will run on the CPU.  Call it before JAX computes
  anything: XLA reads its flags when it creates the CPU client.  Switches:
  ``DROPJAX_NO_XLA_DEFAULTS=1`` (nothing), ``DROPJAX_HOST_MALLOC=0|1``.
  """
  from dropjax.xla_cpu import process  # pylint: disable=g-import-not-at-top

  env = os.environ if env is None else env
  if env.get("DROPJAX_NO_XLA_DEFAULTS") == "1":
    return {"xla_flags": False, "host_allocator": False}
  on_cpu = process.runs_on_cpu(env.get("JAX_PLATFORMS", ""))
  if _jax_started():
    log.warning("configure_process() called after JAX created its backends: XLA_FLAGS "
                "and the allocator setting no longer take effect in this process")
  flags = False
  if on_cpu:
    new = process.with_cpu_xla_flags(os.environ.get("XLA_FLAGS", ""))
    flags = new != os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = new
  allocator = _switch(env, "DROPJAX_HOST_MALLOC", on_cpu) and process.configure_host_allocator()
  return {"xla_flags": flags, "host_allocator": allocator}


def _jax_started() -> bool:
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False

