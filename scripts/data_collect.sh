#!/usr/bin/env bash
# Pair collection (stages 01 -> 03) for the configured tasks:
#   bash scripts/data_collect.sh                      # configs/lamp4.json and configs/longlamp.json
#   bash scripts/data_collect.sh configs/pwab.json    # any task configs
# Finished stages skip themselves (their manifest exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(configs/lamp4.json configs/longlamp.json)
for config in "${CONFIGS[@]}"; do
  for module in 01_select_users 02_rank_history 03_collect_pairs; do
    echo "=== $config: $module ==="
    "$PY" -m "scripts.$module" --config "$config"
  done
done
