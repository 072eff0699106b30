#!/usr/bin/env bash
# Run the whole pipeline, 01 -> 06, for one task config and every algorithm:
#   bash scripts/run.sh configs/lamp4.json
# A stage whose manifest exists skips itself, so a rerun only does what is missing.
# ALGOS="rag fints" and SPLITS="seen_test unseen_test" choose what stages 05-06 run.
# ALGOS="zeroshot rag steer fints oppu oppu+fints" adds the per-user LoRA rows: train_lora
# trains every seen user's adapter first, unless PLUGIN=DIR names adapters DIR/<user_id>/.
# FLAGS="--model models/gemma-3-270m --run-dir runs/demo-gemma" is passed to every stage.
# WORKERS=2 runs stages 02 (dense ranker), 03, 04 and 05 on two Ray workers (a local Ray,
# or the cluster at RAY_ADDRESS=auto|HOST:PORT); WORKER_FLAGS="--gpus-per-worker 1" adds
# flags for those stages only. The outputs are the same as with one worker.
# Prints the results table, intervals against rag and the seconds each stage took, and
# writes {run_dir}/report.md (scripts/report.py: results with user-level bootstrap
# intervals vs rag, data, provenance).
# Then serve the finished run to applications (OpenAI-compatible, per-user steering):
#   python -m scripts.serve --config configs/<task>.json   (docs/serving.md)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: bash scripts/run.sh configs/<task>.json}
PY=${PYTHON:-.venv/bin/python}
ALGOS=${ALGOS:-zeroshot rag steer fints}
SPLITS=${SPLITS:-seen_test}
PLUGIN=${PLUGIN:-}
read -r -a EXTRA <<< "${FLAGS:-}"
read -r -a PARALLEL <<< "--workers ${WORKERS:-1} ${RAY_ADDRESS:+--ray-address $RAY_ADDRESS} ${WORKER_FLAGS:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TIMES=$(mktemp)
trap 'rm -f "$TIMES"' EXIT

stage() {  # stage LABEL MODULE [flags...]: run one stage and record its wall time
  local label=$1 module=$2; shift 2
  local t0 t1
  t0=$(date +%s.%N)
  echo "=== $label ==="
  "$PY" -m "scripts.$module" --config "$CONFIG" "${EXTRA[@]}" "$@"
  t1=$(date +%s.%N)
  printf "%s\t%s\n" "$label" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" >> "$TIMES"
}

stage "01 select users" 01_select_users
stage "02 rank history" 02_rank_history "${PARALLEL[@]}"
# Stages that build the task's environment (PersonalWAB: the SASRec recommender), as the
# task definition lists them; pair collection and scoring need it.
SETUP=$("$PY" -c 'import json, sys; from tasks import get_task
print(" ".join(get_task(json.load(open(sys.argv[1])).get("task", "lamp4")).setup_stages))' "$CONFIG")
for module in $SETUP; do
  stage "00 $module" "$module"
done
stage "03 collect pairs" 03_collect_pairs "${PARALLEL[@]}"
stage "04 extract vectors" 04_extract_vectors "${PARALLEL[@]}"
# shellcheck disable=SC2086
ADAPTED=$("$PY" -c 'import sys; from steering.algorithms import ALGORITHMS
print(" ".join(a for a in sys.argv[1:] if a in ALGORITHMS and ALGORITHMS[a].adapters))' $ALGOS)
if [[ -n "$ADAPTED" && -z "$PLUGIN" ]]; then
  stage "train lora" train_lora
fi
for split in $SPLITS; do
  for algo in $ALGOS; do
    flags=()
    if [[ " $ADAPTED " == *" $algo "* && -n "$PLUGIN" ]]; then flags=(--plugin "$PLUGIN"); fi
    stage "05 generate $algo ($split)" 05_generate --algo "$algo" --split "$split" "${PARALLEL[@]}" "${flags[@]}"
  done
  # shellcheck disable=SC2086
  stage "06 evaluate ($split)" 06_evaluate --split "$split" --algos $ALGOS
done

echo "Seconds per stage (a stage that was already finished shows its skip time):"
awk -F'\t' '{ printf "  %-32s %7.1f s\n", $1, $2; total += $2 } END { printf "  %-32s %7.1f s\n", "total", total }' "$TIMES"
# shellcheck disable=SC2086
"$PY" -m scripts.report --config "$CONFIG" "${EXTRA[@]}" --splits $SPLITS
