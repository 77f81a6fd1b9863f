"""experiments/fit_gap.py: training against validation accuracy from metric rows."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "fit_gap.py")
_spec = importlib.util.spec_from_file_location("fit_gap", _PATH)
fg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fg)


def _run(tmp_path, name, drop, metrics):
  d = tmp_path / name
  d.mkdir()
  (d / "config.json").write_text(json.dumps(
      {"dataset": "gtsrb", "depth": 20, "drop": drop, "drop_rate": 0.9, "epochs": 2}))
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
  return str(d)


def _train(step, acc, spe=10):
  return {"kind": "train", "step": step, "epoch": step / spe, "accuracy": acc}


def test_epoch_accuracy_is_step_weighted_and_the_metric_follows_the_drop(tmp_path):
  # Epoch 1: 8 steps at 0.5, then 2 at 1.0 (the epoch end) -> 0.6; epoch 2: 0.9.
  metrics = [_train(8, 0.5), _train(10, 1.0),
             {"kind": "val", "epoch": 1, "step": 10, "accuracy_clean": 0.2,
              "accuracy_dropped": 0.55},
             _train(18, 0.9), _train(20, 0.9),
             {"kind": "val", "epoch": 2, "step": 20, "accuracy_clean": 0.3,
              "accuracy_dropped": 0.7}]
  rows = fg.run_rows(_run(tmp_path, "fixed", "fixed", metrics))
  assert [r["epoch"] for r in rows] == [1, 2]
  assert rows[0]["train_accuracy"] == pytest.approx(0.6)
  assert rows[1]["train_accuracy"] == pytest.approx(0.9)
  assert [r["val_metric"] for r in rows] == ["accuracy_dropped"] * 2
  assert rows[0]["gap"] == pytest.approx(0.6 - 0.55)
  assert rows[1]["gap"] == pytest.approx(0.9 - 0.7)
  normal = fg.run_rows(_run(tmp_path, "normal", "none", metrics))
  assert [r["val_accuracy"] for r in normal] == [0.2, 0.3]


def test_cli_writes_rows_table_and_figure_and_rejects_runs_without_validation(tmp_path, capsys):
  metrics = [_train(10, 0.5), {"kind": "val", "epoch": 1, "step": 10, "accuracy_clean": 0.4}]
  run = _run(tmp_path, "normal", "none", metrics)
  out = tmp_path / "out"
  assert fg.main([run, "--out", str(out)]) == 0
  assert "| normal | 1 (2) | 0.500 | 0.400 | +10.0 |" in capsys.readouterr().out
  assert len(fg.files.read_jsonl(str(out / fg.ROWS_FILE))) == 1
  assert {f"{fg.FIGURE}.png", f"{fg.FIGURE}.svg"} <= set(os.listdir(out))
  bare = _run(tmp_path, "bare", "none", [_train(10, 0.5)])
  with pytest.raises(ValueError, match="no training or no validation rows"):
    fg.run_rows(bare)
