"""A/B of XLA CPU flag sets on the ResNet-20 train step, interleaved A B A B ...

    python benchmarks/xla_flags.py --rounds 2

Each measurement is a fresh process (XLA reads its flags at start-up) running
``bench.py --workloads train``; alternating the variants spreads any background
load evenly over them.  Prints and returns JSON rows, one per measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "default_xla": {"DROPJAX_NO_XLA_DEFAULTS": "1", "XLA_FLAGS": ""},
    "ynn_fusion_off (dropjax default)": {"XLA_FLAGS": ""},
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args(argv)
  rows = []
  for r in range(args.rounds):
    for name, env in VARIANTS.items():
      out = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--workloads",
                            "train", "--repeats", "5"], env={**os.environ, **env},
                           capture_output=True, text=True, check=True)
      res = json.loads(out.stdout)
      row = {"round": r, "variant": name, "xla_flags": res["xla_flags"],
             "images_per_s": res["results"]["train"]["images_per_s"],
             "loadavg": res["machine_before"]["loadavg"]}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


if __name__ == "__main__":
  main()
