"""Stage 01: load a benchmark, select users (seeded) and write the experiment splits.

Writes {run_dir}/data/{train,seen_val,seen_test,unseen_test,remain_train}.jsonl (plus
seen_test_cluster{0,1,2}.jsonl with --clusters) and manifest.json, and logs a summary.
Bad input stops the stage before anything is written unless --on-error skip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_process.artifact_io import MANIFEST, write_jsonl
from data_process.config import stage_dir
from data_process.records import Benchmark
from data_process.splits import build_splits, summary
from data_process.stage import Stage
from stages.common import ON_ERROR, StageConfig, task_of, with_task_defaults

log = logging.getLogger(__name__)


@dataclass
class SelectUsersConfig(StageConfig):
    STAGE = "01_select_users"
    SECTIONS = ("select_users",)

    num_users: int = field(default=24, metadata={"min": 1, "help": "number of seen users (training + seen_test)"})
    num_unseen: int = field(default=8, metadata={"min": 0, "help": "number of test-only (unseen) users"})
    min_history: int = field(default=5, metadata={"min": 0, "help": "least history items a selected user has"})
    min_train: int = field(default=2, metadata={"min": 0, "help": "least training samples a seen user has"})
    include_history_samples: bool | None = field(
        default=None, metadata={"help": "also make training samples of the users' history items (default: the task's)"})
    history_rate: float = field(
        default=1.0, metadata={"gt": 0, "max": 1, "help": "sparsity: keep this seeded fraction (0, 1] of each seen "
                                                           "user's training samples"})
    val_questions: int = field(default=1, metadata={"min": 0,
        "help": "validation: each seen user's N latest training questions go to seen_val (not train); 0 = none"})
    clusters: bool = field(default=False, metadata={
        "help": "also write seen_test_cluster{0,1,2}.jsonl (fast-changing users: 2 = least similar)"})
    cluster_by: str = field(default="bm25", metadata={"help": "user similarity for --clusters",
                                                      "choices": ["bm25", "dense"]})
    encoder: str = field(default="models/all-minilm-l6-v2",
                         metadata={"help": "dense encoder directory (--cluster-by dense)"})
    on_error: str = field(default="stop", metadata={"help": "what a bad record does", "choices": ON_ERROR})
    recommend_history: str | None = field(default=None, metadata={
        "help": "PersonalWAB: the history behind a recommend task's gold sequence: the target's "
                "main_category (PersonalWAB's own) or all categories", "choices": ["category", "all", None]})
    user_profiles: bool | None = field(default=None, metadata={
        "help": "PersonalWAB: attach user_profiles.json's profile to every sample (shown in prompts)"})


def raw_inputs(data_dir: str) -> list[Path]:
    """The benchmark files the stage read (hashed into the manifest)."""
    return sorted(p for p in Path(data_dir).rglob("*") if p.is_file())


def loading_summary(bench: Benchmark) -> str:
    """What loading found and did: the layout, time order, merged duplicates, shared ids."""
    st = bench.stats
    lines = [f"layout: {bench.layout or '-'}",
             f"profiles: {st.get('profiles', 0)}, {st.get('unsorted_profiles', 0)} not in time order "
             f"(sorted by date); merged duplicates: {st.get('merged_duplicates', 0)}; "
             f"ids shared by several users: {st.get('shared_ids', 0)} (scoped <user>/<id>)"]
    lines += [f"{name.replace('_', ' ')}: {n}" for name, n in st.items()
              if name not in ("profiles", "unsorted_profiles", "merged_duplicates", "shared_ids")]
    lines.append(f"loaded: {len(bench.train)} training samples, {len(bench.test)} test samples, "
                 f"{len({s['user_id'] for s in bench.train + bench.test})} users")
    return "\n".join(lines)


def _encoder(cfg: SelectUsersConfig):
    if not (cfg.clusters and cfg.cluster_by == "dense"):
        return None
    from data_process.dense import DenseEncoder

    return DenseEncoder(cfg.encoder)


def run(cfg: SelectUsersConfig) -> dict[str, Any] | None:
    """Write the split files; return the manifest (None when the stage had finished)."""
    cfg = with_task_defaults(cfg)
    task = task_of(cfg)
    out_dir = stage_dir(cfg.run_dir, "data")
    if not Path(cfg.data_dir).is_dir():
        raise FileNotFoundError(f"data directory {cfg.data_dir!r} does not exist (set --data-dir)")
    inputs = raw_inputs(cfg.data_dir)
    if (out_dir / MANIFEST).exists() and not cfg.overwrite:
        Stage(cfg.STAGE, out_dir, cfg, inputs=inputs)  # skips, or refuses other settings / changed data
        return None
    # Everything is loaded and checked before the stage touches its directory.
    options = {name: getattr(cfg, name) for name in task.load_options}
    bench = task.load(Path(cfg.data_dir), include_history_samples=cfg.include_history_samples,
                      on_error=cfg.on_error, **options)
    splits = build_splits(bench, num_users=cfg.num_users, num_unseen=cfg.num_unseen,
                          min_history=cfg.min_history, min_train=cfg.min_train, seed=cfg.seed,
                          history_rate=cfg.history_rate, clusters=cfg.clusters,
                          cluster_by=cfg.cluster_by, encoder=_encoder(cfg), query=task.query,
                          val_questions=cfg.val_questions)
    stage = Stage(cfg.STAGE, out_dir, cfg, overwrite=cfg.overwrite, inputs=inputs)
    out_dir = stage.start()
    outputs = [out_dir / f"{name}.jsonl" for name in splits.files]
    for stale in set(out_dir.glob("*.jsonl")) - set(outputs):
        stale.unlink()  # e.g. cluster files of an earlier, unfinished run
    for path, samples in zip(outputs, splits.files.values(), strict=True):
        write_jsonl(path, samples)
    if bench.errors:
        log.warning("[%s] skipped %d bad record(s):\n  %s", cfg.STAGE, len(bench.errors), "\n  ".join(bench.errors))
    log.info("%s\n%s", loading_summary(bench), summary(splits))
    return stage.finish(
        outputs=outputs, seed=cfg.seed,
        skipped_records=len(bench.errors), errors=bench.errors, layout=bench.layout, loading=bench.stats,
        counts={name: len(samples) for name, samples in splits.files.items()},
        seen_users=splits.seen_users, unseen_users=splits.unseen_users,
        dropped_by_history_rate=splits.dropped, user_similarity=splits.user_similarity,
        clusters=splits.clusters)
