"""Diagnostic of the style control: pairs that differ ONLY by the user's rule ("oracle" pairs).

    python -m scripts.style_oracle_pairs --run-dir runs/style --out runs/style_oracle --data-dir data/style
    python -m scripts.04_extract_vectors --config configs/style.json --run-dir runs/style_oracle
    python -m scripts.05_generate --config configs/style.json --run-dir runs/style_oracle --algo steer \
        --split seen_val --layers 10 --multipliers 2 --tag _val_L10_m2 --eval

Copies the finished stages 01-02 of ``--run-dir`` and rewrites its stage-03 pairs: the
rejected side stays the model's own zero-shot answer, the chosen side becomes that same
answer written under the user's rule (``rules.json``).  Steering with these vectors shows
what the model can do when the pairs contrast exactly the rule; the real method never
sees the rules, so this is a bound for the diagnosis, not a method.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from data_process.artifact_io import read_jsonl, write_jsonl
from eval.style import load_rules


def oracle_pairs(pairs: list[dict], rules: dict) -> list[dict]:
    """Each pair with ``chosen`` = its ``rejected`` under the user's rule."""
    return [{**p, "chosen": rules[p["user_id"]].apply(p["rejected"])} for p in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="run with stages 01-03 finished")
    parser.add_argument("--out", type=Path, required=True, help="new run folder")
    parser.add_argument("--data-dir", type=Path, required=True, help="the style benchmark (its rules.json)")
    args = parser.parse_args()
    rules = load_rules(args.data_dir)
    for stage in ("data", "ranked"):
        shutil.copytree(args.run_dir / stage, args.out / stage, dirs_exist_ok=True)
    pairs = oracle_pairs(read_jsonl(args.run_dir / "pairs" / "pairs.jsonl"), rules)
    (args.out / "pairs").mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "pairs" / "pairs.jsonl", pairs)  # no manifest: a hand-made pairs file
    print(f"{len(pairs)} oracle pairs -> {args.out / 'pairs' / 'pairs.jsonl'}")


if __name__ == "__main__":
    main()
