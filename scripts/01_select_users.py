"""Stage 01: load a benchmark, select users (seeded) and write the experiment splits (see stages/select_users.py).

Usage:
    python -m scripts.01_select_users --config configs/lamp4.json --data-dir ../shared/data/debian/lamp4
    python -m scripts.01_select_users --config configs/longlamp.json --history-rate 0.25 --clusters true --overwrite
"""

from data_process.cli import main
from stages.select_users import SelectUsersConfig, run

if __name__ == "__main__":
    main(SelectUsersConfig, run)
