"""dropjax's APGD beside the authors' algorithm as ported in torchattacks (3.5.1), on a
deterministic model: the same weights in both frameworks, the same test images.

    pip install -r requirements-bench.txt torchattacks==3.5.1
    python experiments/apgd_vs_torchattacks.py --model pretrained/gtsrb-resnet20-random \
        --num_examples 500 --out experiments/results/apgd_vs_torchattacks.json

The model is evaluated without pixel dropping (a deterministic classifier, so both
attacks see the same function).  Budgets: ``--eps`` on the [0, 1] pixel scale (what
torchattacks takes); dropjax gets twice it in units of X ∈ [-1, 1] (its literal
reading).  Writes the robust accuracy of each (loss, norm) for both implementations,
their difference, and the clean accuracy of both framework's copies of the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dropjax import backend as backend_lib  # noqa: E402

backend_lib.configure_process()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchattacks  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from benchmarks.torch_reference import ResNet  # noqa: E402
from dropjax import pretrained  # noqa: E402
from dropjax.attacks import APGDConfig, make_apgd  # noqa: E402
from dropjax.data import augment, load_dataset  # noqa: E402


def to_torch(variables: dict, depth: int, num_classes: int) -> torch.nn.Module:
  """The same network in PyTorch (benchmarks/torch_reference.ResNet), weights copied."""
  net = ResNet(depth, num_classes).eval()
  p, s = jax.device_get(variables["params"]), jax.device_get(variables["batch_stats"])
  t = lambda a: torch.tensor(np.asarray(a))
  conv = lambda k: t(np.transpose(np.asarray(k), (3, 2, 0, 1)))  # HWIO -> OIHW

  def bn(mod, pp, ss):
    mod.weight.data, mod.bias.data = t(pp["scale"]), t(pp["bias"])
    mod.running_mean.data, mod.running_var.data = t(ss["mean"]), t(ss["var"])

  net.stem.weight.data = conv(p["stem"]["kernel"])
  bn(net.bn, p["stem_bn"], s["stem_bn"])
  n = (depth - 2) // 6
  for i, block in enumerate(net.layers):
    name = f"stage{i // n + 1}_block{i % n + 1}"
    block.c1.weight.data = conv(p[name]["Conv_0"]["kernel"])
    block.c2.weight.data = conv(p[name]["Conv_1"]["kernel"])
    bn(block.b1, p[name]["BatchNorm_0"], s[name]["BatchNorm_0"])
    bn(block.b2, p[name]["BatchNorm_1"], s[name]["BatchNorm_1"])
  net.head.weight.data = t(np.asarray(p["head"]["kernel"]).T)
  net.head.bias.data = t(p["head"]["bias"])
  return net


class OnUnitScale(torch.nn.Module):
  """torchattacks feeds images in [0, 1]; the model takes X = 2x - 1."""

  def __init__(self, net):
    super().__init__()
    self.net = net

  def forward(self, x):
    return self.net(2 * x - 1)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="packaged model dir or name (pretrained/)")
  p.add_argument("--num_examples", type=int, default=500, help="test images")
  p.add_argument("--batch_size", type=int, default=100, help="images per attack call")
  p.add_argument("--steps", type=int, default=100, help="APGD iterations")
  p.add_argument("--linf_eps", type=float, default=8 / 255, help="L-inf budget, [0,1] scale")
  p.add_argument("--l2_eps", type=float, default=0.5, help="L2 budget, [0,1] scale")
  p.add_argument("--losses", nargs="+", default=["ce", "dlr"], help="ce and/or dlr")
  p.add_argument("--norms", nargs="+", default=["linf", "l2"], help="linf and/or l2")
  p.add_argument("--data_dir", default=os.environ.get("DROPJAX_DATA_DIR"), help="local data")
  p.add_argument("--out", default=None, help="write the JSON result here")
  args = p.parse_args(argv)

  torch.manual_seed(0)
  pre = pretrained.load(args.model)
  data = load_dataset(pre.config.dataset, source="local", data_dir=args.data_dir,
                      val_size=pre.config.val_size, seed=pre.config.seed)
  n = args.num_examples
  x_u8, y = data.test.x[:n], data.test.y[:n].astype(np.int64)
  # .eval() on the wrapper too: torchattacks restores the wrapper's training flag after
  # every call, and a fresh Module is in training mode -- BatchNorm would then run on
  # batch statistics (and update its running ones) while we score the adversarial images.
  net = OnUnitScale(to_torch(pre.variables, pre.config.depth, data.num_classes)).eval()
  x01 = torch.tensor(x_u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  x_jax = augment.to_float(x_u8)
  with torch.no_grad():
    torch_pred = net(x01).argmax(1).numpy()
  jax_pred = np.asarray(jnp.argmax(pre.logits_fn(pre.variables, x_jax), -1))
  result = {"model": args.model, "num_examples": n, "steps": args.steps,
            "clean_accuracy_jax": float(np.mean(jax_pred == y)),
            "clean_accuracy_torch": float(np.mean(torch_pred == y)),
            "prediction_agreement": float(np.mean(jax_pred == torch_pred)),
            "torchattacks": torchattacks.__version__, "jax": jax.__version__,
            "torch": torch.__version__, "machine": machine(), "rows": []}
  for norm in args.norms:
    eps01 = args.linf_eps if norm == "linf" else args.l2_eps
    for loss in args.losses:
      cfg = APGDConfig(norm=norm, eps=2 * eps01, num_steps=args.steps, loss=loss,
                       eot_samples=0)  # literal reading: X units = 2 x [0,1] scale
      attack = jax.jit(make_apgd(pre.logits_fn, cfg,
                                 unroll=backend_lib.resolve().loop_unroll(args.steps)))
      ta = torchattacks.APGD(net, norm="Linf" if norm == "linf" else "L2", eps=eps01,
                             steps=args.steps, n_restarts=1, seed=0, loss=loss, rho=0.75)
      ok_jax, ok_torch, t_jax, t_torch = [], [], 0.0, 0.0
      for lo in range(0, n, args.batch_size):
        sl = slice(lo, min(lo + args.batch_size, n))
        t0 = time.perf_counter()
        xa = jax.block_until_ready(attack(jax.random.PRNGKey(lo), pre.variables, x_jax[sl],
                                          jnp.asarray(y[sl], jnp.int32)))
        t_jax += time.perf_counter() - t0
        ok_jax += list(np.asarray(jnp.argmax(pre.logits_fn(pre.variables, xa), -1)) == y[sl])
        t0 = time.perf_counter()
        xt = ta(x01[sl], torch.tensor(y[sl]))
        t_torch += time.perf_counter() - t0
        net.eval()
        if any(m.training for m in net.modules()):
          raise RuntimeError("the PyTorch model is not in eval mode")
        with torch.no_grad():
          ok_torch += list(net(xt).argmax(1).numpy() == y[sl])
      row = {"norm": norm, "loss": loss, "eps_pixel01": eps01, "eps_x_units": 2 * eps01,
             "robust_accuracy_dropjax": float(np.mean(ok_jax)),
             "robust_accuracy_torchattacks": float(np.mean(ok_torch)),
             "seconds_dropjax": t_jax, "seconds_torchattacks": t_torch}
      row["difference_points"] = 100 * (row["robust_accuracy_dropjax"]
                                        - row["robust_accuracy_torchattacks"])
      print(json.dumps(row), flush=True)
      result["rows"].append(row)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True, default=str)
      f.write("\n")
  print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "machine")}))


if __name__ == "__main__":
  main()
