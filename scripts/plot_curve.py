"""Plot the multiplier response curve of a tuned run: each metric vs multiplier, per method and layer.

    python -m scripts.plot_curve --run-dir runs/style --metrics style_adherence rougeL \
        --baselines rag zeroshot --out runs/style/tune/curve.png

Reads ``{run_dir}/tune/tune.json`` (every validation point of scripts/tune.py) and, for each
``--baselines`` name, ``{run_dir}/generations/{val_split}/{name}/eval/scores.json`` (run it
first: ``05_generate --algo rag --split seen_val --eval``).  A baseline is drawn as a dashed
line; rag is also the curve's point at multiplier 0 (steering by 0 is the RAG prompt
alone).  Prints the points as a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_process.artifact_io import read_json
from data_process.cli import USER_ERRORS
from eval.curves import curve_table, plot_curves


def _baselines(run_dir: Path, split: str, names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        path = run_dir / "generations" / split / name / "eval" / "scores.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no scores; run 05_generate --algo {name} --split {split} --eval first")
        out[name] = read_json(path)["overall"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="run folder with tune/tune.json")
    parser.add_argument("--metrics", nargs="+", default=["rougeL"], help="metrics to plot (one row each)")
    parser.add_argument("--baselines", nargs="*", default=[], help="runs of the validation split drawn as lines")
    parser.add_argument("--out", type=Path, default=None, help="PNG (default {run_dir}/tune/curve.png)")
    args = parser.parse_args()
    try:
        tune = read_json(args.run_dir / "tune" / "tune.json")
        baselines = _baselines(args.run_dir, tune["val_split"], args.baselines)
    except USER_ERRORS as err:  # one line and exit 2, as every stage script
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = plot_curves(tune["points"], args.metrics, baselines, args.out or args.run_dir / "tune" / "curve.png",
                      title=tune["val_split"])
    print(curve_table(tune["points"], args.metrics, baselines))
    print(f"plot -> {out}")


if __name__ == "__main__":
    main()
