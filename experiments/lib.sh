# Shared by the experiment scripts (source it after `cd` to the repository root).
: "${DROPJAX_DATA_DIR:=$PWD/.data}"; export DROPJAX_DATA_DIR

# STOP_AT (an ISO 8601 time, e.g. `date -d '+150 min' -Iseconds`): the evaluations of the
# scripts start no chunk they expect to end after it (evaluate.py --stop_at) and their
# training runs stop at the first step that ends after it, checkpointed there (train.py
# --stop_at, through train_run), so a session that must end by then loses no
# half-computed chunk and no part of an epoch.  stop_at_args holds the flag.
stop_at_args=()
if [ -n "${STOP_AT:-}" ]; then stop_at_args=(--stop_at "$STOP_AT"); fi

# train_run WD CMD...: runs the training command CMD (whose --workdir is WD) with
# stop_at_args; succeeds when the run has finished (CMD printed finished=True), fails
# when STOP_AT stopped it first (the same call resumes it exactly), and ends the script
# with CMD's status when CMD fails.  `train_run "$WD" $cmd || exit 0` leaves what needs
# the finished model (packaging, evaluation) to the call that finishes it.
# A run it leaves unfinished is kept for a new checkout (keep_training), and a kept run
# is taken up first when WD holds no checkpoint (take_up_training).  An unfinished run
# is not started (fails as if stopped) when less than TRAIN_MIN_MINUTES (default 20)
# remain before STOP_AT: a few minutes of steps are not worth a kept checkpoint (~7 MB
# committed for a ResNet-56).
train_run() {
  local wd=$1 out rc min=${TRAIN_MIN_MINUTES:-20}; shift
  if [ -n "${STOP_AT:-}" ] && [ ! -f "$wd/final_eval.json" ] && \
     [ $(( $(date -d "$STOP_AT" +%s) - $(date +%s) )) -lt $(( min * 60 )) ]; then
    echo "$wd: not started, less than $min min before STOP_AT $STOP_AT (TRAIN_MIN_MINUTES)" >&2
    return 1
  fi
  take_up_training "$wd"
  out=$("$@" "${stop_at_args[@]}") || {
    rc=$?; echo "$out"; echo "training in $wd failed (exit status $rc)" >&2
    keep_training "$wd"; exit "$rc"; }
  echo "$out"
  keep_training "$wd"
  if [[ " $out " == *" finished=True "* ]]; then return 0; fi
  echo "$wd: stopped before its last step (STOP_AT ${STOP_AT:-}); the same call resumes it" >&2
  return 1
}

