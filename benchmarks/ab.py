"""Interleaved A/B runs (A B A B ...) of the JAX benchmark under settings given as
environment variables.

    python benchmarks/ab.py --preset native_conv --rounds 4
    python benchmarks/ab.py --variant base= --variant no_barrier=DROPJAX_CONV_BARRIER=0

Each measurement is a fresh process (XLA reads its flags, and
``dropjax.backend.resolve`` the switches, at start-up) running ``bench.py --workloads ...``;
alternating the variants spreads background load evenly over them, which
matters on a VM whose speed drifts by +-20-30% between minutes.  Prints JSON
rows, one per measurement, then the per-variant median and the ratio of
each variant to the first; ``--out`` also writes the rows (JSON lines).

``--inprocess`` (the train step, ``--workload infer``: one batch of 512, or
``--workload eot_grad``: one EOT gradient of 100 images x 10 masks) compiles
every variant in one process and then alternates them call by call: much less
noisy, but only for the switches
``dropjax.backend.resolve`` reads (``DROPJAX_CPU_CONV``, ``DROPJAX_NATIVE_CONV``,
``DROPJAX_NATIVE_FORWARD``, ``DROPJAX_POLYPHASE``, ``DROPJAX_CONV_BARRIER``,
``DROPJAX_BLOCK_BARRIER``, ...), not for ``XLA_FLAGS``, which a process reads once.

    python benchmarks/ab.py --inprocess --workload eot_grad --preset native_forward

``--checkout NAME=DIR`` adds a variant that runs ``DIR/benchmarks/bench.py``
(another checkout of dropjax, e.g. the commit before a change), so two
commits are compared in alternating fresh processes:

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab.py --checkout before=/tmp/before --checkout after=. --rounds 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    # The XLA CPU flag that dropjax sets by default (backend.CPU_XLA_FLAGS).
    "xla_flags": {
        "default_xla": {"DROPJAX_NO_XLA_DEFAULTS": "1", "XLA_FLAGS": ""},
        "ynn_fusion_off (dropjax default)": {"XLA_FLAGS": ""},
    },
    # The native weight-gradient kernel and the fusion barrier (train step).
    "native_conv": {
        "xla_dw+barrier": {"DROPJAX_NATIVE_CONV": "0", "DROPJAX_CONV_BARRIER": "1"},
        "native_dw+barrier": {"DROPJAX_NATIVE_CONV": "1", "DROPJAX_CONV_BARRIER": "1"},
        "native_dw": {"DROPJAX_NATIVE_CONV": "1", "DROPJAX_CONV_BARRIER": "0"},
    },
    # The native forward / input-gradient kernel (conv_forward.cc) against XLA's.
    "native_forward": {
        "xla_forward": {"DROPJAX_NATIVE_FORWARD": "0"},
        "native_forward (default)": {},
    },
    # The native forward kernel's AVX-512 tiles against its AVX2 tiles (same values).
    # Inference: conv, batch norm, residual and ReLU in one native pass (conv_norm.py)
    # against the native convolution followed by XLA's elementwise loop.
    "fused_conv_norm": {
        "separate_ops": {"DROPJAX_FUSED_CONV_NORM": "0"},
        "fused (default)": {},
    },
    "native_norm_act": {
        "xla_norm_act": {"DROPJAX_NATIVE_NORM_ACT": "0"},
        "native_norm_act (default)": {},
    },
    "native_avx512": {
        "avx2_tiles": {"DROPJAX_NATIVE_AVX512": "0"},
        "avx512_tiles (default with AVX-512F)": {"DROPJAX_NATIVE_AVX512": "1"},
    },
    # dropjax.xla_cpu.conv as a whole (native weight gradient + polyphase strided input
    # gradient) against XLA's convolution gradients.
    # The fusion barrier on each residual block's input (train step, --inprocess).
    "block_barrier": {
        "no_block_barrier": {"DROPJAX_BLOCK_BARRIER": "0"},
        "block_barrier (default)": {"DROPJAX_BLOCK_BARRIER": "1"},
    },
    # glibc keeping XLA:CPU's per-run temporaries (a process setting: not --inprocess).
    "host_malloc": {
        "glibc_default": {"DROPJAX_HOST_MALLOC": "0"},
        "host_malloc (default)": {},
    },
    "cpu_conv": {
        "xla_gradients": {"DROPJAX_CPU_CONV": "0"},
        "native_dw": {"DROPJAX_CPU_CONV": "1", "DROPJAX_POLYPHASE": "0"},
        "native_dw+polyphase (default)": {"DROPJAX_CPU_CONV": "1"},
    },
}


def parse_variant(text: str) -> tuple[str, dict]:
  """``name=K1=V1,K2=V2`` -> (name, {K1: V1, K2: V2}); ``name=`` is no change."""
  name, _, rest = text.partition("=")
  env = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
  return name, env


def _inprocess_workload(workload: str):
  """``(make(), args, items)``: a traced-per-call builder of the jitted workload,
  its arguments and the items one call processes (images or image-steps)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import bench  # pylint: disable=g-import-not-at-top
  from dropjax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  _, _, _, state, _ = bench.setup(20)
  key = jax.random.PRNGKey(1)
  if workload == "train":
    batch = jax.tree.map(jnp.asarray, bench.synthetic_batch(128))

    def make_train():  # the model's layers resolved under the variant's switches
      cfg, model, tx, _, _ = bench.setup(20)
      return jax.jit(step_lib.make_train_step(cfg, model, tx))
    return make_train, (state, batch, key), 128
  if workload == "infer":  # one inference batch of 512 images
    x512 = bench.images(512)
    return (lambda: jax.jit(bench.setup(20)[4]), (state.variables, x512), 512)
  # eot_grad: one EOT gradient, 100 images x 10 masks (the body of an EOT-PGD step)
  x, y = bench.images(100), jnp.zeros((100,), jnp.int32)
  return (lambda: bench.eot_grad_fn(bench.setup(20)[4], 10, "vmap", key),
          (state.variables, x, y), 100)


