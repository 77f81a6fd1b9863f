"""The benchmark comparison logic (not timings: those only come from benchmark runs)."""
from benchmarks import run


def test_compare_picks_best_jax_form_and_names_ratios():
  jax_res = {"results": {"train": {"images_per_s": 150.0}, "infer": {"images_per_s": 700.0},
                         "avg10": {"images_per_s": 70.0},
                         "eot_pgd[vmap:full]": {"image_steps_per_s": 30.0},
                         "eot_pgd[batch:full]": {"image_steps_per_s": 40.0}}}
  t = lambda p, b, m="images_per_s": {"[plain]": {m: p}, "[best]": {m: b}}
  torch_res = {"results": {}}
  for name, (p, b) in {"train": (100, 300), "infer": (350, 1400), "avg10": (35, 70)}.items():
    torch_res["results"].update({name + k: v for k, v in t(p, b).items()})
  torch_res["results"].update({"eot_pgd" + k: v for k, v in
                               t(20, 40, "image_steps_per_s").items()})
  ratios, table = run.compare(jax_res, torch_res)
  assert ratios["ratio_train_jax_vs_torch_plain"] == 1.5
  assert ratios["ratio_eot_jax_vs_torch_best"] == 1.0  # batch form (40) chosen over vmap
  assert all("ratio" in k for k in ratios)
  assert any("train" in k for k in ratios) and any("eot" in k for k in ratios)
  assert "eot_pgd[batch:full]" in table
  assert "compiled" not in table  # a form torch_reference.py did not run has no column


def test_compare_adds_the_compiled_pytorch_form_where_it_ran():
  jax_res = {"results": {"train": {"images_per_s": 200.0}, "infer": {"images_per_s": 800.0},
                         "avg10": {"images_per_s": 80.0},
                         "eot_pgd[vmap:full]": {"image_steps_per_s": 30.0}}}
  torch_res = {"results": {}}
  for name, metric in (("train", "images_per_s"), ("infer", "images_per_s"),
                       ("avg10", "images_per_s"), ("eot_pgd", "image_steps_per_s")):
    for form, v in (("plain", 100.0), ("best", 200.0), ("compiled", 400.0)):
      torch_res["results"][f"{name}[{form}]"] = {metric: v}
  ratios, table = run.compare(jax_res, torch_res)
  assert ratios["ratio_train_jax_vs_torch_compiled"] == 0.5
  assert ratios["ratio_eot_jax_vs_torch_compiled"] == 30.0 / 400.0
  assert ratios["ratio_infer_jax_vs_torch_best"] == 4.0
  assert len(ratios) == 12
  header, rule, *rows = table.splitlines()
  assert "PyTorch compiled" in header and "JAX / compiled" in header
  assert all(r.count("|") == header.count("|") == rule.count("|") for r in rows)


def test_eot_memory_analysis_grows_with_the_number_of_masks():
  from benchmarks import eot_memory
  one = eot_memory.analyse(batch=4, masks=1, steps=2, depth=8)
  four = eot_memory.analyse(batch=4, masks=4, steps=2, depth=8)
  assert one["temp_size_in_bytes"] > 0
  # The backward pass keeps the activations of batch x masks images alive.
  assert four["temp_size_in_bytes"] > 2 * one["temp_size_in_bytes"]
  assert four["peak_estimate_gib"] > one["peak_estimate_gib"]


def test_hlo_ops_counts_kernels_in_loop_bodies_not_inside_fusions():
  import jax
  import jax.numpy as jnp
  from benchmarks import hlo_ops

  w = jnp.ones((3, 3, 2, 2))

  def conv(x):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def f(x):  # one convolution before a rolled loop of three, elementwise work between
    x = jnp.tanh(conv(x)) * 2
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.sin(conv(x)) + 1, x)

  x = jnp.ones((2, 8, 8, 2))
  row = hlo_ops.count_ops(jax.jit(f).lower(x).compile().as_text())
  # The loop body is counted once (it is one computation), the fusion bodies never:
  # exactly the two convolutions of the program text, and no bare tanh/sin ops.
  convs = row["ops"].get("convolution", 0) + sum(row["custom_call_targets"].values())
  assert convs == 2, row
  assert row["ops"].get("while", 0) == 1
  assert "tanh" not in row["ops"] and "sine" not in row["ops"]
  assert row["ops"].get("fusion", 0) >= 2
