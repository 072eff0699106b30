"""Stage 01: load a benchmark, select users (seeded) and write the experiment splits.

Usage:
    python -m scripts.01_select_users --config configs/lamp4.json --data-dir ../shared/data/debian/lamp4
    python -m scripts.01_select_users --config configs/longlamp.json --history-rate 0.25 --clusters --overwrite

Writes {run_dir}/data/{train,seen_test,unseen_test,remain_train}.jsonl (plus
seen_test_cluster{0,1,2}.jsonl with --clusters) and manifest.json, and prints a summary.
Bad input stops the stage before anything is written unless --on-error skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_process.artifacts import MANIFEST, Stage, write_jsonl
from data_process.config import CommonConfig, parse_config, stage_dir
from data_process.loaders import load_benchmark
from data_process.splits import build_splits, summary

STAGE = "select_users"


@dataclass
class SelectUsersConfig(CommonConfig):
    num_users: int = field(default=24, metadata={"help": "number of seen users (training + seen_test)"})
    num_unseen: int = field(default=8, metadata={"help": "number of test-only (unseen) users"})
    min_history: int = field(default=5, metadata={"help": "least history items a selected user has"})
    min_train: int = field(default=2, metadata={"help": "least training samples a seen user has"})
    include_history_samples: bool = field(
        default=True, metadata={"help": "also make training samples of the users' history items"})
    history_rate: float = field(
        default=1.0, metadata={"help": "sparsity: keep this seeded fraction (0, 1] of each seen user's "
                                       "training samples"})
    clusters: bool = field(default=False, metadata={
        "help": "also write seen_test_cluster{0,1,2}.jsonl (fast-changing users: 2 = least similar)"})
    cluster_by: str = field(default="bm25", metadata={"help": "user similarity for --clusters: bm25 | dense"})
    encoder: str = field(default="models/all-minilm-l6-v2",
                         metadata={"help": "dense encoder directory (--cluster-by dense)"})
    on_error: str = field(default="stop", metadata={"help": "bad records: stop (default) | skip"})


def raw_inputs(data_dir: str) -> list[Path]:
    """The benchmark files the stage read (hashed into the manifest)."""
    return sorted(p for p in Path(data_dir).rglob("*") if p.is_file())


def encoder_for(cfg: SelectUsersConfig):
    if not (cfg.clusters and cfg.cluster_by == "dense"):
        return None
    from data_process.dense import DenseEncoder

    return DenseEncoder(cfg.encoder)


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse_config(SelectUsersConfig, STAGE, argv)
    out_dir = stage_dir(cfg.run_dir, "data")
    if (out_dir / MANIFEST).exists() and not cfg.overwrite:
        Stage(STAGE, out_dir, cfg)
        return None
    # Everything is loaded and checked before the stage touches its directory.
    bench = load_benchmark(cfg.task, cfg.data_dir, include_history_samples=cfg.include_history_samples,
                           on_error=cfg.on_error)
    splits = build_splits(bench, num_users=cfg.num_users, num_unseen=cfg.num_unseen,
                          min_history=cfg.min_history, min_train=cfg.min_train, seed=cfg.seed,
                          history_rate=cfg.history_rate, clusters=cfg.clusters,
                          cluster_by=cfg.cluster_by, encoder=encoder_for(cfg))
    stage = Stage(STAGE, out_dir, cfg, overwrite=cfg.overwrite)
    outputs = [out_dir / f"{name}.jsonl" for name in splits.files]
    for stale in set(out_dir.glob("*.jsonl")) - set(outputs):
        stale.unlink()  # e.g. cluster files of an earlier, unfinished run
    for path, samples in zip(outputs, splits.files.values()):
        write_jsonl(path, samples)
    if bench.errors:
        print(f"[{STAGE}] skipped {len(bench.errors)} bad record(s):\n  " + "\n  ".join(bench.errors))
    print(summary(splits))
    return stage.finish(
        inputs=raw_inputs(cfg.data_dir), outputs=outputs, seed=cfg.seed,
        skipped_records=len(bench.errors), errors=bench.errors,
        counts={name: len(samples) for name, samples in splits.files.items()},
        seen_users=splits.seen_users, unseen_users=splits.unseen_users,
        dropped_by_history_rate=splits.dropped, user_similarity=splits.user_similarity,
        clusters=splits.clusters)


if __name__ == "__main__":
    main()
