"""Sweep fints over layers x multipliers: a table and a plot of ROUGE-L vs multiplier (see stages/sweep.py).

Usage:
    python -m scripts.sweep --config configs/lamp4.json --sweep-layers 10 15 20 \
        --sweep-multipliers 0 0.5 1 2 4 --limit 40
"""

from data_process.cli import main
from stages.sweep import SweepConfig, run

if __name__ == "__main__":
    main(SweepConfig, run)
