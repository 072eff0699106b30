"""Stage 02: sort every sample's history by relevance to its query (see stages/rank_history.py).

Usage:
    python -m scripts.02_rank_history --config configs/lamp4.json
    python -m scripts.02_rank_history --config configs/longlamp.json --ranker dense --overwrite
"""

from data_process.cli import main
from stages.rank_history import RankHistoryConfig, run

if __name__ == "__main__":
    main(RankHistoryConfig, run)
