# Shared by the experiment scripts (source it after `cd` to the repository root).
: "${DROPJAX_DATA_DIR:=$PWD/.data}"; export DROPJAX_DATA_DIR

# save_rows OUT RES: every setting's per-example rows under OUT, gzipped into RES/rows/.
save_rows() {
  mkdir -p "$2/rows"
  local f
  for f in "$1"/*/rows.jsonl; do
    gzip -9 -n -c "$f" > "$2/rows/$(basename "$(dirname "$f")").rows.jsonl.gz"
  done
}

# save_run WD RES: a finished training run's config, metrics and final test numbers.
save_run() {
  mkdir -p "$2"
  cp "$1/config.json" "$1/metrics.jsonl" "$1/final_eval.json" "$2/"
}
