"""How long the next chunk of an evaluation setting is expected to take, for
``evaluate.py --stop_at`` (:attr:`~dropjax.evaluation.settings.EvalConfig.stop_at`):
no chunk starts that is expected to end after the deadline.

Expected, in wall seconds (:func:`expected_seconds`):

1. the longest chunk the setting itself has timed (in ``--out``, or kept beside
   its rows in ``--rows_from`` and imported);
2. for a Sparse-RS setting not timed yet: its forward passes per chunk
   (:func:`sparse_rs_forward_passes`) times the most seconds per forward pass of
   the Sparse-RS settings timed with the same ``comparison`` in ``--out``, else
   kept in ``--rows_from``, else of any Sparse-RS setting there.  A Sparse-RS
   chunk costs what its configuration says -- every query of every
   configuration, no early stop -- so a setting with 4x the queries or draws is
   expected to take 4x as long, not as long as the slowest chunk seen.  Settings
   of one comparison were run alike (the authors'-rule settings without the
   cascade, the paired ones with it, whose later configuration runs only on the
   examples not yet broken, yet is counted in full), so their rates differ
   (measured at r = 0.9: 1.16 ms per counted pass for the authors' rule, 0.54
   paired) and the same comparison predicts best;
3. else the longest chunk timed for any setting of ``--out``, else kept in
   ``--rows_from`` (other attacks' cost depends on the cascade and the data);
4. else nothing is known and the chunk starts while the deadline is ahead.

The forward passes of the cascade's later configurations are counted for every
example (they run on the unbroken ones only), in the timed settings as in the new
one, so the rate stays comparable and the estimate errs long.
"""
from __future__ import annotations

import os

from dropjax.evaluation import store as store_lib
from dropjax.evaluation.settings import EvalConfig, drop_rate_of


def sparse_rs_forward_passes(config: dict, drop_rate: float) -> int | None:
  """Forward passes of the model per chunk of a Sparse-RS setting (``None`` for
  another attack).

  ``config``: the setting's configuration (``setting.json``,
  :func:`~dropjax.evaluation.settings.row_config`); fields missing there
  (rows kept before they existed) take :class:`EvalConfig`'s defaults.
  Per example and configuration (loss x mode x target x restart): one
  evaluation of the starting set plus one per query (two when paired), each
  ``query_draws`` evaluations of the defense of ``num_masks`` masks (one pass
  at ``drop_rate`` 0, where no mask is drawn)."""
  get = lambda k: config.get(k, getattr(EvalConfig, k))
  if get("attack") != "sparse_rs":
    return None
  configs = (len(config.get("losses") or ("margin",))
             * sum(get("num_targets") if m == "targeted" else 1 for m in get("modes"))
             * get("restarts"))
  per_query = 2 if get("comparison") == "paired" else 1
  masks = get("num_masks") if drop_rate > 0 else 1
  return (get("batch_size") * configs * (1 + per_query * get("queries"))
          * get("query_draws") * masks)


def _comparison(config: dict) -> str:
  return config.get("comparison", EvalConfig.comparison)


def _sparse_rs_rate(timed: list[tuple[str, dict | None, list[float]]],
                    comparison: str | None = None) -> float | None:
  """The most seconds per forward pass over ``(setting, config, chunk seconds)``
  (only the settings of that ``comparison`` when one is given)."""
  rates = []
  for sid, config, seconds in timed:
    if not config or config.get("attack") != "sparse_rs" or not seconds:
      continue  # (not every directory of an --out is an evaluation setting)
    if comparison is not None and _comparison(config) != comparison:
      continue
    passes = sparse_rs_forward_passes(config, drop_rate_of(sid))
    if passes:
      rates.append(max(seconds) / passes)
  return max(rates, default=None)


def _timed_in_out(out_dir: str) -> list[tuple[str, dict | None, list[float]]]:
  return [(d, store_lib.SettingStore.saved_config(out_dir, d),
           store_lib.SettingStore(out_dir, d).chunk_seconds())
          for d in sorted(os.listdir(out_dir))
          if os.path.isfile(os.path.join(out_dir, d, store_lib.TIMING_FILE))]


def _timed_kept(rows_dir: str) -> list[tuple[str, dict | None, list[float]]]:
  out = []
  for name in sorted(os.listdir(rows_dir)):
    if name.endswith(".timing.jsonl"):
      sid = name[:-len(".timing.jsonl")]
      out.append((sid, store_lib.kept_config(rows_dir, sid),
                  [r["seconds"] for r in store_lib.committed_timing(rows_dir, sid)]))
  return out


def expected_seconds(out_dir: str, setting: str, rows_dir: str | None = None) -> float | None:
  """The expected wall seconds of ``setting``'s next chunk (module docstring);
  ``None`` when nothing is timed.  ``setting``'s configuration is the one its
  ``setting.json`` under ``out_dir`` holds."""
  own = store_lib.SettingStore(out_dir, setting).chunk_seconds()
  if own:
    return max(own)
  config = store_lib.SettingStore.saved_config(out_dir, setting)
  passes = (sparse_rs_forward_passes(config, drop_rate_of(setting))
            if config and config.get("attack") == "sparse_rs" else None)
  in_out = _timed_in_out(out_dir)
  kept = _timed_kept(rows_dir) if rows_dir and os.path.isdir(rows_dir) else []
  if passes:
    same = _comparison(config)
    rate = (_sparse_rs_rate(in_out, same) or _sparse_rs_rate(kept, same)
            or _sparse_rs_rate(in_out) or _sparse_rs_rate(kept))
    if rate is not None:
      return rate * passes
  longest = max((t for _, _, ts in in_out for t in ts), default=None)
  if longest is None:
    longest = max((t for _, _, ts in kept for t in ts), default=None)
  return longest
