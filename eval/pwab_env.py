"""PersonalWAB tool environment: the three functions an agent's call is executed with.

* ``search_product_by_query`` -- BM25 over the catalogue (``all_products_part_*.json``:
  title, features, description, categories, store), top 10 asins with a positive score.
  The index is the shared :class:`data_process.text.BM25` (the project's tokenizer,
  BM25Okapi); its sparse term x document weight matrix is stored once in
  ``{cache_dir}/search_index/`` (npz, no pickle) and reused while the catalogue files
  are unchanged (sha256 fingerprint).
* ``get_recommendations_by_history`` -- SASRec (:mod:`eval.sasrec`) trained by
  ``python -m scripts.train_sasrec``, read from ``{cache_dir}/sasrec``; top 10 asins.
* ``add_product_review`` -- returns the review text.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from data_process.artifact_io import read_json, sha256_file, write_json
from data_process.progress import tqdm
from data_process.text import BM25, EPSILON, K1, B, tokenize
from eval.pwab_tools import ToolCall

log = logging.getLogger(__name__)

TOP_K = 10


def default_cache_dir(run_dir: str | Path) -> Path:
    """Where a run keeps the PersonalWAB environment (search index, SASRec checkpoint)."""
    return Path(run_dir) / "pwab_env"


def numbered_parts(data_dir: Path, prefix: str) -> list[Path]:
    """``<prefix>_part_<n>.json`` files of ``data_dir`` in part-number order."""
    def number(p: Path) -> int:
        found = re.search(r"(\d+)\.json$", p.name)
        return int(found.group(1)) if found else 0
    return sorted(data_dir.glob(f"{prefix}_part_*.json"), key=number)


def product_text(info: dict[str, Any]) -> str:
    """Searchable text of a product: title, features, description, categories, store."""
    parts: list[str] = [str(info.get("title") or "")]
    for key in ("features", "description", "categories"):
        value = info.get(key) or []
        parts.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    parts.append(str(info.get("store") or ""))
    return " ".join(p for p in parts if p.strip())


def load_catalogue(data_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{asin: product_info}`` from every ``all_products_part_*.json``, in file order."""
    parts = numbered_parts(Path(data_dir), "all_products")
    if not parts:
        raise FileNotFoundError(f"{data_dir}: no all_products_part_*.json files (the product catalogue)")
    catalogue: dict[str, dict[str, Any]] = {}
    for path in parts:
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object {{asin: product_info}}")
        for asin, info in raw.items():
            if not isinstance(info, dict):
                raise ValueError(f"{path}: product {asin!r}: product_info must be an object")
            catalogue[asin] = info
    return catalogue


class SearchIndex:
    """The catalogue's :class:`data_process.text.BM25` and the asin of each document."""

    def __init__(self, asins: list[str], bm25: BM25, from_cache: bool = False):
        self.asins, self.bm25, self.from_cache = asins, bm25, from_cache

    @classmethod
    def build(cls, documents: list[str], asins: list[str]) -> SearchIndex:
        return cls(asins, BM25([tokenize(d) for d in tqdm(documents, desc="index products", leave=False)]))

    def scores(self, query: str) -> np.ndarray:
        return self.bm25.scores(query)

    def search(self, query: str, k: int = TOP_K) -> list[str]:
        """Asins of the ``k`` best products with a positive score (ties: catalogue order)."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.asins[i] for i in order if scores[i] > 0]

    def save(self, directory: Path, fingerprint: dict[str, str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.bm25.weights
        vocab = sorted(self.bm25.vocab, key=self.bm25.vocab.get)  # the rows' term order
        tmp = directory / "index.tmp.npz"
        np.savez(tmp, indptr=weights.indptr, indices=weights.indices, data=weights.data)
        tmp.replace(directory / "index.npz")
        # meta.json last: its presence (with a matching fingerprint) marks a usable cache
        write_json(directory / "meta.json", {"fingerprint": fingerprint, "asins": self.asins, "vocab": vocab,
                                             "k1": K1, "b": B, "epsilon": EPSILON})

    @classmethod
    def load(cls, directory: Path, fingerprint: dict[str, str]) -> SearchIndex | None:
        """The cached index, or None when absent or built from other catalogue files."""
        meta_path = directory / "meta.json"
        if not meta_path.exists() or not (directory / "index.npz").exists():
            return None
        meta = read_json(meta_path)
        if meta.get("fingerprint") != fingerprint or [meta.get(k) for k in ("k1", "b", "epsilon")] != [K1, B, EPSILON]:
            log.info("catalogue or BM25 settings changed since %s was built: rebuilding the search index", directory)
            return None
        with np.load(directory / "index.npz", allow_pickle=False) as z:
            weights = (z["data"], z["indices"], z["indptr"])
            bm25 = BM25.from_matrix(meta["vocab"], weights, len(meta["asins"]))
        return cls(meta["asins"], bm25, from_cache=True)


def catalogue_fingerprint(data_dir: str | Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in numbered_parts(Path(data_dir), "all_products")}


def search_index(data_dir: str | Path, cache_dir: str | Path) -> SearchIndex:
    """Load the cached index of ``data_dir``'s catalogue, building (and caching) it once."""
    directory = Path(cache_dir) / "search_index"
    fingerprint = catalogue_fingerprint(data_dir)
    index = SearchIndex.load(directory, fingerprint)
    if index is None:
        catalogue = load_catalogue(data_dir)
        log.info("building the BM25 index of %d products in %s", len(catalogue), directory)
        index = SearchIndex.build([product_text(info) for info in catalogue.values()], list(catalogue))
        index.save(directory, fingerprint)
    return index


class PwabEnv:
    """Executes tool calls.  The index and the recommender load on first use."""

    def __init__(self, data_dir: str | Path, cache_dir: str | Path, *, sasrec_dir: str | Path | None = None,
                 top_k: int = TOP_K):
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.sasrec_dir = Path(sasrec_dir) if sasrec_dir else self.cache_dir / "sasrec"
        self.top_k = top_k
        self._index: SearchIndex | None = None
        self._recommender = None

    @property
    def index(self) -> SearchIndex:
        if self._index is None:
            self._index = search_index(self.data_dir, self.cache_dir)
        return self._index

    @property
    def recommender(self):
        if self._recommender is None:
            from eval.sasrec import SASRecRecommender

            self._recommender = SASRecRecommender(self.sasrec_dir)
        return self._recommender

    def search_product_by_query(self, query: str) -> list[str]:
        return self.index.search(query, self.top_k)

    def get_recommendations_by_history(self, product_sequence: list[str]) -> list[str]:
        return self.recommender.recommend(product_sequence, self.top_k)

    def add_product_review(self, review: str) -> str:
        return review

    def run(self, call: ToolCall) -> list[str] | str:
        """Result of one parsed call: a list of asins (search, recommend) or the review text."""
        return getattr(self, call.name)(**call.arguments)

