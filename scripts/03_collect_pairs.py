"""Stage 03: collect contrast pairs, gold vs. an answer written without the user (see stages/collect_pairs.py).

Usage:
    python -m scripts.03_collect_pairs --config configs/lamp4.json [--tries 2] [--history-k 5]
        [--rag others|history] [--threshold 0.15] [--collect-model models/other] [--max-samples 8]
"""

from data_process.cli import main
from stages.collect_pairs import CollectPairsConfig, run

if __name__ == "__main__":
    main(CollectPairsConfig, run)
