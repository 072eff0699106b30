"""Stage 04: per-pair steering vectors and per-user global vectors.

Reads {run_dir}/pairs/pairs.jsonl and writes {run_dir}/vectors/:
vectors.safetensors (tensors "attn.L", "mlp.L", "block.L": [n_pairs, hidden], rows in
pairs order), vectors.index.json (the rows' pair_id, user_id, sample_id, prompt),
user_vectors.safetensors (tensors "<strategy>/<key>/<user_id>": [hidden]) and
manifest.json (last).  A killed run resumes from vectors/chunks/ (finished chunks are
reloaded, not recomputed); the chunks are removed once the final files are written.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_process.artifacts import Stage, read_finished_jsonl, run_relative
from data_process.config import stage_dir
from stages.common import StageConfig, task_of
from steering.extract import KINDS, check_finite, check_pair, extract_chunked
from steering.hooks import SITES, hidden_size
from steering.model import DTYPES, check_layers, find_layers, load_model, model_name
from steering.user_vectors import USER_STRATEGIES, user_vectors
from steering.vectors import save_user_vectors, save_vectors

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig(StageConfig):
    STAGE = "04_extract_vectors"
    SECTIONS = ("extract_vectors",)
    NOT_IN_FINGERPRINT = StageConfig.NOT_IN_FINGERPRINT | {"batch_size", "chunk_pairs", "pairs_file"}

    layers: list[int] = field(default_factory=lambda: [15], metadata={"min": 0, "non_empty": True, "help": "decoder layers to read"})
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp", "block"],
                             metadata={"non_empty": True, "help": "sites to read", "choices": list(SITES)})
    pairs_file: str = field(default="", metadata={"help": "pairs JSONL (default {run_dir}/pairs/pairs.jsonl)"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "sequences per forward (each pair is 2 sequences)"})
    max_answer_tokens: int = field(default=256, metadata={"min": 1, "help": "answers are cut to this many tokens"})
    chunk_pairs: int = field(default=256, metadata={"min": 1, "help": "pairs per resumable chunk file"})
    save_dtype: str = field(default="float16", metadata={"help": "dtype of the saved vectors",
                                                         "choices": ["float16", "bfloat16", "float32"]})
    user_strategies: list[str] = field(default_factory=lambda: ["mean", "pca", "logistic"],
                                       metadata={"non_empty": True, "help": "per-user global vectors", "choices": list(USER_STRATEGIES)})
    max_pairs: int = field(default=0, metadata={"min": 0, "help": "use only the first N pairs (0 = all; for smoke runs)"})


def load_pairs(path: Path, limit: int) -> list[dict]:
    """Read and check the pairs file (unique pair ids, every field present)."""
    pairs = read_finished_jsonl(path)
    seen = set()
    for number, pair in enumerate(pairs, 1):
        check_pair(pair, f"{path} record {number}")
        if pair["pair_id"] in seen:
            raise ValueError(f"{path} record {number}: duplicate pair_id {pair['pair_id']!r}")
        seen.add(pair["pair_id"])
    if not pairs:
        # Stage 03 may legitimately keep nothing (every try too close to the gold, or no
        # parseable PersonalWAB call): the store is then empty and 05 runs steer/fints as
        # RAG for every user, reporting them.
        log.warning("[04_extract_vectors] %s holds no pairs: writing an empty vector store", path)
    return pairs[:limit] if limit else pairs


def run(cfg: ExtractConfig) -> dict[str, Any] | None:
    """Extract (or resume) the vectors; return the manifest (None when the stage had finished)."""
    out_dir = stage_dir(cfg.run_dir, "vectors")
    pairs_path = Path(cfg.pairs_file or stage_dir(cfg.run_dir, "pairs") / "pairs.jsonl")
    if not pairs_path.exists():
        raise FileNotFoundError(f"{pairs_path}: no such file; run scripts.03_collect_pairs first")
    stage = Stage(cfg.STAGE, out_dir, cfg, overwrite=cfg.overwrite, inputs=[pairs_path], model=cfg.model)
    if stage.done:
        return None
    pairs = load_pairs(pairs_path, cfg.max_pairs)
    prefix = task_of(cfg).response_prefix  # answers are read where generation writes them
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype, layers_attr=cfg.layers_attr)
    check_layers(find_layers(model), cfg.layers)
    out_dir = stage.start()
    keys = [f"{site}.{layer}" for layer in cfg.layers for site in cfg.sites]
    settings = {"model": model_name(model), "model_dtype": str(next(model.parameters()).dtype),
                "pairs_file": run_relative(pairs_path, cfg.run_dir)}
    if pairs:
        acts = extract_chunked(model, tok, pairs, keys, out_dir / "chunks", settings, cfg.chunk_pairs,
                               cfg.batch_size, cfg.max_answer_tokens, prefix)
    else:
        acts = {kind: {key: torch.zeros(0, hidden_size(model)) for key in keys} for kind in KINDS}
    meta = {"model": model_name(model), "hidden_size": hidden_size(model),
            "num_layers": len(find_layers(model)), "layers": cfg.layers, "sites": cfg.sites,
            "settings": {"batch_size": cfg.batch_size, "max_answer_tokens": cfg.max_answer_tokens,
                         "model_dtype": settings["model_dtype"], "pairs_file": settings["pairs_file"],
                         "response_prefix": prefix,
                         "reduction": "mean over answer tokens, chosen minus rejected"}}
    dtype = DTYPES[cfg.save_dtype]
    for key, vectors in acts["diff"].items():  # fp16 overflows to inf above 65504
        check_finite(vectors.to(dtype), pairs, key, f"{cfg.save_dtype} vector")
    vec_path = save_vectors(out_dir, acts["diff"], pairs, meta, dtype)
    users = user_vectors(pairs, acts, cfg.user_strategies)
    user_path = save_user_vectors(out_dir, users, {**meta, "n_users": len({str(p["user_id"]) for p in pairs})}, dtype)
    shutil.rmtree(out_dir / "chunks", ignore_errors=True)
    log.info("[%s] %d pairs x %d keys -> %s; user vectors -> %s", cfg.STAGE, len(pairs), len(keys), vec_path, user_path)
    return stage.finish(inputs=[pairs_path], outputs=[vec_path, out_dir / "vectors.index.json", user_path],
                        model=model_name(model), seed=cfg.seed, n_pairs=len(pairs), keys=keys)