def inprocess(variants: dict, rounds: int, steps: int, workload: str) -> list[dict]:
  """Alternates compiled programs of each variant (env applied at trace time)."""
  import time  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(HERE))
  import jax  # pylint: disable=g-import-not-at-top

  make, args, items = _inprocess_workload(workload)
  compiled = {}
  saved = dict(os.environ)
  for name, env in variants.items():
    if any(k == "XLA_FLAGS" for k in env):
      raise SystemExit("--inprocess cannot vary XLA_FLAGS (read once per process)")
    os.environ.update(env)
    fn = make().lower(*args).compile()
    jax.block_until_ready(fn(*args))  # warm-up
    compiled[name] = fn
    os.environ.clear()
    os.environ.update(saved)
  rows = []
  for r in range(rounds):
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = fn(*args)
      jax.block_until_ready(out)
      sec = (time.perf_counter() - t0) / steps
      row = {"round": r, "variant": name, "env": variants[name], "workload": workload,
             "rate": items / sec, "median_s": sec, "inprocess": True,
             "loadavg": list(os.getloadavg())}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of variants")
  p.add_argument("--variant", action="append", default=[],
                 help="NAME=ENV=VALUE[,ENV=VALUE...] (repeatable; after the preset's)")
  p.add_argument("--checkout", action="append", default=[],
                 help="NAME=DIR: a variant running DIR/benchmarks/bench.py (another "
                 "checkout, e.g. the commit before a change); repeatable")
  p.add_argument("--rounds", type=int, default=2, help="A B ... rounds")
  p.add_argument("--workload", default="train",
                 choices=["train", "infer", "avg10", "eot_pgd", "eot_grad", "adv_train"],
                 help="eot_grad (one EOT gradient, 100 images x 10 masks): --inprocess only; "
                 "adv_train (a PGD adversarial-training step, bench.py's): fresh processes only")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
  p.add_argument("--eot_form", default="vmap:full", help="eot_pgd: the bench.py EOT form")
  p.add_argument("--out", help="also write the rows here (JSON lines)")
  p.add_argument("--inprocess", action="store_true",
                 help="train, infer or eot_grad: compile all variants in one process, "
                 "alternate them")
  p.add_argument("--steps", type=int, default=3, help="--inprocess: steps per measurement")
  args = p.parse_args(argv)
  variants = dict(PRESETS.get(args.preset, {}))
  variants.update(parse_variant(v) for v in args.variant)
  checkouts = {}
  for text in args.checkout:
    name, _, path = text.partition("=")
    if not os.path.isfile(os.path.join(path, "benchmarks", "bench.py")):
      p.error(f"--checkout {text}: no benchmarks/bench.py under {path!r}")
    checkouts[name] = os.path.abspath(path)
    variants[name] = {}
  if not variants:
    p.error("give --preset, --variant or --checkout")
  if args.inprocess and checkouts:
    p.error("--checkout variants run in fresh processes (no --inprocess)")
  if args.inprocess and args.workload not in ("train", "infer", "eot_grad"):
    p.error("--inprocess runs the train, infer or eot_grad workload")
  if args.workload == "eot_grad" and not args.inprocess:
    p.error("--workload eot_grad needs --inprocess")
  rows = inprocess(variants, args.rounds, args.steps, args.workload) if args.inprocess else []
  for r in range(0 if args.inprocess else args.rounds):
    for name, env in variants.items():
      extra = ["--eot_forms", args.eot_form] if args.workload == "eot_pgd" else []
      script = os.path.join(checkouts.get(name, os.path.dirname(HERE)), "benchmarks", "bench.py")
      out = subprocess.run([sys.executable, script, "--workloads",
                            args.workload, "--repeats", str(args.repeats), *extra],
                           env={**os.environ, **env}, capture_output=True, text=True,
                           check=True)
      res = json.loads(out.stdout)
      result = next(v for k, v in res["results"].items() if k.split("[")[0] == args.workload)
      rate = next(v for k, v in result.items() if k.endswith("_per_s"))
      row = {"round": r, "variant": name, "env": env, "workload": args.workload,
             "checkout": checkouts.get(name),
             "rate": rate, "median_s": result.get("median_s"),
             "xla_flags": res["xla_flags"], "loadavg": res["machine_before"]["loadavg"]}
      rows.append(row)
      print(json.dumps(row), flush=True)
  base = None
  for name in variants:
    med = statistics.median(r["rate"] for r in rows if r["variant"] == name)
    base = base or med
    print(f"{name:40s} median {med:8.1f}/s  ratio to first {med / base:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return rows


if __name__ == "__main__":
  main()
