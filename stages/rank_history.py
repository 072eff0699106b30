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

from data_process.artifact_io import MANIFEST, JsonlWriter
from data_process.config import stage_dir
from data_process.progress import tqdm
from data_process.ranking import RANKERS, rank_samples
from data_process.records import ErrorLog, read_samples
from data_process.stage import Stage
from stages.common import ON_ERROR, finished_input, task_of
from stages.workers import WorkersConfig, absolute_paths, run_chunks, user_chunks, write_in_order

log = logging.getLogger(__name__)


@dataclass
class RankHistoryConfig(WorkersConfig):
    """Stage 02 settings; ``--workers`` and the other worker flags apply to ``--ranker dense``."""

    STAGE = "02_rank_history"
    SECTIONS = ("rank_history",)
    NOT_IN_FINGERPRINT = WorkersConfig.NOT_IN_FINGERPRINT | {"batch_size", "samples_per_chunk"}

    ranker: str = field(default="bm25", metadata={"help": "history ranker", "choices": list(RANKERS)})
    batch_size: int = field(default=64, metadata={"min": 1, "help": "texts per batch of the dense encoder"})
    encoder: str = field(default="models/all-minilm-l6-v2",
                         metadata={"help": "dense encoder directory (--ranker dense)"})
    on_error: str = field(default="stop", metadata={"help": "what a bad record does", "choices": ON_ERROR})
    samples_per_chunk: int = field(default=256, metadata={
        "min": 1, "help": "dense: samples (of whole users, all files) ranked together; "
                          "a user's texts are encoded once"})


class DenseJob:
    """Dense ranking on one worker: the encoder loaded once, a chunk of (file, sample) per call."""

    def __init__(self, cfg: RankHistoryConfig):
        self.cfg, self.encoder = cfg, None

    def __getstate__(self) -> dict:  # a worker loads its own encoder
        return {**self.__dict__, "encoder": None}

    def setup(self, users: list[str]) -> None:
        """Load the encoder; a second call is a no-op (the driver sets a one-worker job up
        before it writes)."""
        if self.encoder is not None:
            return
        from data_process.dense import DenseEncoder

        self.query = task_of(self.cfg).query
        self.encoder = DenseEncoder(self.cfg.encoder)

    def run(self, chunk) -> list[tuple[str, dict]]:
        ranked = rank_samples([s for _, s in chunk.items], "dense", query=self.query, encoder=self.encoder,
                              batch_size=self.cfg.batch_size, cache={})
        return [(name, record) for (name, _), record in zip(chunk.items, ranked, strict=True)]


def _rank_dense(cfg: RankHistoryConfig, job: DenseJob, files: dict[str, list[dict]], out_dir) -> None:
    """Rank every file's samples with the dense encoder, chunk by chunk of whole users.

    A chunk's texts are encoded together, so the scores do not depend on which worker
    ranked it or what an earlier run finished.
    """
    writers = {name: JsonlWriter(out_dir / name) for name in files}
    try:
        done = {name: {r["id"] for r in w.existing} for name, w in writers.items()}
        items = [(name, s) for name, samples in files.items() for s in samples]
        chunks = user_chunks(items, lambda item: item[1]["user_id"], cfg.samples_per_chunk)
        todo = [c for c in chunks if any(s["id"] not in done[name] for name, s in c.items)]
        for _, records in run_chunks(job, todo, cfg, desc="02 rank dense",
                                     total=len(items), done=len(items) - sum(len(c.items) for c in todo)):
            for name, record in records:
                if record["id"] not in done[name]:
                    writers[name].write(record)
                    done[name].add(record["id"])
    finally:
        for writer in writers.values():
            writer.close()
    for name, samples in files.items():
        write_in_order(out_dir / name, [s["id"] for s in samples], "id")


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
    stage = Stage(cfg.STAGE, out_dir, cfg, overwrite=cfg.overwrite, inputs=inputs, model=encoder_dir)
    job = DenseJob(absolute_paths(cfg)) if cfg.ranker == "dense" else None
    if job and cfg.workers == 1:
        job.setup([])  # the encoder is checked before anything is written
    out_dir = stage.start()
    counts = {name: len(samples) for name, samples in files.items()}
    if job:
        _rank_dense(cfg, job, files, out_dir)
    else:
        if cfg.workers > 1:
            log.info("[%s] --workers applies to --ranker dense; %s ranks in this process", cfg.STAGE, cfg.ranker)
        for name, samples in tqdm(files.items(), desc="files"):
            with JsonlWriter(out_dir / name) as writer:
                done = {r["id"] for r in writer.existing}
                todo = [s for s in samples if s["id"] not in done]
                for record in rank_samples(todo, cfg.ranker, query=task.query):
                    writer.write(record)
            log.info("[%s] %s: %d samples ranked by %s (%d already done)", cfg.STAGE, name, len(samples),
                     cfg.ranker, len(samples) - len(todo))
    if errors.errors:
        log.warning("[%s] skipped %d bad record(s):\n  %s", cfg.STAGE, len(errors.errors), "\n  ".join(errors.errors))
    return stage.finish(outputs=[out_dir / name for name in files], seed=cfg.seed,
                        model=cfg.encoder if cfg.ranker == "dense" else None,
                        skipped_records=len(errors.errors), errors=errors.errors, counts=counts)
