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

from data_process.artifact_io import read_finished_jsonl, run_relative
from data_process.config import stage_dir
from data_process.stage import Stage
from stages.common import task_of
from stages.workers import WorkersConfig, absolute_paths, run_chunks, user_chunks
from steering.extract import KINDS, check_finite, check_pair, chunk_fingerprint, extract_pairs, load_chunk, save_chunk
from steering.hooks import SITES
from steering.layers import check_layers, find_layers
from steering.loading import DTYPES, load_model, load_tokenizer, resolve_device, resolve_dtype
from steering.user_vectors import USER_STRATEGIES, user_vectors
from steering.vectors import save_user_vectors, save_vectors

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig(WorkersConfig):
    STAGE = "04_extract_vectors"
    SECTIONS = ("extract_vectors",)
    NOT_IN_FINGERPRINT = WorkersConfig.NOT_IN_FINGERPRINT | {"batch_size", "chunk_pairs", "pairs_file"}

    layers: list[int] = field(default_factory=lambda: [15],
                              metadata={"min": 0, "non_empty": True, "help": "decoder layers to read"})
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp", "block"],
                             metadata={"non_empty": True, "help": "sites to read", "choices": list(SITES)})
    pairs_file: str = field(default="", metadata={"help": "pairs JSONL (default {run_dir}/pairs/pairs.jsonl)"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "sequences per forward (each pair is 2 sequences)"})
    max_answer_tokens: int = field(default=256, metadata={"min": 1, "help": "answers are cut to this many tokens"})
    chunk_pairs: int = field(default=256, metadata={
        "min": 1, "help": "pairs (of whole users) per chunk: the unit a worker computes and a resumed run redoes"})
    save_dtype: str = field(default="float16", metadata={"help": "dtype of the saved vectors",
                                                         "choices": ["float16", "bfloat16", "float32"]})
    user_strategies: list[str] = field(default_factory=lambda: ["mean", "pca", "logistic"],
                                       metadata={"non_empty": True, "help": "per-user global vectors",
                                                 "choices": list(USER_STRATEGIES)})
    max_pairs: int = field(default=0,
                           metadata={"min": 0, "help": "use only the first N pairs (0 = all; for smoke runs)"})


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


class ExtractJob:
    """Stage 04 on one worker: the model loaded once, a chunk's pair activations per call."""

    def __init__(self, cfg: ExtractConfig, keys: list[str], prefix: str):
        self.cfg, self.keys, self.prefix = cfg, keys, prefix
        self.model = None

    def __getstate__(self) -> dict:  # a worker loads its own model
        return {**self.__dict__, "model": None}

    def setup(self, users: list[str]) -> None:
        """Load the model and check the layers; a second call is a no-op (the driver sets a
        one-worker job up before it writes)."""
        if self.model is not None:
            return
        self.model, self.tok = load_model(self.cfg.model, self.cfg.device, self.cfg.dtype,
                                          layers_attr=self.cfg.layers_attr)
        check_layers(find_layers(self.model), self.cfg.layers)

    def run(self, chunk) -> tuple[dict, str]:
        """The chunk's activations ``{kind: {key: [n, hidden]}}`` and the model's dtype."""
        acts = extract_pairs(self.model, self.tok, chunk.items, self.keys, self.cfg.batch_size,
                             self.cfg.max_answer_tokens, progress=False, response_prefix=self.prefix)
        return acts, str(next(self.model.parameters()).dtype)


def _model_facts(cfg: ExtractConfig) -> tuple[str, int, str]:
    """Name, hidden size and (on this machine) dtype of the model, from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model)
    if cfg.device == "auto" and cfg.workers > 1:  # Ray workers see a GPU when they reserve one
        device = torch.device("cuda" if cfg.gpus_per_worker else "cpu")
    else:
        device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    return Path(cfg.model).name, config.get_text_config().hidden_size, str(dtype)


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
    keys = [f"{site}.{layer}" for layer in cfg.layers for site in cfg.sites]
    job = ExtractJob(absolute_paths(cfg), keys, prefix)
    if cfg.workers == 1:  # model and layers checked before anything is written
        job.setup([])
    else:
        load_tokenizer(cfg.model)  # checks the model directory; the workers load the model
    name, width, dtype = _model_facts(cfg)
    out_dir = stage.start()
    # The model's dtype is what "auto" gives where the chunks are computed; each chunk
    # records it, and chunks of different dtypes are never mixed.
    pairs_file = run_relative(pairs_path, cfg.run_dir)
    fingerprint = chunk_fingerprint({"model": name, "dtype": cfg.dtype, "pairs_file": pairs_file}, keys,
                                    cfg.max_answer_tokens, prefix)
    chunk_dir = out_dir / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    chunks = user_chunks(pairs, lambda p: p["user_id"], cfg.chunk_pairs)
    ids = {c.index: [p["pair_id"] for p in c.items] for c in chunks}
    path = {c.index: chunk_dir / f"chunk_{c.index:08d}.safetensors" for c in chunks}
    parts = {c.index: load_chunk(path[c.index], ids[c.index], fingerprint + ":" + dtype, keys) for c in chunks}
    todo = [c for c in chunks if parts[c.index] is None]
    for chunk, (acts, chunk_dtype) in run_chunks(job, todo, cfg, desc="04 extract", total=len(pairs),
                                                 done=len(pairs) - sum(len(c.items) for c in todo)):
        if chunk_dtype != dtype:
            raise ValueError(f"a worker loaded the model as {chunk_dtype}, this machine expected {dtype}: "
                             "pass --dtype explicitly")
        save_chunk(path[chunk.index], acts, ids[chunk.index], fingerprint + ":" + dtype)
        parts[chunk.index] = acts
    acts = {kind: {key: torch.zeros(len(pairs), width) for key in keys} for kind in KINDS}
    for chunk in chunks:  # rows back in pairs order
        rows = torch.tensor(chunk.positions, dtype=torch.long)
        for kind in KINDS:
            for key in keys:
                acts[kind][key][rows] = parts[chunk.index][kind][key]
    meta = {"model": name, "hidden_size": width,
            "layers": cfg.layers, "sites": cfg.sites,
            "settings": {"batch_size": cfg.batch_size, "max_answer_tokens": cfg.max_answer_tokens,
                         "model_dtype": dtype, "pairs_file": pairs_file,
                         "response_prefix": prefix,
                         "reduction": "mean over answer tokens, chosen minus rejected"}}
    save = DTYPES[cfg.save_dtype]
    for key, vectors in acts["diff"].items():  # fp16 overflows to inf above 65504
        check_finite(vectors.to(save), pairs, key, f"{cfg.save_dtype} vector")
    vec_path = save_vectors(out_dir, acts["diff"], pairs, meta, save)
    users = user_vectors(pairs, acts, cfg.user_strategies)
    user_path = save_user_vectors(out_dir, users, {**meta, "n_users": len({str(p["user_id"]) for p in pairs})}, save)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    log.info("[%s] %d pairs x %d keys -> %s; user vectors -> %s", cfg.STAGE, len(pairs), len(keys), vec_path, user_path)
    return stage.finish(outputs=[vec_path, out_dir / "vectors.index.json", user_path],
                        model=name, seed=cfg.seed, n_pairs=len(pairs), keys=keys)
