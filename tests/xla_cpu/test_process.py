"""Process settings (dropjax.backend.configure_process, dropjax.xla_cpu.process):
XLA flags and the host allocator; and that importing dropjax applies neither."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs a jitted program whose temporaries (~50 MB) XLA:CPU allocates on every
# call, and reports the fewest page faults of one of the later calls.
_PROBE = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
from dropjax import backend
backend.configure_process()
import jax, jax.numpy as jnp

@jax.jit
def f(x):  # several big intermediates that cannot all be fused away
  y = jnp.sort(x * 2.0 + 1.0, axis=0)
  return jnp.sum(jnp.cumsum(y, axis=1) * jnp.flip(y, 0))

x = jnp.ones((1024, 4096), jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range({warmup}):  # glibc's heap reaches its steady state
  f(x).block_until_ready()
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"faults_per_call": min(faults), "temp_pages": temp / 4096,
                  "xla_flags": __import__("os").environ.get("XLA_FLAGS", "")}}))
"""


def _probe(warmup=10, **env):
  full = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
  full.pop("DROPJAX_NO_XLA_DEFAULTS", None)
  # XLA's default code generation (conftest lowers it for the suite's compile time):
  # the probe runs its program 15 times, compiles it once.
  full["XLA_FLAGS"] = " ".join(f for f in full.get("XLA_FLAGS", "").split()
                               if not f.startswith("--xla_backend_optimization_level"))
  out = subprocess.run([sys.executable, "-c", _PROBE.format(repo=REPO, warmup=warmup)], env=full,
                       capture_output=True, text=True, check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_host_allocator_reuses_xla_temporaries_instead_of_faulting_them_in():
  off = _probe(DROPJAX_HOST_MALLOC="0")
  on = _probe()
  assert off["temp_pages"] > 5_000  # the probe really has big temporaries
  # glibc's default: the temporaries are mmap-ed afresh and faulted in on every call.
  assert off["faults_per_call"] > 0.5 * off["temp_pages"], off
  # dropjax's default on CPU: once the heap holds a free block that fits (the
  # first calls grow it, and a later one now and then), the memory is reused
  # and a call faults nothing in.
  assert on["faults_per_call"] < 0.1 * off["faults_per_call"], (on, off)


def test_configure_process_switches(monkeypatch):
  from dropjax import backend
  from dropjax.xla_cpu import process
  calls = []
  monkeypatch.setattr(process, "configure_host_allocator", lambda: calls.append(1) or True)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert backend.configure_process({"DROPJAX_HOST_MALLOC": "0", "JAX_PLATFORMS": "cpu"}) == {
      "xla_flags": True, "host_allocator": False}
  assert not calls
  assert backend.configure_process({"JAX_PLATFORMS": "cuda"}) == {
      "xla_flags": False, "host_allocator": False}  # an accelerator run: left alone
  assert backend.configure_process({"JAX_PLATFORMS": "cuda", "DROPJAX_HOST_MALLOC": "1"})[
      "host_allocator"] and calls == [1]
  monkeypatch.setenv("XLA_FLAGS", "")
  assert backend.configure_process({"DROPJAX_NO_XLA_DEFAULTS": "1", "JAX_PLATFORMS": "cpu"}) == {
      "xla_flags": False, "host_allocator": False}
  assert os.environ["XLA_FLAGS"] == ""


def test_cpu_xla_flag_added_unless_the_user_set_it():
  from dropjax.xla_cpu import process
  assert process.with_cpu_xla_flags("--xla_dump_to=/tmp/x").split() == [
      "--xla_dump_to=/tmp/x", *process.CPU_XLA_FLAGS]
  user = "--xla_cpu_experimental_ynn_fusion_type=all"
  assert process.with_cpu_xla_flags(user) == user
  assert process.runs_on_cpu("cpu") and not process.runs_on_cpu("cuda,cpu")


_IMPORT_PROBE = r"""
import json, os, sys
sys.path.insert(0, {repo!r})
before = dict(os.environ)
import dropjax, dropjax.models, dropjax.masks, dropjax.attacks, dropjax.defense
import dropjax.evaluation, dropjax.training.loop, dropjax.backend, dropjax.cli
print(json.dumps({{"changed": sorted(k for k in set(before) | set(os.environ)
                                     if before.get(k) != os.environ.get(k))}}))
"""


def test_importing_dropjax_changes_nothing_in_the_process():
  """No XLA flag, no environment change at import (the allocator setting is
  applied only by configure_process, tested above)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_dump_to=/tmp/unchanged"}
  out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE.format(repo=REPO)], env=env,
                       capture_output=True, text=True, check=True, timeout=300)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"changed": []}
