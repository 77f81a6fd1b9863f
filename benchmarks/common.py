"""Shared benchmark helpers: timing (warm-up excluded, median of repeats), machine facts,
the flags every throughput script takes."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from dropjax import files


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def vector_extensions() -> list[str]:
  """The CPU's SIMD extensions that matter for these kernels (from /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return sorted(x for x in flags if x in ("avx", "avx2", "fma", "avx512f", "avx512bw",
                                                   "avx512vl", "avx512_vnni", "avx512_bf16",
                                                   "amx_tile"))
  except OSError:
    pass
  return []


def machine() -> dict:
  return {"cpu_model": cpu_model(), "vector_extensions": vector_extensions(),
          "cpu_count": os.cpu_count(),
          "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "platform": platform.platform(), "python": platform.python_version(),
          "loadavg": os.getloadavg()}


# Train steps run before timing, in both frameworks.  Beyond the first (compile)
# call, XLA:CPU's per-run temporaries need a few steps before glibc's heap holds
# a block that fits them (dropjax.xla_cpu.process.configure_host_allocator): up to three
# of the first ~15 steps fault ~200 MB in (+~90 ms each), none after that.  A
# training run takes thousands of steps, so the steady state is what is timed.
TRAIN_WARMUP = 20

# The PyTorch forms torch_reference.py measures (eager NCHW, eager channels_last, the
# latter under torch.compile); here so run.py can name them without importing torch.
TORCH_FORMS = ("plain", "best", "compiled")


# ResNet-20's convolution shapes (input size, in channels, out channels, stride):
# the stem, the three stages, the two block entries (3x3 kernels, padding 1).
RESNET20_CONV_SHAPES = ((32, 3, 16, 1), (32, 16, 16, 1), (16, 32, 32, 1), (8, 64, 64, 1),
                        (32, 16, 32, 2), (16, 32, 64, 2))


def conv_shape_row(h: int, cin: int, cout: int, stride: int, batch: int) -> dict:
  """The key fields of a per-shape row and its GFLOP per call (3x3 kernel)."""
  return {"hw": h, "cin": cin, "cout": cout, "stride": stride, "batch": batch,
          "gflop": 2 * batch * (h // stride) ** 2 * 9 * cin * cout / 1e9}


def time_conv(row: dict, key: str, run, sync, repeats: int, warmup: int = 1) -> None:
  """Adds ``<key>_ms`` and ``<key>_gflops`` (median over ``repeats``) to ``row``."""
  sec = measure(run, sync, repeats, warmup)["median_s"]
  row[f"{key}_ms"] = round(1e3 * sec, 2)
  row[f"{key}_gflops"] = round(row["gflop"] / sec, 1)


def measure(run, sync, repeats: int, warmup: int = 1) -> dict:
  """``run()`` returns something ``sync`` blocks on.  First call = compile + run."""
  t0 = time.perf_counter()
  sync(run())
  first = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    sync(run())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(run())
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return {"first_call_s": first, "compile_s": max(first - med, 0.0), "median_s": med,
          "min_s": min(times), "repeats": repeats}


def parser(doc: str, repeats: int) -> argparse.ArgumentParser:
  """A script's parser with the flags every throughput benchmark takes."""
  p = argparse.ArgumentParser(description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depth", type=int, default=20, help="ResNet depth (6n+2)")
  p.add_argument("--repeats", type=int, default=repeats, help="timed repeats (median)")
  p.add_argument("--out", default=None, help="also write the JSON here")
  return p


def report(out: dict, path: str | None) -> None:
  """Prints the result as JSON and, when ``path`` is given, writes it there too."""
  text = json.dumps(out, indent=2, sort_keys=True, default=str)
  if path:
    files.write_atomic(path, text + "\n")
  print(text)
