"""Text helpers shared by every layer: THE tokenizer and BM25 used for every lexical
ranking in Fints (history ranking, pair retrieval, user clustering, product search), and
the one JSON scanner that finds objects in generated text.

Tokenizer: lowercase, then split on anything that is not a letter or digit
(punctuation and whitespace separate tokens; ``"Don't-stop!"`` -> ``["don", "t", "stop"]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import numpy as np
from rank_bm25 import BM25Okapi

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_JSON_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """Lowercase and split on punctuation/whitespace."""
    return _WORD.findall(text.lower())


class BM25:
    """BM25Okapi over a fixed list of documents, built once, queried many times.

    An empty corpus or an all-empty document list still answers (with zeros), so a
    user with one blank history item never crashes a stage.
    """

    def __init__(self, documents: list[str]):
        self.size = len(documents)
        tokens = [tokenize(d) for d in documents]
        # rank_bm25 divides by the average document length: guard all-empty corpora.
        self._bm25 = BM25Okapi(tokens) if any(tokens) else None

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (float64, corpus order)."""
        if self._bm25 is None or self.size == 0:
            return np.zeros(self.size)
        return np.asarray(self._bm25.get_scores(tokenize(query)), dtype=np.float64)

    def top_k(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the ``k`` best documents; ties keep corpus order."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return order, scores[order]


def json_objects(text: str) -> Iterator[tuple[dict, str]]:
    """Every JSON object in ``text`` as ``(object, its source text)``: the contents of
    ```json fences first, then the whole text, each scanned left to right."""
    decoder = json.JSONDecoder()
    for candidate in [m.group(1) for m in _JSON_FENCE.finditer(text)] + [text]:
        for match in re.finditer(r"\{", candidate):
            try:
                obj, end = decoder.raw_decode(candidate, match.start())
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj, candidate[match.start():end]
