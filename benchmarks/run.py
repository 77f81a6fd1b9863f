"""Runs the JAX and PyTorch benchmarks back to back and writes the comparison.

    python benchmarks/run.py [--quick] [--scaling] [--rounds 3] [--name MACHINE]
    python benchmarks/run.py --name h100 --eot_forms vmap:1 batch:1 \
        --torch_args="--device cuda" [--jax_args="--half_precision"]     # GPU

With ``--rounds N`` the two run alternately N times (JAX, PyTorch, JAX, ...)
and every throughput is the median over rounds, each ratio the median of the
per-round ratios (paired, so a slow minute on the VM hits both sides).

Writes ``benchmarks/results/<date>-<machine>.json`` (both raw results, machine
facts, library versions, XLA flags, load averages, and ``ratio_*`` keys =
JAX throughput / PyTorch throughput, one per PyTorch form: eager NCHW "plain",
eager channels_last "best", and "compiled", the best form under
``torch.compile``; ``--torch_args="--forms plain best"`` skips the compile) and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import TORCH_FORMS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = (("train", "images_per_s"), ("infer", "images_per_s"),
             ("avg10", "images_per_s"), ("eot", "image_steps_per_s"))


def _run(script: str, args: list[str]) -> dict:
  out = subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{script} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout)


def best_jax(results: dict, workload: str, metric: str) -> tuple[str, float]:
  prefix = "eot_pgd" if workload == "eot" else workload
  cands = {k: v[metric] for k, v in results.items()
           if (k == prefix or k.startswith(prefix + "[")) and metric in v}
  key = max(cands, key=cands.get)
  return key, cands[key]


def compare(jax_res: dict, torch_res: dict) -> tuple[dict, str]:
  """``ratio_<workload>_jax_vs_torch_<form>`` = JAX's best form / each PyTorch form measured
  (the ``compiled`` form only where torch_reference.py ran it), and a markdown table."""
  res = torch_res["results"]
  forms = [f for f in TORCH_FORMS if all(f"{'eot_pgd' if w == 'eot' else w}[{f}]" in res
                                         for w, _ in WORKLOADS)]
  ratios = {}
  lines = ["| workload | JAX (best form) | " + " | ".join(f"PyTorch {f}" for f in forms)
           + " | " + " | ".join(f"JAX / {f}" for f in forms) + " |",
           "|---|---|" + "---|" * (2 * len(forms))]
  for workload, metric in WORKLOADS:
    name = "eot_pgd" if workload == "eot" else workload
    jk, jv = best_jax(jax_res["results"], workload, metric)
    tv = [res[f"{name}[{f}]"][metric] for f in forms]
    for f, v in zip(forms, tv):
      ratios[f"ratio_{workload}_jax_vs_torch_{f}"] = jv / v
    lines.append(f"| {workload} ({metric}) | {jv:.1f} ({jk}) | "
                 + " | ".join(f"{v:.1f}" for v in tv) + " | "
                 + " | ".join(f"{jv / v:.2f}" for v in tv) + " |")
  return ratios, "\n".join(lines)


def median_results(rounds: list[dict]) -> dict:
  """Per-workload median over rounds of each ``*_per_s`` field (other fields: round 0)."""
  import statistics  # pylint: disable=g-import-not-at-top

  merged = json.loads(json.dumps(rounds[0]))
  for name, row in merged["results"].items():
    if not all(name in r["results"] for r in rounds):
      continue  # e.g. the scaling rows, measured in round 0 only
    for k in row:
      if k.endswith("_per_s"):
        row[k] = statistics.median(r["results"][name][k] for r in rounds)
  return merged


def paired_ratios(jax_rounds: list[dict], torch_rounds: list[dict]) -> dict:
  """Median over rounds of the per-round ratios (round i of JAX vs round i of PyTorch)."""
  import statistics  # pylint: disable=g-import-not-at-top

  per_round = [compare(j, t)[0] for j, t in zip(jax_rounds, torch_rounds)]
  return {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  p.add_argument("--scaling", action="store_true", help="JAX batch-size and K scaling too")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--name", default=socket.gethostname(), help="machine name for the file")
  p.add_argument("--out_dir", default=os.path.join(HERE, "results"))
  p.add_argument("--rounds", type=int, default=1,
                 help="alternate JAX and PyTorch this many times; report medians")
  p.add_argument("--eot_forms", nargs="+", default=None,
                 help="JAX EOT-PGD forms to run (bench.py --eot_forms; default: all of them)")
  p.add_argument("--jax_args", default="",
                 help="more arguments for bench.py, e.g. '--half_precision'")
  p.add_argument("--torch_args", default="",
                 help="more arguments for torch_reference.py, e.g. '--device cuda --amp'")
  args = p.parse_args(argv)
  common = ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
  load_before = os.getloadavg()
  jax_rounds, torch_rounds = [], []
  os.makedirs(args.out_dir, exist_ok=True)
  partial = os.path.join(args.out_dir, f".{args.name}-rounds-partial.json")
  for r in range(args.rounds):
    jax_rounds.append(_run("bench.py", common + (["--scaling"] if args.scaling and r == 0 else [])
                           + (["--eot_forms", *args.eot_forms] if args.eot_forms else [])
                           + shlex.split(args.jax_args)))
    torch_rounds.append(_run("torch_reference.py", common + shlex.split(args.torch_args)))
    print(f"round {r + 1}/{args.rounds}: {compare(jax_rounds[-1], torch_rounds[-1])[0]}",
          file=sys.stderr, flush=True)
    with open(partial, "w") as f:  # a crash or a kill later keeps the finished rounds
      json.dump({"jax_rounds": jax_rounds, "torch_rounds": torch_rounds}, f)
  load_after = os.getloadavg()
  jax_res, torch_res = median_results(jax_rounds), median_results(torch_rounds)
  _, table = compare(jax_res, torch_res)
  ratios = paired_ratios(jax_rounds, torch_rounds)
  record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": args.name,
            "quick": args.quick, "loadavg_before": load_before, "loadavg_after": load_after,
            "cpu_model": jax_res["machine_before"]["cpu_model"],
            "cpu_count": jax_res["machine_before"]["cpu_count"],
            "device_kind": jax_res.get("device_kind"), "jax_args": args.jax_args,
            "torch_args": args.torch_args,
            "versions": {"jax": jax_res["jax"], "torch": torch_res["torch"]},
            "xla_flags": jax_res["xla_flags"], **ratios, "table": table,
            "rounds": args.rounds, "jax": jax_res, "torch": torch_res,
            "jax_rounds": jax_rounds, "torch_rounds": torch_rounds}
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir,
                      f"{datetime.date.today().isoformat()}-{args.name}"
                      f"{'-quick' if args.quick else ''}.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  os.remove(partial)
  print(table)
  if args.rounds > 1:
    print("\nmedian of paired per-round ratios: "
          + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
  print(f"\nload average before {load_before}, after {load_after}\nwrote {path}")


if __name__ == "__main__":
  main()
