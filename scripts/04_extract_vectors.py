"""Stage 04: per-pair steering vectors and per-user global vectors (see stages/extract_vectors.py).

Usage:
    python -m scripts.04_extract_vectors --config configs/lamp4.json [--layers 15 --sites attn mlp]
"""

from data_process.cli import main
from stages.extract_vectors import ExtractConfig, run

if __name__ == "__main__":
    main(ExtractConfig, run)
