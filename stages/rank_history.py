"""Stage 02: sort every sample's history by relevance to its query, keeping the scores.

Reads {run_dir}/data/*.jsonl (stage 01) and writes {run_dir}/ranked/<same names>: each
sample's `history` most relevant first and a parallel `scores` list.  Rankers: bm25
(default), recency (newest first), dense (all-MiniLM-L6-v2).  Ties keep time order.
Records are appended one by one, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from data_process.artifacts import MANIFEST, JsonlWriter, Stage
from data_process.config import stage_dir
from data_process.ranking import RANKERS, rank_samples
from data_process.records import ErrorLog, read_samples
from stages.common import ON_ERROR, StageConfig, finished_input, task_of

log = logging.getLogger(__name__)


@dataclass
class RankHistoryConfig(StageConfig):
    STAGE = "02_rank_history"
    SECTIONS = ("rank_history",)
    NOT_IN_FINGERPRINT = StageConfig.NOT_IN_FINGERPRINT | {"batch_size"}

    ranker: str = field(default="bm25", metadata={"help": "history ranker", "choices": list(RANKERS)})
    batch_size: int = field(default=64, metadata={"min": 1, "help": "texts per batch of the dense encoder"})
    encoder: str = field(default="models/all-minilm-l6-v2",
                         metadata={"help": "dense encoder directory (--ranker dense)"})
    on_error: str = field(default="stop", metadata={"help": "what a bad record does", "choices": ON_ERROR})


def run(cfg: RankHistoryConfig) -> dict[str, Any] | None:
    """Rank every split file; return the manifest (None when the stage had finished)."""
    task = task_of(cfg)
    in_dir = finished_input(cfg.run_dir, "data", "01_select_users")
    out_dir = stage_dir(cfg.run_dir, "ranked")
    inputs = sorted(in_dir.glob("*.jsonl"))
    encoder_dir = cfg.encoder if cfg.ranker == "dense" else None
    if (out_dir / MANIFEST).exists() and not cfg.overwrite:
        Stage(cfg.STAGE, out_dir, cfg, inputs=inputs, model=encoder_dir)  # skips, or refuses
        return None
    errors = ErrorLog(cfg.on_error, in_dir)
    # Read and check every file before writing anything.
    files = {path.name: read_samples(path, errors) for path in inputs}
    errors.check()
    encoder = None
    if cfg.ranker == "dense":
        from data_process.dense import DenseEncoder

        encoder = DenseEncoder(cfg.encoder)
    stage = Stage(cfg.STAGE, out_dir, cfg, overwrite=cfg.overwrite, inputs=inputs, model=encoder_dir)
    out_dir = stage.start()
    counts, cache = {}, {}  # cache: dense embeddings shared by all files of the run
    for name, samples in tqdm(files.items(), desc="files"):
        with JsonlWriter(out_dir / name) as writer:
            done = {r["id"] for r in writer.existing}
            todo = [s for s in samples if s["id"] not in done]
            for record in rank_samples(todo, cfg.ranker, query=task.query, encoder=encoder,
                                       batch_size=cfg.batch_size, cache=cache):
                writer.write(record)
        counts[name] = len(samples)
        log.info("[%s] %s: %d samples ranked by %s (%d already done)", cfg.STAGE, name, len(samples),
                 cfg.ranker, len(samples) - len(todo))
    if errors.errors:
        log.warning("[%s] skipped %d bad record(s):\n  %s", cfg.STAGE, len(errors.errors), "\n  ".join(errors.errors))
    return stage.finish(inputs=inputs, outputs=[out_dir / name for name in files], seed=cfg.seed,
                        model=cfg.encoder if cfg.ranker == "dense" else None,
                        skipped_records=len(errors.errors), errors=errors.errors, counts=counts)
