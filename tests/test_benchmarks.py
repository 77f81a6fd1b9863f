"""The benchmark comparison logic (not timings: those only come from benchmark runs)."""
from benchmarks import run


def test_compare_picks_best_jax_form_and_names_ratios():
  jax_res = {"results": {"train": {"images_per_s": 150.0}, "infer": {"images_per_s": 700.0},
                         "avg10": {"images_per_s": 70.0},
                         "eot_pgd[vmap:full]": {"image_steps_per_s": 30.0},
                         "eot_pgd[batch:full]": {"image_steps_per_s": 40.0}}}
  t = lambda p, b, m="images_per_s": {f"[plain]": {m: p}, "[best]": {m: b}}
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


def test_eot_memory_analysis_grows_with_the_number_of_masks():
  from benchmarks import eot_memory
  one = eot_memory.analyse(batch=4, masks=1, steps=2, depth=8)
  four = eot_memory.analyse(batch=4, masks=4, steps=2, depth=8)
  assert one["temp_size_in_bytes"] > 0
  # The backward pass keeps the activations of batch x masks images alive.
  assert four["temp_size_in_bytes"] > 2 * one["temp_size_in_bytes"]
  assert four["peak_estimate_gib"] > one["peak_estimate_gib"]
