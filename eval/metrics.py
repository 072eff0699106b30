"""Text metrics: ROUGE-1 / ROUGE-L F1 (rouge-score, stemmer on) and METEOR (nltk).

METEOR needs WordNet, which ``scripts/setup.sh`` copies into ``nltk_data/``; when it
is missing, :func:`meteor_available` says so and callers report the other metrics.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

NLTK_DATA = Path(__file__).resolve().parent.parent / "nltk_data"


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F1 of one prediction against one reference."""
    scores = _scorer().score(reference, prediction)
    return {"rouge1": scores["rouge1"].fmeasure, "rougeL": scores["rougeL"].fmeasure}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (used to filter negative pairs)."""
    return rouge(prediction, reference)["rougeL"]


@functools.cache
def meteor_available() -> bool:
    """True when NLTK can read WordNet (from ``nltk_data/`` or NLTK's usual places)."""
    import nltk

    if str(NLTK_DATA) not in nltk.data.path:
        nltk.data.path.insert(0, str(NLTK_DATA))
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("test")
        return True
    except LookupError:
        log.warning("WordNet not found (run scripts/setup.sh): METEOR is unavailable")
        return False


def _tokens(text: str) -> list[str]:
    # A regex tokenizer needs no NLTK download (word_tokenize needs punkt).
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())


def meteor(prediction: str, reference: str) -> float | None:
    """METEOR of one prediction, or None when WordNet is unavailable."""
    if not meteor_available():
        return None
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([_tokens(reference)], _tokens(prediction)))


def text_scores(prediction: str, reference: str) -> dict[str, float]:
    """All text metrics of one prediction (METEOR left out when unavailable)."""
    scores = rouge(prediction, reference)
    m = meteor(prediction, reference)
    if m is not None:
        scores["meteor"] = m
    return scores
