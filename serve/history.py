"""Users' histories, the RAG source of task-mode requests, ranked as stage 02 ranks them.

A user's history is the time-ordered ``history`` of one of their samples in stage 01's
files (``{run_dir}/data/<split>.jsonl``, read strictly against the stage's manifest): the
first of ``splits`` that holds the user, and there the sample with the most items (a test
sample's history is the user's whole profile, minus the leakage rule).  For a request it
is ranked against the request's query with the run's own stage-02 ranker, through
:func:`data_process.ranking.rank_samples` itself: the same items, the same order and so the
same RAG prompt as 05 builds for a test sample with that input.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_process.artifact_io import MANIFEST, read_json
from data_process.config import stage_dir
from data_process.ranking import rank_samples
from stages.common import load_samples

log = logging.getLogger(__name__)


class Histories:
    """Each user's history pool and the run's history ranker."""

    def __init__(self, run_dir: str | Path, splits: list[str], query):
        self.query = query
        self.pools: dict[str, list[dict[str, Any]]] = {}
        data = stage_dir(run_dir, "data")
        for split in splits:
            path = data / f"{split}.jsonl"
            if not path.exists():
                continue
            best: dict[str, list[dict[str, Any]]] = {}
            for sample in load_samples(path, allow_empty=True):
                user = sample["user_id"]
                if user not in self.pools and len(sample["history"]) >= len(best.get(user, [])):
                    best[user] = sample["history"]
            self.pools.update(best)
        if not self.pools:
            raise FileNotFoundError(f"{data}: none of {splits} holds a sample (run scripts.01_select_users first, "
                                    "or check --history-splits)")
        manifest = stage_dir(run_dir, "ranked") / MANIFEST
        config = read_json(manifest).get("config", {}) if manifest.exists() else {}
        self.ranker = config.get("ranker", "bm25")
        self.encoder_path = config.get("encoder", "")
        self._encoder = None
        log.info("[serve] histories of %d users from %s; ranker %s", len(self.pools), splits, self.ranker)

    def __contains__(self, user: str) -> bool:
        return user in self.pools

    def ranked(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """``sample``'s user's history, most relevant to ``sample``'s query first."""
        pool = self.pools.get(sample["user_id"], [])
        if not pool:
            return []
        kwargs: dict[str, Any] = {}
        if self.ranker == "dense":
            if self._encoder is None:
                from data_process.dense import shared_encoder

                self._encoder = shared_encoder(self.encoder_path) if self.encoder_path else shared_encoder()
            kwargs["encoder"] = self._encoder
        (ranked,) = rank_samples([{**sample, "history": pool}], self.ranker, query=self.query, **kwargs)
        return ranked["history"]
