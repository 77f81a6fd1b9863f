"""Robustness evaluation of trained checkpoints (:mod:`.protocol`: what is
computed; :mod:`.store`: where rows and summaries go)."""
from dropjax.evaluation.protocol import (ATTACK_NORMS, EvalConfig, attack_configs, calibrate,
                                         default_drop_rate, evaluate, evaluate_chunk,
                                         load_model, make_defense_fn, perturbation_norms,
                                         prediction_columns, setting_id, summarize)
from dropjax.evaluation.store import SUMMARY_FILE, SettingStore, read_summaries, update_summary

__all__ = ["ATTACK_NORMS", "EvalConfig", "attack_configs", "calibrate", "default_drop_rate",
           "evaluate", "evaluate_chunk", "load_model", "make_defense_fn",
           "perturbation_norms", "prediction_columns", "setting_id", "summarize",
           "SUMMARY_FILE", "SettingStore", "read_summaries", "update_summary"]
