"""The per-example worst case over attack families (dropjax.evaluation.combine)."""
import json
import os
import pathlib

import numpy as np
import pytest

from dropjax import evaluation, files
from dropjax.evaluation import combine, store, worst_case

METRICS = worst_case.METRICS


def fake_rows(broken: np.ndarray, seed: int = 0, preds=None) -> list[dict]:
  """Rows of one setting: ``broken`` (B, R) bool, the same for every metric."""
  rng = np.random.default_rng(seed)
  rows = []
  for i, draws in enumerate(broken):
    r = {"index": i, "label": i % 3, "pred_plain": i % 3, "pred_single": i % 3,
         "pred_avg": (i % 3) if preds is None else preds[i], "rejected_single": False,
         "rejected_avg": i == 1, "adv_rejected_avg": bool(rng.integers(2)),
         "norm_linf": float(rng.uniform()), "norm_l0": int(rng.integers(100))}
    for m in METRICS:
      r[f"adv_broken_{m}"] = [bool(b) for b in draws]
      r[f"adv_attack_{m}"] = "ce-untargeted"
    rows.append(r)
  return rows


def reference_accuracy(settings: list[np.ndarray]) -> float:
  """Independent reference: per example the setting with the highest broken
  rate (first on ties) counts with its draws; accuracy = 1 - broken share."""
  b, r = settings[0].shape
  broken = 0
  for i in range(b):
    rates = [s[i].mean() for s in settings]
    best = rates.index(max(rates))
    broken += settings[best][i].sum()
  return 1 - broken / (b * r)


def test_combine_matches_independent_reference_and_never_exceeds_a_setting():
  rng = np.random.default_rng(1)
  a, b, c = (rng.random((30, 3)) < p for p in (0.2, 0.4, 0.3))
  rows = combine.combine({"a": fake_rows(a), "b": fake_rows(b), "c": fake_rows(c)})
  assert [r["index"] for r in rows] == list(range(30))
  for m in METRICS:
    acc = worst_case.robust_accuracy(np.array([r[f"adv_broken_{m}"] for r in rows]))["mean"]
    assert acc == pytest.approx(reference_accuracy([a, b, c]))
    for s in (a, b, c):
      assert acc <= 1 - s.mean() + 1e-12
  # Each example's winner is named, and its norms are the largest of the attacks'.
  assert {r["adv_attack_avg"] for r in rows} <= {"a", "b", "c"}
  parts = [fake_rows(s) for s in (a, b, c)]
  assert [r["norm_linf"] for r in rows] == [max(p[i]["norm_linf"] for p in parts)
                                            for i in range(30)]


def test_a_setting_combined_with_itself_is_itself():
  broken = np.random.default_rng(2).random((20, 4)) < 0.5
  rows = combine.combine({"x": fake_rows(broken), "y": fake_rows(broken)})
  acc = worst_case.robust_accuracy(np.array([r["adv_broken_avg"] for r in rows]))
  assert acc["mean"] == pytest.approx(1 - broken.mean())
  assert {r["adv_attack_avg"] for r in rows} == {"x"}  # ties: the first


def test_combine_uses_the_common_examples_and_refuses_what_does_not_compare():
  broken = np.zeros((6, 2), bool)
  short = fake_rows(broken)[2:]
  assert [r["index"] for r in combine.combine({"a": fake_rows(broken), "b": short})] == \
      [2, 3, 4, 5]
  with pytest.raises(ValueError, match="two settings"):
    combine.combine({"a": fake_rows(broken)})
  with pytest.raises(ValueError, match="pred_avg differ"):
    combine.combine({"a": fake_rows(broken), "b": fake_rows(broken, preds=[1] * 6)})
  with pytest.raises(ValueError, match="draws"):
    combine.combine({"a": fake_rows(broken), "b": fake_rows(np.zeros((6, 3), bool))})
  with pytest.raises(ValueError, match="no example in common"):
    combine.combine({"a": fake_rows(broken)[:2], "b": short})


def test_groups_pair_attack_families_of_one_setting_only():
  base = dict(workdir="w", norm="linf", eps=0.1, budget_reading="literal", drop_rate=0.9,
              num_masks=10, score_draws=5, calibration="single", seed=0,
              robust_accuracy_avg=0.5)
  rows = [dict(base, setting="linf_eps0.1_literal_r0.9", variant=""),
          dict(base, setting="linf_eps0.1_literal_r0.9_apgd", variant="apgd"),
          dict(base, setting="linf_eps0.1_literal_r0.5", variant="", drop_rate=0.5),
          dict(base, setting="linf_eps0.1_literal_r0.9_worst", variant="worst of 2",
               combined_from=["a", "b"])]
  [group] = combine.groups(rows).values()
  assert [s["setting"] for s in group] == ["linf_eps0.1_literal_r0.9",
                                            "linf_eps0.1_literal_r0.9_apgd"]
  assert combine.base_setting(group[1]) == "linf_eps0.1_literal_r0.9"


