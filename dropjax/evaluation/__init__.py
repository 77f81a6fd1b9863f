"""Robustness evaluation of trained checkpoints: :mod:`.settings` (what a
setting is and how it is named), :mod:`.chunk` (what is computed for a chunk of
examples), :mod:`.protocol` (the run: load, calibrate, chunks, summaries),
:mod:`.store` (where rows and summaries go)."""
from dropjax.evaluation.chunk import (evaluate_chunk, make_defense_fn, perturbation_norms,
                                      prediction_columns)
from dropjax.evaluation.protocol import calibrate, evaluate, load_model, summarize
from dropjax.evaluation.settings import (ATTACK_NORMS, EvalConfig, attack_configs,
                                         default_drop_rate, setting_id)
from dropjax.evaluation.store import SUMMARY_FILE, SettingStore, read_summaries, update_summary

__all__ = ["ATTACK_NORMS", "EvalConfig", "attack_configs", "calibrate", "default_drop_rate",
           "evaluate", "evaluate_chunk", "load_model", "make_defense_fn",
           "perturbation_norms", "prediction_columns", "setting_id", "summarize",
           "SUMMARY_FILE", "SettingStore", "read_summaries", "update_summary"]