# Training runs outlive a checkout: runs/ is not committed, so a new checkout (a fresh
# clone, another machine) would start a stopped run again from its first step.
# keep_training WD copies an unfinished run (no final_eval.json) into
# UNFINISHED/<name of WD> -- its config, metrics and last checkpoint, the checkpoint as
# a tar file split into parts of KEEP_PART_KB KiB at most (default 1536: no committed
# file over 2 MB; ~2.2 MB in two parts for a ResNet-20, ~7 MB for a ResNet-56, ~14 MB
# for a ResNet-110) listed with their SHA-256 sums in checkpoint.sha256, committed with
# the results -- replacing the copy before; a finished run's copy is removed.
# take_up_training WD puts a kept run back into a WD that holds no checkpoint, where
# train.py resumes it (exactly, on the same CPU), once every part is there and matches
# its sum: a part lost or damaged is an error, never a fresh start (tar alone may read a
# stream with a part missing as a shorter archive and succeed).
UNFINISHED=${UNFINISHED:-experiments/unfinished}
KEEP_PART_KB=${KEEP_PART_KB:-1536}
keep_training() {
  local wd=$1 keep last f
  local -; set -o pipefail
  keep="$UNFINISHED/$(basename "$wd")"
  if [ -f "$wd/final_eval.json" ]; then rm -rf "$keep"; return 0; fi
  last=$(ls "$wd/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true)
  if [ -z "$last" ]; then return 0; fi
  rm -rf "$keep.tmp"; mkdir -p "$keep.tmp"
  # (a run still going may have removed that step meanwhile)
  if ! tar -C "$wd/checkpoints" -cf - "$last" | \
      split -b "${KEEP_PART_KB}k" -d -a 3 - "$keep.tmp/checkpoint.tar.part"; then
    rm -rf "$keep.tmp"; echo "could not keep $wd (step $last): run it again" >&2; return 0
  fi
  (cd "$keep.tmp" && sha256sum checkpoint.tar.part* > checkpoint.sha256)
  for f in config.json metrics.jsonl; do
    if [ -f "$wd/$f" ]; then cp "$wd/$f" "$keep.tmp/"; fi
  done
  rm -rf "$keep"; mv "$keep.tmp" "$keep"
  echo "kept the unfinished run $wd (step $last) in $keep" >&2
}
take_up_training() {
  local wd=$1 keep f
  local -; set -o pipefail
  keep="$UNFINISHED/$(basename "$wd")"
  if [ ! -d "$keep" ] || [ -n "$(ls "$wd/checkpoints" 2>/dev/null)" ]; then
    return 0
  fi
  if [ -f "$keep/checkpoint.sha256" ]; then
    if ! (cd "$keep" && sha256sum --quiet --strict -c checkpoint.sha256) || \
       [ "$(ls "$keep" | grep -c '^checkpoint\.tar\.part')" != "$(wc -l < "$keep/checkpoint.sha256")" ]; then
      echo "the run kept in $keep is incomplete: its parts do not match checkpoint.sha256" >&2
      return 1
    fi
  else  # kept before the sums were written
    echo "the run kept in $keep has no checkpoint.sha256: its parts are not checked" >&2
  fi
  mkdir -p "$wd/checkpoints"
  if ! cat "$keep"/checkpoint.tar.part* | tar -C "$wd/checkpoints" -xf -; then
    rm -rf "$wd/checkpoints"
    echo "the run kept in $keep could not be unpacked (a part missing or damaged)" >&2
    return 1
  fi
  for f in config.json metrics.jsonl; do
    if [ -f "$keep/$f" ]; then cp "$keep/$f" "$wd/"; fi
  done
  echo "took up the unfinished run kept in $keep" >&2
}

# save_rows OUT RES: every setting's per-example rows under OUT, gzipped into RES/rows/,
# with the setting.json they were computed under (evaluate.py --rows_from RES/rows then
# takes them up instead of recomputing them, e.g. to extend a run to more examples).
# A setting still running (no rows.jsonl yet) keeps its finished chunks, in order, so a
# session that ends mid-setting loses at most one chunk: --rows_from resumes from them.
# Kept rows are never replaced by fewer rows or by rows of another configuration, and
# rows equal to the kept ones are not rewritten (dropjax.evaluation.store.keep_rows).
# OUT's entropy thresholds join RES/rows/calibration.jsonl (kept entries win), so
# another CPU extends the rows with the thresholds they were decided with, and each
# setting's chunk times RES/rows/<setting>.timing.jsonl (for --stop_at's estimate there).
save_rows() {
  python -c 'import sys; from dropjax.evaluation import store
for s in store.keep_rows(sys.argv[1], sys.argv[2]): print("kept rows of", s, file=sys.stderr)
store.keep_records(sys.argv[1], sys.argv[2])' "$1" "$2/rows"
}

# save_summary OUT RES_FILE: OUT's summary rows into RES_FILE, replacing the rows of the
# same settings and keeping the others (a run of some of the settings loses none; a
# re-run that computed no chunk keeps the attack time of the run that did).
save_summary() {
  python - "$1/summary.jsonl" "$2" <<'PY'
import os, sys
from dropjax import files
from dropjax.evaluation import store
new = files.read_jsonl(sys.argv[1]) if os.path.exists(sys.argv[1]) else []
if new:  # none finished: RES_FILE stays as it was (or absent), never an empty file
  old = files.read_jsonl(sys.argv[2]) if os.path.exists(sys.argv[2]) else []
  files.write_jsonl(sys.argv[2], store.replace_summaries(old, new))
PY
}

# plot_summaries RES FILE...: the robust-accuracy figures (Figs. 5/6) and table of
# dropjax.plots into RES from those of the attacked-summary files FILE... (unexpanded
# globs ok) that exist; none yet (a run stopped before its first setting finished) draws
# nothing instead of failing on a missing file.  Fig. 2 (clean accuracy vs r) is not
# drawn here: these rows hold only the attacked rates, and RES's Fig. 2 comes from a
# clean sweep (clean_summary.jsonl).
plot_summaries() {
  local res=$1 f; shift
  local have=()
  for f in "$@"; do [ -f "$f" ] && have+=("$f"); done
  if [ ${#have[@]} -eq 0 ]; then
    echo "$res: no summary rows yet, nothing drawn" >&2
    return 0
  fi
  python -m dropjax.plots "${have[@]}" --figures robust table --out "$res"
}

# evaluate_kept OUT RES SUMMARY ARGS...: evaluate.py ARGS writing to OUT, taking up the
# rows kept in ROWS_FROM (default RES/rows), under STOP_AT; then OUT's summaries join
# RES/SUMMARY and its rows are kept in RES/rows -- after every call, so a run stopped
# part-way keeps what it finished.
evaluate_kept() {
  local out=$1 res=$2 summary=$3; shift 3
  mkdir -p "$res/rows"
  python evaluate.py --out "$out" --rows_from "${ROWS_FROM:-$res/rows}" --no_progress \
    "${stop_at_args[@]}" "$@"
  save_summary "$out" "$res/$summary"
  save_rows "$out" "$res"
}

# train_packaged WD RES PKG HARDWARE CMD...: the training command CMD (whose --workdir is
# WD) through train_run, then the finished run packaged as PKG (`python -m
# dropjax.pretrained`, HARDWARE its hardware line) and its record kept in RES (save_run).
# A model packaged already is not trained again -- also in a checkout whose runs/ lacks
# WD, where CMD would start from step 0 (hours of training).  Returns 1 as train_run
# does when STOP_AT stopped the run; any other failure ends the script.
train_packaged() {
  local wd=$1 res=$2 pkg=$3 hardware=$4; shift 4
  if [ -f "$pkg/MANIFEST.json" ]; then return 0; fi
  mkdir -p "$wd"
  train_run "$wd" "$@" || return 1
  # Training time from the logged throughput: a run spanning sessions does not count
  # their gaps.
  python -m dropjax.pretrained --workdir "$wd" --out "$pkg" --command "$*" \
    --hardware "$hardware" \
    --wall_time "$(training_minutes "$wd") min of training steps and validations (logged)" || exit
  save_run "$wd" "$res" || exit
}

# save_run WD RES: a finished training run's config, metrics and final test numbers.
save_run() {
  mkdir -p "$2"
  cp "$1/config.json" "$1/metrics.jsonl" "$1/final_eval.json" "$2/"
}

# training_minutes WD: minutes of training steps and validation passes of the run in WD,
# from its logged throughput and validation times (a run spanning sessions: their gaps are not
# training time).  Rows logged before 2026-12-06 timed the validation inside the next
# row's throughput; later ones give its "seconds" apart: the sum is the same.
training_minutes() {
  python - "$1" <<'PY'
import json, sys
from dropjax import files
wd = sys.argv[1]
with open(f"{wd}/config.json") as f:
  batch = json.load(f)["batch_size"]
rows, last, seconds = files.read_jsonl(f"{wd}/metrics.jsonl"), 0, 0.0
for r in rows:
  if r.get("kind") == "train" and r.get("images_per_s"):
    seconds += (r["step"] - last) * batch / r["images_per_s"]
    last = r["step"]
  elif r.get("kind") == "val":
    seconds += r.get("seconds", 0.0)
print(round(seconds / 60))
PY
}

# hardware_line: this machine's CPU, vector extensions and cores, for manifests.
hardware_line() {
  local vec=AVX2
  grep -q avx512f /proc/cpuinfo && vec=AVX-512
  echo "$(lscpu | sed -n 's/^Model name: *//p' | head -n 1) ($vec), $(nproc) cores"
}
