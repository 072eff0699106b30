"""Write {run_dir}/report.md: data, pairs, seconds per stage, results with user-level intervals vs rag.

Usage:
    python -m scripts.report --config configs/lamp4.json
    python -m scripts.report --run-dir runs/lamp4 --task lamp4 --unit sample
"""

from data_process.cli import main
from stages.report import ReportConfig, run

if __name__ == "__main__":
    main(ReportConfig, run)
