"""Train the SASRec recommender behind PersonalWAB's get_recommendations_by_history (see stages/train_sasrec.py).

Usage:
    python -m scripts.train_sasrec --config configs/pwab.json [--epochs 200] [--hidden 64]
"""

from data_process.cli import main
from stages.train_sasrec import TrainSasrecConfig, run

if __name__ == "__main__":
    main(TrainSasrecConfig, run)
