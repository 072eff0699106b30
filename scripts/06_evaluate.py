"""Stage 06: score generation runs with the task's metrics; compare two runs (see stages/evaluate.py).

Usage:
    python -m scripts.06_evaluate --config configs/lamp4.json --algos zeroshot rag steer fints
    python -m scripts.06_evaluate --config configs/lamp4.json --compare \
        runs/lamp4/generations/seen_test/rag runs/lamp4/generations/seen_test/fints
"""

from data_process.cli import main
from stages.evaluate import EvaluateConfig, run

if __name__ == "__main__":
    main(EvaluateConfig, run)
