"""What XLA compiled a workload into: op counts of the optimized HLO (any backend).

    python benchmarks/hlo_ops.py [--workload infer] [--batch 512] [--half_precision] \\
        [--hlo_out infer.hlo.txt]

Counts the instructions of the compiled program's entry computation and of the
while-loop bodies it calls by opcode (``fusion``, ``custom-call`` by target,
``transpose``, ``copy``, ...), and the fusions by kind.  On GPU each fusion
and custom call is (at least) one kernel launch, and layout ``copy`` /
``transpose`` ops around convolutions are memory passes that a channels-last
framework does not make, so these counts explain a throughput gap before any
profiler is needed.  Prints one JSON row; ``--hlo_out`` also writes the text.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dropjax import backend as backend_lib  # noqa: E402

if __name__ == "__main__":
  backend_lib.configure_process()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import bench  # noqa: E402
from dropjax.training import parallel, step as step_lib  # noqa: E402

# "%name = TYPE opcode(" where TYPE may be a tuple "(f32[...], u8[...])".
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?\S+\s*=\s*(?:\([^()]*\)|\S+)\s+([a-z][a-z0-9-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KIND = re.compile(r"kind=(k\w+)")


def compiled_text(workload: str, batch: int, half_precision: bool) -> str:
  cfg, model, tx, state, logits_fn = bench.setup(20, half_precision)
  if workload == "infer":
    x = jnp.zeros((batch, 32, 32, 3), jnp.float32)
    return jax.jit(logits_fn).lower(state.variables, x).compile().as_text()
  if workload == "train":
    runner = parallel.JitRunner(step_lib.make_train_step(cfg, model, tx), batch)
    b = runner.put_batch(bench.synthetic_batch(batch))
    s = runner.put_state(state)
    step = runner._step  # pylint: disable=protected-access
    return step.lower(s, b, jax.random.PRNGKey(0)).compile().as_text()
  raise ValueError(f"unknown workload {workload!r}: infer or train")


_CONTROL = re.compile(r"(?:body|condition|true_computation|false_computation)"
                      r"=%?([\w.-]+)|branch_computations=\{([^}]*)\}")


def _computations(hlo: str) -> tuple[dict, str | None]:
  """Computation name -> its instruction lines, and the entry computation's name."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      head = line.split("(")[0].split()
      is_entry = head[0] == "ENTRY"
      name = head[-1].lstrip("%")
      comps[name] = []
      if is_entry:
        entry = name
    elif name is not None and line.startswith(" "):
      comps[name].append(line)
  return comps, entry


def count_ops(hlo: str) -> dict:
  """Opcode counts over the computations that launch kernels: the entry
  computation and the while bodies / conditional branches it runs (fusion
  bodies and reducers are not counted; each fusion is one kernel)."""
  comps, entry = _computations(hlo)
  todo, seen = [entry], set()
  ops, targets, kinds = collections.Counter(), collections.Counter(), collections.Counter()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      for single, many in _CONTROL.findall(line):
        todo.extend([single] if single else [c.strip().lstrip("%") for c in many.split(",")])
      m = _INSTR.match(line)
      if not m:
        continue
      op = m.group(1)
      if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
        continue
      ops[op] += 1
      if op == "custom-call" and (t := _TARGET.search(line)):
        targets[t.group(1)] += 1
      if op == "fusion" and (k := _KIND.search(line)):
        kinds[k.group(1)] += 1
  return {"ops": dict(ops.most_common()), "custom_call_targets": dict(targets.most_common()),
          "fusion_kinds": dict(kinds.most_common())}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", default="infer", help="infer or train")
  p.add_argument("--batch", type=int, default=512, help="batch size")
  p.add_argument("--half_precision", action="store_true", help="bfloat16 compute")
  p.add_argument("--hlo_out", default=None, help="also write the optimized HLO text here")
  args = p.parse_args(argv)
  text = compiled_text(args.workload, args.batch, args.half_precision)
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(text)
  row = {"workload": args.workload, "batch": args.batch, "half_precision": args.half_precision,
         "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         **count_ops(text)}
  print(json.dumps(row))


if __name__ == "__main__":
  main()
