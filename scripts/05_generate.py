"""Stage 05: generate answers for a test split with one algorithm (see stages/generate.py).

Usage:
    python -m scripts.05_generate --config configs/lamp4.json --algo fints --split seen_test \
        --layers 15 --sites attn mlp --alpha 1 --beta 1 --top-pairs 5 --eval
"""

from data_process.cli import main
from stages.generate import GenerateConfig, run

if __name__ == "__main__":
    main(GenerateConfig, run)
