"""Stage 02: sort every sample's history by relevance to its input, keeping the scores.

Usage:
    python -m scripts.02_rank_history --config configs/lamp4.json
    python -m scripts.02_rank_history --config configs/longlamp.json --ranker dense --overwrite

Reads {run_dir}/data/*.jsonl (stage 01) and writes {run_dir}/ranked/<same names>: each
sample's `history` most relevant first and a parallel `scores` list.  Rankers: bm25
(default), recency (newest first), dense (all-MiniLM-L6-v2).  Ties keep time order.
Records are appended one by one, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from data_process.artifacts import MANIFEST, JsonlWriter, Stage
from data_process.config import CommonConfig, choose, parse_config, stage_dir
from data_process.loaders import ErrorLog, read_samples
from data_process.ranking import RANKERS, rank_samples

STAGE = "rank_history"


@dataclass
class RankHistoryConfig(CommonConfig):
    ranker: str = field(default="bm25", metadata={"help": "bm25 | recency | dense"})
    batch_size: int = field(default=64, metadata={"help": "texts per batch of the dense encoder"})
    encoder: str = field(default="models/all-minilm-l6-v2",
                         metadata={"help": "dense encoder directory (--ranker dense)"})
    on_error: str = field(default="stop", metadata={"help": "bad records: stop (default) | skip"})


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse_config(RankHistoryConfig, STAGE, argv)
    choose("ranker", cfg.ranker, RANKERS)
    in_dir, out_dir = stage_dir(cfg.run_dir, "data"), stage_dir(cfg.run_dir, "ranked")
    if not (in_dir / MANIFEST).exists():
        raise FileNotFoundError(f"{in_dir / MANIFEST} does not exist: run scripts.01_select_users first")
    if (out_dir / MANIFEST).exists() and not cfg.overwrite:
        Stage(STAGE, out_dir, cfg)
        return None
    inputs = sorted(in_dir.glob("*.jsonl"))
    log = ErrorLog(cfg.on_error, in_dir)
    # Read and check every file before writing anything.
    files = {path.name: read_samples(path, log) for path in inputs}
    log.check()
    encoder = None
    if cfg.ranker == "dense":
        from data_process.dense import DenseEncoder

        encoder = DenseEncoder(cfg.encoder)
    stage = Stage(STAGE, out_dir, cfg, overwrite=cfg.overwrite)
    counts, cache = {}, {}  # cache: dense embeddings shared by all files of the run
    for name, samples in tqdm(files.items(), desc="files"):
        with JsonlWriter(out_dir / name) as writer:
            done = {r["id"] for r in writer.existing}
            todo = [s for s in samples if s["id"] not in done]
            for record in rank_samples(todo, cfg.ranker, encoder=encoder, batch_size=cfg.batch_size,
                                       cache=cache):
                writer.write(record)
        counts[name] = len(samples)
        print(f"[{STAGE}] {name}: {len(samples)} samples ranked by {cfg.ranker}"
              f" ({len(samples) - len(todo)} already done)")
    if log.errors:
        print(f"[{STAGE}] skipped {len(log.errors)} bad record(s):\n  " + "\n  ".join(log.errors))
    return stage.finish(inputs=inputs, outputs=[out_dir / name for name in files], seed=cfg.seed,
                        model=cfg.encoder if cfg.ranker == "dense" else None,
                        skipped_records=len(log.errors), errors=log.errors, counts=counts)


if __name__ == "__main__":
    main()
