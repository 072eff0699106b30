"""Tune steer and fints on seen_val, test every method once, write tune/report.md (see stages/tune.py).

Usage (after stages 01-03, e.g. bash scripts/run.sh configs/lamp4.json):
    python -m scripts.tune --config configs/lamp4.json
    python -m scripts.tune --config configs/lamp4.json --tune-layers 15 --tune-multipliers 0.5 1 \
        --tune-top-pairs 3 5 --tune-temperatures 0.1 1 --tune-sites attn+mlp block
"""

from data_process.cli import main
from stages.tune import TuneConfig, run

if __name__ == "__main__":
    main(TuneConfig, run)
