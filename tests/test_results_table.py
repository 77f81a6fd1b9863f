"""experiments/results_table.py: RESULTS.md tables from summary rows."""
import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "results_table.py")
_spec = importlib.util.spec_from_file_location("results_table", _PATH)
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)


def test_later_rows_of_a_setting_win_and_variants_are_named(tmp_path):
  base = dict(norm="l0", eps=0.03, drop_rate=0.5, clean_accuracy_avg=0.9, num_examples=10,
              robust_accuracy_avg_with_rejection=0.5, robust_accuracy_single=0.2,
              robust_accuracy_single_with_rejection=0.4)
  rows = [dict(base, setting="l0_eps0.03_r0.5", robust_accuracy_avg=0.1),
          dict(base, setting="l0_eps0.03_r0.5", robust_accuracy_avg=0.3),
          dict(base, setting="l0_eps0.03_r0.5_rejection", variant="rejection",
           robust_accuracy_avg=0.2),
          dict(norm="none", setting="none_eps0_r0.5", drop_rate=0.5)]
  path = tmp_path / "summary.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = rt.read([str(path)])
  assert [(rt.variant(r), r["robust_accuracy_avg"]) for r in got] == [
      ("pgd (paper)", 0.3), ("rejection", 0.2)]
  assert "| l0 | 0.03·D | 0.5 | rejection |" in rt.table(got)


def test_families_table_lists_each_attack_and_the_worst_case():
  row = dict(norm="linf", eps=0.1, drop_rate=0.9, num_examples=500, setting="s_worst",
             robust_accuracy_avg=0.1, robust_accuracy_avg_std=0.01,
             robust_accuracy_avg_with_rejection=0.2,
             robust_accuracy_avg_by_attack={"pgd (paper)": 0.15, "apgd": 0.12},
             robust_accuracy_avg_with_rejection_by_attack={"pgd (paper)": 0.3, "apgd": 0.25})
  lines = rt.families_table([row]).splitlines()
  assert len(lines) == 2 + 3
  assert "| pgd (paper) | 0.150 | 0.300 | 500 |" in lines[2]
  assert "| apgd | 0.120 | 0.250 | 500 |" in lines[3]
  assert "**0.100 ± 0.010**" in lines[4] and "**0.200**" in lines[4]


def test_budget_is_in_x_units_and_names_the_doubled_reading():
  assert rt.budget(dict(norm="linf", eps=0.12549, budget_reading="literal")) == "0.12549"
  assert rt.budget(dict(norm="linf", eps=0.12549, budget_reading="doubled")) == "0.25098 (doubled)"
  assert rt.budget(dict(norm="l0", eps=0.03, budget_reading="doubled")) == "0.03·D"
