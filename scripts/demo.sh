#!/usr/bin/env bash
# The demo: the whole Fints pipeline on the shipped demo data (12 Debian maintainers,
# LaMP-4 format, data/demo/) with SmolLM2-135M-Instruct, on CPU:
#   bash scripts/demo.sh
# Sets up the machine first when needed (scripts/setup.sh), then runs 01 -> 06 for
# zeroshot, rag, steer and fints and prints ROUGE-1 / ROUGE-L / METEOR per algorithm and
# the seconds each stage took.  Artifacts go to runs/demo/ (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # idempotent: seconds when everything is already there
start=$(date +%s)
bash scripts/run.sh configs/demo.json
echo "Demo wall time: $(( $(date +%s) - start )) s"
