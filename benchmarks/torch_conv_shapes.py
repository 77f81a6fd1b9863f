"""Each ResNet-20 convolution shape in PyTorch: forward, input gradient and
weight gradient, ms and GFLOP/s (benchmark-only dependency).

    python benchmarks/torch_conv_shapes.py [--batch 128] [--repeats 5] > torch-shapes.json

The counterpart of ``profile_steps.py --only_conv_shapes`` (dropjax's native
kernels and XLA's convolutions, same shapes, batch and row keys), to see per
shape where PyTorch's CPU convolutions (oneDNN, channels_last, eager: the
kernels ``torch.compile`` calls too) are faster.  float32, all cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (RESNET20_CONV_SHAPES, conv_shape_row, machine,  # noqa: E402
                               time_conv)


def conv_shapes(batch: int, repeats: int) -> list[dict]:
  """One row per shape: ``{forward,input_grad,weight_grad}_torch_{ms,gflops}``."""
  gen = torch.Generator().manual_seed(0)
  rows = []
  for h, c, o, s in RESNET20_CONV_SHAPES:
    cl = torch.channels_last
    x = torch.randn(batch, c, h, h, generator=gen).contiguous(memory_format=cl)
    w = torch.randn(o, c, 3, 3, generator=gen).contiguous(memory_format=cl)
    g = torch.randn(batch, o, h // s, h // s, generator=gen).contiguous(memory_format=cl)
    fns = {
        "forward": lambda: F.conv2d(x, w, stride=s, padding=1),
        "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=s, padding=1),
        "weight_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=s, padding=1),
    }
    row = conv_shape_row(h, c, o, s, batch)
    with torch.no_grad():
      for name, f in fns.items():
        time_conv(row, f"{name}_torch", f, lambda r: r, repeats, warmup=2)
    rows.append(row)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128, help="images per convolution")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="CPU threads (torch.set_num_threads)")
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads)
  out = {"torch": torch.__version__, "threads": args.threads, "machine": machine(),
         "rows": conv_shapes(args.batch, args.repeats)}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
