"""experiments/lib.sh's helpers (the experiment scripts' shared shell functions)."""
import json
import os
import subprocess

LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                   "lib.sh")


def _lib(command: str, cwd: str) -> str:
  return subprocess.run(["bash", "-c", f'source "{LIB}" && {command}'], cwd=cwd, check=True,
                        capture_output=True, text=True).stdout.strip()


def test_training_minutes_sums_the_logged_throughput_not_the_gaps(tmp_path):
  """Two logged intervals: 100 steps x 60 images at 100 img/s = 60 s, then 200 steps
  at 50 img/s = 240 s; validation rows and a restart's gap do not count."""
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps({"batch_size": 60}))
  rows = [{"kind": "train", "step": 100, "images_per_s": 100.0},
          {"kind": "val", "step": 100, "accuracy_clean": 0.5},
          {"kind": "train", "step": 300, "images_per_s": 50.0}]
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert _lib(f'training_minutes "{wd}"', os.path.dirname(os.path.dirname(LIB))) == "5"


def test_hardware_line_names_the_cpu_its_vector_width_and_cores(tmp_path):
  line = _lib("hardware_line", str(tmp_path))
  assert ("(AVX-512)" in line) or ("(AVX2)" in line)
  assert line.endswith(f", {len(os.sched_getaffinity(0))} cores")  # nproc: the usable cores
