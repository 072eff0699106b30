"""The generation algorithms compared by Fints, as small strategies chosen by name.

Each algorithm turns a batch of test samples into user messages and, when it steers,
one steering row per sample (``{"attn.L": Tensor[n, hidden], ...}``, already scaled):

* ``zeroshot`` — the task prompt alone;
* ``rag``      — the prompt with the sample's top-k ranked history items (stage 02 order);
* ``steer``    — the RAG prompt + the user's global vector (``mean | pca | logistic``);
* ``fints``    — the RAG prompt + a per-query vector aggregated from the user's top-K pairs;
* ``oppu``     — the RAG prompt under the user's own LoRA adapter (OPPU, scripts/train_lora);
* ``oppu+fints`` — fints under the user's adapter: Fints as a plug-in on a LoRA model.

All share the prompt builder, decoding, dtype and batching, so the only thing that
differs between them is what the algorithm adds.  A user without vectors (an unseen user)
gets a zero row, i.e. exactly RAG, and is listed in :attr:`Prepared.missing_users`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_process.config import choose
from steering.hooks import SITES
from tasks import Task

log = logging.getLogger(__name__)


@dataclass
class SteerSpec:
    """Where and how strongly to steer: one multiplier per hook key (``site.layer``)."""

    scales: dict[str, float]

    @property
    def keys(self) -> list[str]:
        return list(self.scales)

    @classmethod
    def build(cls, layers: list[int], sites: list[str], alpha: float = 1.0, beta: float = 1.0,
              multipliers: list[float] | None = None) -> SteerSpec:
        """``multipliers`` (one per layer, every site of that layer) override ``alpha``
        (attn and block sites) and ``beta`` (mlp sites)."""
        bad = [s for s in sites if s not in SITES]
        if bad:
            raise ValueError(f"unknown steering site(s) {bad}; choose from {list(SITES)}")
        if not layers or not sites:
            raise ValueError("steering needs at least one layer (--layers) and one site (--sites)")
        if not all(math.isfinite(m) for m in [alpha, beta, *(multipliers or [])]):
            raise ValueError(f"steering multipliers must be finite numbers (--alpha {alpha}, --beta {beta}, "
                             f"--multipliers {multipliers})")
        if multipliers and len(multipliers) != len(layers):
            raise ValueError(f"--multipliers gives {len(multipliers)} values for {len(layers)} layers "
                             f"{layers}; give one per layer")
        scales = {}
        for i, layer in enumerate(layers):
            for site in sites:
                if multipliers:
                    scales[f"{site}.{layer}"] = float(multipliers[i])
                else:
                    scales[f"{site}.{layer}"] = float(beta if site == "mlp" else alpha)
        return cls(scales)


@dataclass
class AlgoSettings:
    """Everything an algorithm needs besides the samples (filled from the stage config)."""

    task: Task
    tokenizer: Any = None
    history_k: int = 5               # history items in the prompt
    max_prompt_tokens: int = 0       # 0: the prompt builder's default
    steer: SteerSpec | None = None
    vectors_dir: str | Path = ""
    vec_strategy: str = "mean"
    top_pairs: int = 5               # fints: pairs retrieved and aggregated per query
    pair_weighting: str = "softmax"
    softmax_temperature: float = 0.1
    retriever: str = "bm25"
    model: Any = None                # checked against the vector store's metadata
    hidden_size: int = 0


@dataclass
class Prepared:
    """Messages (and optional per-row deltas) for one batch of samples."""

    messages: list[str]
    deltas: dict[str, torch.Tensor] | None = None
    missing_users: set[str] = field(default_factory=set)


def build_message(settings: AlgoSettings, sample: dict, history: list[dict]) -> str:
    """The user message of one sample, through the task's prompt builder."""
    kwargs: dict[str, Any] = {"tokenizer": settings.tokenizer}
    if settings.max_prompt_tokens > 0:
        kwargs["max_prompt_tokens"] = settings.max_prompt_tokens
    return settings.task.prompt(sample, history, **kwargs)


def _scale(vectors: dict[str, torch.Tensor], spec: SteerSpec) -> dict[str, torch.Tensor]:
    return {key: vectors[key].float() * spec.scales[key] for key in spec.keys}


