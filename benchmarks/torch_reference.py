"""The same four workloads in PyTorch, as a reference (benchmark-only dependency).

    pip install -r requirements-bench.txt
    python benchmarks/torch_reference.py [--quick] > torch.json
    python benchmarks/torch_reference.py --device cuda [--amp] > torch-gpu.json

Three forms per workload: "plain" (NCHW, eager; EOT with the K masked copies
stacked into one batch), "best" (channels_last, eager; EOT as a loop over the K
masks with gradients accumulated) and "compiled" (the "best" form with the model
under ``torch.compile``, TorchInductor's default mode: generated C++ kernels
around oneDNN convolutions on the CPU; its compile time is reported as
``compile_s`` and not timed).  Same architecture (He et al. ResNet-20, option A),
batch sizes and thread count as benchmarks/bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import TORCH_FORMS, TRAIN_WARMUP, machine, measure  # noqa: E402


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = nn.BatchNorm2d(cout)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = nn.BatchNorm2d(cout)
    self.pad = cout - cin
    self.stride = stride

  def forward(self, x):
    y = F.relu(self.b1(self.c1(x)))
    y = self.b2(self.c2(y))
    s = x
    if self.stride != 1 or self.pad:
      s = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
    return F.relu(y + s)


class ResNet(nn.Module):
  def __init__(self, depth=20, num_classes=10):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm2d(16)
    layers, cin = [], 16
    for stage, w in enumerate((16, 32, 64)):
      for b in range(n):
        layers.append(Block(cin, w, 2 if stage and b == 0 else 1))
        cin = w
    self.layers = nn.Sequential(*layers)
    self.head = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight)

  def forward(self, x):
    x = F.relu(self.bn(self.stem(x)))
    x = self.layers(x)
    return self.head(x.mean((2, 3)))


def augment_and_drop(x_uint8, rate, gen):
  """Scale to [-1, 1], random crop (pad 4) + flip per example, drop values."""
  x = x_uint8.float() / 127.5 - 1
  b, c, h, w = x.shape
  padded = F.pad(x, (4, 4, 4, 4), value=-1.0)
  dev = x.device
  dy = torch.randint(0, 9, (b,), generator=gen, device=dev)
  dx = torch.randint(0, 9, (b,), generator=gen, device=dev)
  rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, c, h, w)
  cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, c, h, w)
  x = padded[torch.arange(b, device=dev)[:, None, None, None],
             torch.arange(c, device=dev)[None, :, None, None], rows, cols]
  flip = torch.rand(b, generator=gen, device=dev) < 0.5
  x = torch.where(flip[:, None, None, None], x.flip(3), x)
  return x * (torch.rand(x.shape, generator=gen, device=dev) >= rate).float()


def run(quick: bool, repeats: int, threads: int, device: str = "cpu", amp: bool = False,
        train_batch: int = 128, infer_batch: int = 512, forms=TORCH_FORMS) -> dict:
  """The given forms of the four workloads; ``amp`` = bfloat16 autocast (GPU)."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  depth, tb, ib, ab, en, ek, es = ((8, 16, 32, 8, 4, 2, 2) if quick else
                                   (20, train_batch, infer_batch, 100, 100, 10, 10))
  dev = torch.device(device)
  gen = torch.Generator(device=dev).manual_seed(0)
  out = {"framework": "torch", "torch": torch.__version__, "threads": threads, "depth": depth,
         "device": device, "amp_bf16": amp, "machine_before": machine(), "results": {}}
  if dev.type == "cuda":
    out["device_kind"] = torch.cuda.get_device_name(dev)
  res = out["results"]
  # CUDA runs asynchronously: every timed call ends with a synchronize.
  noop = (lambda _: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda _: None)
  rand = lambda *shape: torch.rand(*shape, generator=gen, device=dev)
  autocast = lambda: torch.autocast(dev.type, torch.bfloat16, enabled=amp)
  for form in forms:
    fmt = torch.contiguous_format if form == "plain" else torch.channels_last
    model = ResNet(depth).to(dev, memory_format=fmt)
    # The compiled form traces the same module (train and eval mode are compiled
    # separately, on their first call, inside the untimed warm-up).
    net = torch.compile(model) if form == "compiled" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    xb = torch.randint(0, 256, (tb, 3, 32, 32), dtype=torch.uint8, device=dev)
    yb = torch.randint(0, 10, (tb,), device=dev)

    def train_step():
      model.train()
      x = augment_and_drop(xb, 0.9, gen).contiguous(memory_format=fmt)
      with autocast():
        loss = F.cross_entropy(net(x), yb)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return loss.item()

    r = measure(train_step, noop, repeats, warmup=TRAIN_WARMUP)
    res[f"train[{form}]"] = {"batch": tb, **r, "images_per_s": tb / r["median_s"]}
    model.eval()
    xi = (rand(ib, 3, 32, 32) * 2 - 1).contiguous(memory_format=fmt)

    def infer():
      with torch.inference_mode(), autocast():
        return net(xi).sum().item()

    r = measure(infer, noop, repeats)
    res[f"infer[{form}]"] = {"batch": ib, **r, "images_per_s": ib / r["median_s"]}
    xa = (rand(ab, 3, 32, 32) * 2 - 1).contiguous(memory_format=fmt)

    def avg10():
      with torch.inference_mode(), autocast():
        if form == "plain":
          xs = xa.repeat(10, 1, 1, 1)
          p = F.softmax(net(xs * (rand(xs.shape) >= 0.9)).float(), -1)
          return p.view(10, ab, -1).mean(0).sum().item()
        acc = 0
        for _ in range(10):
          acc = acc + F.softmax(net(xa * (rand(xa.shape) >= 0.9)).float(), -1)
        return (acc / 10).sum().item()

    r = measure(avg10, noop, repeats)
    res[f"avg10[{form}]"] = {"batch": ab, "masks": 10, **r, "images_per_s": ab / r["median_s"]}
    x0 = (rand(en, 3, 32, 32) * 2 - 1).contiguous(memory_format=fmt)
    y0 = torch.zeros(en, dtype=torch.long, device=dev)
    eps, step = 32 / 255, 4 / 255
    for p_ in model.parameters():
      p_.requires_grad_(False)

    def eot_pgd():
      x = x0.clone()
      for _ in range(es):
        x.requires_grad_(True)
        if form == "plain":
          xs = x.repeat(ek, 1, 1, 1)
          m = (rand(xs.shape) >= 0.9).float()
          with autocast():
            loss = F.cross_entropy(net(xs * m).float(), y0.repeat(ek), reduction="sum")
          g, = torch.autograd.grad(loss, x)
        else:
          g = torch.zeros_like(x)
          for _ in range(ek):
            m = (rand(x.shape) >= 0.9).float()
            with autocast():
              loss = F.cross_entropy(net(x * m).float(), y0, reduction="sum")
            g += torch.autograd.grad(loss, x)[0]
        with torch.no_grad():
          x = (x0 + (x + step * g.sign() - x0).clamp(-eps, eps)).clamp(-1, 1)
      return x

    r = measure(eot_pgd, noop, max(1, repeats // 2))
    res[f"eot_pgd[{form}]"] = {"images": en, "masks": ek, "steps": es, **r,
                               "image_steps_per_s": en * es / r["median_s"]}
  out["machine_after"] = machine()
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="CPU threads (torch.set_num_threads)")
  p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
  p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
  p.add_argument("--train_batch", type=int, default=128, help="train-step batch size")
  p.add_argument("--infer_batch", type=int, default=512, help="inference batch size")
  p.add_argument("--forms", nargs="+", choices=TORCH_FORMS, default=list(TORCH_FORMS),
                 help="which PyTorch forms to time (default: all; 'compiled' needs a C++ "
                      "compiler on the CPU and takes a few minutes to compile)")
  args = p.parse_args(argv)
  json.dump(run(args.quick, args.repeats, args.threads, args.device, args.amp,
                args.train_batch, args.infer_batch, tuple(args.forms)), sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
