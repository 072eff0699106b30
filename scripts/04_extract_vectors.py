"""Stage 04: per-pair steering vectors and per-user global vectors.

    python -m scripts.04_extract_vectors --config configs/lamp4.json [--layers 15 --sites attn mlp]

Reads {run_dir}/pairs/pairs.jsonl and writes {run_dir}/vectors/:
vectors.safetensors (tensors "attn.L", "mlp.L", "block.L": [n_pairs, hidden], rows in
pairs order), vectors.index.json (the rows' pair_id, user_id, sample_id, prompt),
user_vectors.safetensors (tensors "<strategy>/<key>/<user_id>": [hidden]) and
manifest.json (last).  A killed run resumes from vectors/chunks/ (finished chunks are
reloaded, not recomputed); the chunks are removed once the final files are written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_process.artifacts import Stage, read_jsonl
from data_process.config import CommonConfig, parse_config, stage_dir
from steering.extract import KINDS, check_finite, check_pair, extract_chunked
from steering.hooks import SITES, hidden_size
from steering.model import DTYPES, check_layers, find_layers, load_model, model_name
from steering.user_vectors import USER_STRATEGIES, user_vectors
from steering.vectors import save_user_vectors, save_vectors


@dataclass
class ExtractConfig(CommonConfig):
    layers: list[int] = field(default_factory=lambda: [15], metadata={"help": "decoder layers to read"})
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp", "block"],
                             metadata={"help": "sites to read: attn | mlp | block"})
    pairs_file: str = field(default="", metadata={"help": "pairs JSONL (default {run_dir}/pairs/pairs.jsonl)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward (each pair is 2 sequences)"})
    max_answer_tokens: int = field(default=256, metadata={"help": "answers are cut to this many tokens"})
    chunk_pairs: int = field(default=256, metadata={"help": "pairs per resumable chunk file"})
    save_dtype: str = field(default="float16", metadata={"help": "dtype of the saved vectors: float16 | bfloat16 | float32"})
    user_strategies: list[str] = field(default_factory=lambda: ["mean", "pca", "logistic"],
                                       metadata={"help": "per-user global vectors: mean | pca | logistic"})
    max_pairs: int = field(default=0, metadata={"help": "use only the first N pairs (0 = all; for smoke runs)"})


def load_pairs(path: Path, limit: int) -> list[dict]:
    pairs = read_jsonl(path)
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
        print(f"[04_extract_vectors] WARNING: {path} holds no pairs: writing an empty vector store")
    return pairs[:limit] if limit else pairs


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ExtractConfig, "extract_vectors", argv)
    bad = [s for s in cfg.sites if s not in SITES]
    if bad or cfg.save_dtype not in DTYPES:
        raise ValueError(f"bad --sites {bad} (choose {SITES}) or --save-dtype {cfg.save_dtype!r} (choose {sorted(DTYPES)})")
    for name in cfg.user_strategies:
        if name not in USER_STRATEGIES:
            raise ValueError(f"unknown user strategy {name!r}; choose from {sorted(USER_STRATEGIES)}")
    out_dir = stage_dir(cfg.run_dir, "vectors")
    stage = Stage("04_extract_vectors", out_dir, cfg, overwrite=cfg.overwrite)
    if stage.done:
        return
    pairs_path = Path(cfg.pairs_file or stage_dir(cfg.run_dir, "pairs") / "pairs.jsonl")
    pairs = load_pairs(pairs_path, cfg.max_pairs)
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype)
    check_layers(find_layers(model), cfg.layers)
    keys = [f"{site}.{layer}" for layer in cfg.layers for site in cfg.sites]
    settings = {"model": model_name(model), "model_dtype": str(next(model.parameters()).dtype),
                "pairs_file": str(pairs_path)}
    if pairs:
        acts = extract_chunked(model, tok, pairs, keys, out_dir / "chunks", settings, cfg.chunk_pairs,
                               cfg.batch_size, cfg.max_answer_tokens)
    else:
        acts = {kind: {key: torch.zeros(0, hidden_size(model)) for key in keys} for kind in KINDS}
    meta = {"model": model_name(model), "hidden_size": hidden_size(model),
            "num_layers": len(find_layers(model)), "layers": cfg.layers, "sites": cfg.sites,
            "settings": {"batch_size": cfg.batch_size, "max_answer_tokens": cfg.max_answer_tokens,
                         "model_dtype": settings["model_dtype"], "pairs_file": str(pairs_path),
                         "reduction": "mean over answer tokens, chosen minus rejected"}}
    dtype = DTYPES[cfg.save_dtype]
    for key, vectors in acts["diff"].items():  # fp16 overflows to inf above 65504
        check_finite(vectors.to(dtype), pairs, key, f"{cfg.save_dtype} vector")
    vec_path = save_vectors(out_dir, acts["diff"], pairs, meta, dtype)
    users = user_vectors(pairs, acts, cfg.user_strategies)
    user_path = save_user_vectors(out_dir, users, {**meta, "n_users": len({str(p["user_id"]) for p in pairs})}, dtype)
    shutil.rmtree(out_dir / "chunks", ignore_errors=True)
    stage.finish(inputs=[pairs_path], outputs=[vec_path, out_dir / "vectors.index.json", user_path],
                 model=model_name(model), seed=cfg.seed, n_pairs=len(pairs), keys=keys)
    print(f"[04_extract_vectors] {len(pairs)} pairs x {len(keys)} keys -> {vec_path}; user vectors -> {user_path}")


if __name__ == "__main__":
    main()