class ZeroShot:
    """The task prompt alone."""

    steers = False
    adapters = False  # True: runs under each user's LoRA adapter (05 loads them)
    vector_files: tuple[str, ...] = ()  # the stage-04 files it reads (fingerprinted inputs of stage 05)

    def __init__(self, settings: AlgoSettings):
        self.settings = settings

    def history(self, sample: dict) -> list[dict]:
        return []

    def __call__(self, samples: list[dict]) -> Prepared:
        return Prepared([build_message(self.settings, s, self.history(s)) for s in samples])


class Rag(ZeroShot):
    """The prompt with the sample's top-k history items (already ranked by stage 02)."""

    def history(self, sample: dict) -> list[dict]:
        return sample["history"][: self.settings.history_k]


def _stage04_file(settings: AlgoSettings, algo: str, name: str, what: str) -> Path:
    """The stage-04 file a steering algorithm needs, with clear errors when it cannot run."""
    if settings.steer is None:
        raise ValueError(f"algorithm {algo!r} needs steering layers and sites")
    path = Path(settings.vectors_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {what} (run scripts/04_extract_vectors first)")
    return path


class GlobalSteer(Rag):
    """RAG prompt + the user's global steering vector (one vector per user)."""

    steers = True
    vector_files = ("user_vectors.safetensors",)

    def __init__(self, settings: AlgoSettings):
        super().__init__(settings)
        from steering.vectors import load_user_vectors

        path = _stage04_file(settings, "steer", self.vector_files[0], "per-user vectors")
        self.user_vectors = load_user_vectors(path, settings.vec_strategy, settings.steer.keys,
                                              model=settings.model)

    def __call__(self, samples: list[dict]) -> Prepared:
        prepared = super().__call__(samples)
        spec, hidden = self.settings.steer, self.settings.hidden_size
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in spec.keys}
        for s in samples:
            user = self.user_vectors.get(s["user_id"])
            if user is None:
                prepared.missing_users.add(s["user_id"])
            for key in spec.keys:
                rows[key].append(user[key].float() if user is not None else torch.zeros(hidden))
        prepared.deltas = _scale({k: torch.stack(v) for k, v in rows.items()}, spec)
        return prepared


class Fints(Rag):
    """RAG prompt + a per-query vector aggregated from the user's most relevant pairs."""

    steers = True
    vector_files = ("vectors.safetensors", "vectors.index.json")

    def __init__(self, settings: AlgoSettings):
        super().__init__(settings)
        from steering.aggregate import PairAggregator
        from steering.vectors import VectorStore

        path = _stage04_file(settings, "fints", self.vector_files[0], "pair vectors")
        store = VectorStore.load(path, model=settings.model, keys=settings.steer.keys)
        self.aggregator = PairAggregator(store, settings.steer.keys, top_pairs=settings.top_pairs,
                                         pair_weighting=settings.pair_weighting,
                                         softmax_temperature=settings.softmax_temperature,
                                         retriever=settings.retriever)

    def __call__(self, samples: list[dict]) -> Prepared:
        prepared = super().__call__(samples)
        users = [s["user_id"] for s in samples]
        # The task's query text (article, title, request), as on the pairs' side: the
        # instruction template would match every pair alike.
        queries = [self.settings.task.query(s) for s in samples]
        vectors = self.aggregator.vectors(users, queries)
        prepared.missing_users = set(users) & set(getattr(self.aggregator, "missing_users", set()))
        prepared.deltas = _scale(vectors, self.settings.steer)
        return prepared


class Oppu(Rag):
    """RAG prompt; the stage runs it under the user's LoRA adapter (OPPU's setting)."""

    adapters = True


class OppuFints(Fints):
    """Fints under the user's LoRA adapter: steering on top of the parametric personalization."""

    adapters = True


ALGORITHMS: dict[str, Callable[[AlgoSettings], ZeroShot]] = {
    "zeroshot": ZeroShot, "rag": Rag, "steer": GlobalSteer, "fints": Fints, "oppu": Oppu, "oppu+fints": OppuFints}


def build_algorithm(name: str, settings: AlgoSettings) -> ZeroShot:
    """Instantiate algorithm ``name`` ("Did you mean" error for unknown names)."""
    return choose("algorithm", name, ALGORITHMS)(settings)