def test_cli_combines_two_evaluated_attacks(tiny_workdir, tmp_path, capsys):
  from test_defense_eval import ev_config
  out = str(tmp_path / "ev")
  common = dict(num_examples=16, eps=[0.1])
  [ce] = evaluation.evaluate(tiny_workdir, ev_config(losses=("ce",), **common), out,
                             progress=False)
  [cw] = evaluation.evaluate(tiny_workdir, ev_config(losses=("cw",), **common), out,
                             progress=False)
  assert ce["setting"] != cw["setting"]
  dest = str(tmp_path / "worst.jsonl")
  assert combine.main([os.path.join(out, "summary.jsonl"), "--out", dest]) == 0
  [row] = files.read_jsonl(str(dest))
  assert row["combined_from"] == sorted([ce["setting"], cw["setting"]])
  assert row["num_examples"] == 16
  assert row["clean_accuracy_avg"] == ce["clean_accuracy_avg"] == cw["clean_accuracy_avg"]
  for m in METRICS:
    assert row[f"robust_accuracy_{m}"] <= min(ce[f"robust_accuracy_{m}"],
                                              cw[f"robust_accuracy_{m}"]) + 1e-12
    assert set(row[f"attack_wins_{m}"]) <= {combine.attack_name(ce), combine.attack_name(cw)}
  # Each family's own number on the same (here: all) examples is kept beside the worst.
  for m in ("avg", "avg_with_rejection"):
    assert row[f"robust_accuracy_{m}_by_attack"] == {
        combine.attack_name(ce): pytest.approx(ce[f"robust_accuracy_{m}"]),
        combine.attack_name(cw): pytest.approx(cw[f"robust_accuracy_{m}"])}
  assert "worst case per example" in capsys.readouterr().out
  # Run again: the combined row is replaced, not duplicated.
  assert combine.main([os.path.join(out, "summary.jsonl"), "--out", dest]) == 0
  assert len(pathlib.Path(dest).read_text().splitlines()) == 1
  assert combine.main([str(tmp_path / "nope.jsonl")]) == 2
  assert "nope.jsonl" in capsys.readouterr().err
  # Nothing left to combine: an error, unless --allow_empty (then no file is touched).
  assert combine.main([os.path.join(out, "summary.jsonl"), "--exclude", "cw"]) == 2
  assert "two attack families" in capsys.readouterr().err
  before = pathlib.Path(dest).read_text()
  assert combine.main([os.path.join(out, "summary.jsonl"), "--exclude", "cw", "--out", dest,
                       "--allow_empty"]) == 0
  assert "nothing to combine" in capsys.readouterr().out
  assert pathlib.Path(dest).read_text() == before


def test_exclude_keeps_a_family_run_on_fewer_images_out_of_the_full_combination(tmp_path):
  rng = np.random.default_rng(3)
  base = dict(workdir="w", norm="l0", eps=0.03, budget_reading="literal", drop_rate=0.9,
              num_masks=10, score_draws=5, calibration="single", seed=0,
              robust_accuracy_avg=0.5, dataset="gtsrb")
  name = "l0_eps0.03_r0.9"
  settings = {name: "", f"{name}_rejection": "rejection",
              f"{name}_sparse_rs_q1000_margin": "sparse_rs_q1000_margin"}
  broken = {s: rng.random((6, 5)) < 0.4 for s in settings}
  n_of = {s: 3 if "sparse_rs" in s else 6 for s in settings}  # Sparse-RS: first 3 only
  for s in settings:
    os.makedirs(tmp_path / s)
    with open(tmp_path / s / "rows.jsonl", "w") as f:
      for r in fake_rows(broken[s])[:n_of[s]]:
        f.write(json.dumps(r) + "\n")
  summaries = [dict(base, setting=s, variant=v) for s, v in settings.items()]

  [full] = combine.combine_summaries(summaries, [str(tmp_path)])
  assert full["setting"] == f"{name}_worst" and full["num_examples"] == 3
  assert full["num_examples_by_attack"] == {"pgd (paper)": 6, "rejection": 6,
                                            "sparse_rs_q1000_margin": 3}
  assert full["robust_accuracy_avg"] == pytest.approx(
      reference_accuracy([broken[s][:3] for s in settings]))

  [part] = combine.combine_summaries(summaries, [str(tmp_path)], exclude=("sparse_rs",))
  assert part["setting"] == f"{name}_worst-without-sparse_rs" and part["num_examples"] == 6
  assert part["combined_from"] == [name, f"{name}_rejection"]
  assert part["robust_accuracy_avg"] == pytest.approx(
      reference_accuracy([broken[name], broken[f"{name}_rejection"]]))
  # A pattern that matches nothing changes nothing (same id: it replaces the full row);
  # one that leaves a single family leaves no combination.
  [same] = combine.combine_summaries(summaries, [str(tmp_path)], exclude=("apgd",))
  assert same["setting"] == full["setting"] and same["num_examples"] == 3
  assert combine.combine_summaries(summaries, [str(tmp_path)],
                                   exclude=("sparse_rs", "rejection")) == []
  # The model's digest and weight decay, where the rows record them, carry over; rows of
  # two models (one workdir retrained between the attacks) are refused.
  m = store.MODEL_FIELD
  recorded = [dict(x, **{m: "a", "train_weight_decay": 5e-4}) for x in summaries[:2]]
  [one] = combine.combine_summaries(recorded + summaries[2:], [str(tmp_path)])
  assert one[m] == "a" and one["train_weight_decay"] == 5e-4
  with pytest.raises(ValueError, match="different models"):
    combine.combine_summaries([recorded[0], dict(recorded[1], **{m: "b"})] + summaries[2:],
                              [str(tmp_path)])
