"""Share of retrieved pairs of the request's own task type (see stages/pair_retrieval.py).

Usage:
    python -m scripts.pair_retrieval --config configs/pwab.json --run-dir runs/pwab --split seen_val
"""

from data_process.cli import main
from stages.generate import GenerateConfig
from stages.pair_retrieval import run

if __name__ == "__main__":
    main(GenerateConfig, run)
