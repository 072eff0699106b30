"""The steering runtime behind the server: one model, one task, a run's vectors and histories.

Everything a request can use is loaded from the run directory when the server starts (the
model, the task, users' histories, per-user adapters, tuned settings) or on first use and
then kept (an algorithm's vectors: the pair store is lazy and its per-user cache bounded,
:class:`steering.aggregate.PairAggregator`).  A request's settings are stage 05's config
with the request's overrides (:meth:`Runtime.settings`, cheap, checked before it queues);
:meth:`Runtime.prepare` turns it into a :class:`serve.engine.Row` with 05's own prompt
builder and algorithm objects (built by ``stages.generate``'s settings function), so a
task-mode request gets 05's prompt and steering row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data_process.artifact_io import read_json
from data_process.config import stage_dir
from data_process.schema import is_safe_name
from serve.engine import Row, generate_rows
from serve.history import Histories
from serve.requests import AGGREGATOR_KNOBS, TUNED_FROM, ApiError, tuned_settings
from serve.settings import ServeConfig
from stages.common import require, task_of, with_task_defaults
from stages.generate import GenerateConfig, algo_settings
from steering.algorithms import ALGORITHMS, Fints, GlobalSteer, SteerSpec, ZeroShot, build_algorithm
from steering.decoding import decoding_kwargs
from steering.inputs import chat_prompt
from steering.layers import check_layers, find_layers
from steering.loading import load_model
from steering.vectors import INDEX_FILE

log = logging.getLogger(__name__)
MAX_ALGORITHMS = 8  # loaded vector configurations kept (each with its own bounded user cache)
CHAT_MAX_TOKENS = 128  # a chat request's default length (task mode: the task's, as in 05)


@dataclass
class Request:
    """A validated request: who asks, what, and with which settings."""

    user: str
    mode: str                     # "task": the task input, 05's prompt | "chat": the messages as given
    cfg: GenerateConfig           # stage 05's settings for this request
    text: str = ""                # task mode: the task input; chat mode: the retrieval query
    messages: list[dict[str, str]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stops: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    row: Row
    notes: list[str]              # said in the response (x-fints-note): e.g. a user without vectors


class Runtime:
    """Model, task, histories, adapters and algorithms of one run, shared by every request."""

    def __init__(self, cfg: ServeConfig, model=None, tok=None):
        cfg = with_task_defaults(cfg)
        self.task = task_of(cfg)
        require(cfg, "history_k", "max_new_tokens")
        self.cfg = cfg
        self.base = GenerateConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GenerateConfig)})
        if model is None:
            model, tok = load_model(cfg.model, cfg.device, cfg.dtype, layers_attr=cfg.layers_attr)
        self.model, self.tok = model, tok
        self.name = cfg.served_name or Path(cfg.model).name
        self.layers = find_layers(model)
        decoding = decoding_kwargs(self.task, model, tok, cfg.constrained)
        self.prefix, self.constraint = decoding["response_prefix"], decoding.get("constraint")
        self.histories = Histories(cfg.run_dir, cfg.history_splits, self.task.query)
        self.tuned = self._tuned()
        self.adapters = self._adapters()
        index = stage_dir(cfg.run_dir, "vectors") / INDEX_FILE
        with_vectors = {str(r["user_id"]) for r in read_json(index)} if index.exists() else set()
        self.users = set(self.histories.pools) | with_vectors | set(self.adapters.names if self.adapters else [])
        self._algorithms: OrderedDict[tuple, ZeroShot] = OrderedDict()
        self.algos = [a for a, c in ALGORITHMS.items() if self.adapters or not c.adapters]
        self.algorithm(self.settings("task", {}))  # the default algorithm's files are checked now

    def _tuned(self) -> dict[str, dict[str, Any]]:
        path = stage_dir(self.cfg.run_dir, "tune") / "tune.json"
        if not (self.cfg.use_tuned and path.exists()):
            return {}
        chosen = read_json(path).get("chosen", {})
        log.info("[serve] tuned defaults from %s: %s", path, chosen)
        return {algo: tuned_settings(chosen[point]) for algo, point in TUNED_FROM.items() if point in chosen}

    def _adapters(self):
        """The run's per-user LoRA adapters ({run_dir}/lora, or --plugin), when there are any."""
        plugin = Path(self.cfg.plugin) if self.cfg.plugin else stage_dir(self.cfg.run_dir, "lora")
        if not (plugin / "manifest.json").exists() and not self.cfg.plugin:
            return None
        users = sorted(d.name for d in plugin.iterdir()
                       if is_safe_name(d.name) and (d / "adapter_config.json").exists())
        if not users:
            return None
        from steering.runner import UserAdapters, find_adapters

        log.info("[serve] LoRA adapters of %d users from %s", len(users), plugin)
        return UserAdapters(self.model, find_adapters(plugin, users))

    def settings(self, mode: str, overrides: dict[str, Any]) -> GenerateConfig:
        """This request's settings: 05's config < tune.json's choice for the algorithm <
        the request's overrides; checked as 05 checks them (a 400 naming the problem)."""
        algo = overrides.get("algo", self.base.algo)
        cfg = replace(self.base, **{**self.tuned.get(algo, {}), **overrides})
        info = ALGORITHMS[cfg.algo]
        if info.adapters and self.adapters is None:
            raise ApiError(400, f"fints.algo: {cfg.algo!r} runs under per-user LoRA adapters and this run has none "
                                f"(scripts.train_lora); available: {self.algos}", "fints.algo", "invalid_value")
        if mode == "chat" and cfg.algo == "rag":
            raise ApiError(400, "fints.algo: 'rag' writes history into the task prompt; chat mode sends your messages "
                                "as given (use zeroshot, steer or fints, or fints.mode 'task')", "fints.algo",
                           "invalid_value")
        if cfg.max_prompt_tokens > self.cfg.max_input_tokens:
            raise ApiError(400, f"fints.max_prompt_tokens: must be at most {self.cfg.max_input_tokens} "
                                "(the server's --max-input-tokens)", "fints.max_prompt_tokens", "invalid_value")
        if info.steers:
            try:
                check_layers(self.layers, cfg.layers)
                SteerSpec.build(cfg.layers, cfg.sites, cfg.alpha, cfg.beta, cfg.multipliers)
            except ValueError as err:
                raise ApiError(400, f"fints: {err}", "fints", "invalid_value") from None
        return cfg

    def algorithm(self, cfg: GenerateConfig) -> ZeroShot:
        """05's algorithm object for ``cfg``: loaded once per vector configuration, then given
        this request's per-call settings (multipliers, top pairs, history, budget)."""
        steers = ALGORITHMS[cfg.algo].steers
        key = (cfg.algo, tuple(cfg.layers), tuple(cfg.sites), cfg.vec_strategy, cfg.retriever) if steers \
            else (cfg.algo,)
        settings = algo_settings(cfg, self.task, self.model, self.tok)
        if key not in self._algorithms:
            try:
                algo = build_algorithm(cfg.algo, settings)
            except (ValueError, FileNotFoundError) as err:
                raise ApiError(400, f"fints: {self._private(str(err))}", "fints", "invalid_value") from None
            if isinstance(algo, Fints):
                algo.aggregator.cache_bytes = int(self.cfg.cache_mb * 2**20)
            self._algorithms[key] = algo
            while len(self._algorithms) > MAX_ALGORITHMS:
                self._algorithms.popitem(last=False)
        self._algorithms.move_to_end(key)
        algo = self._algorithms[key]
        algo.settings = settings
        if isinstance(algo, Fints):  # what the aggregator reads per call (its user cache is kept)
            for name in AGGREGATOR_KNOBS:
                if not hasattr(algo.aggregator, name):  # a renamed attribute must not be set unseen
                    raise AttributeError(f"PairAggregator has no {name!r}: update serve.requests.AGGREGATOR_KNOBS")
                setattr(algo.aggregator, name, getattr(cfg, name))
        return algo

    def _private(self, message: str) -> str:
        """``message`` with the run directory's place on this machine left out (clients
        need not learn the server's file layout)."""
        for path in sorted({str(Path(self.cfg.run_dir).resolve()), str(self.cfg.run_dir)}, key=len, reverse=True):
            message = message.replace(path, "{run_dir}")
        return message

    def prepare(self, req: Request) -> Prepared:
        """The batch row of one request (on the batching thread: algorithms are not shared
        across threads)."""
        cfg = req.cfg
        algo = self.algorithm(cfg)
        notes: list[str] = []
        if req.mode == "task":
            row, missing = self._task_row(req, algo)
        else:
            row, missing = self._chat_row(req, algo)
        if missing:
            notes.append(f"user {req.user!r} has no steering vectors: answered without steering, as stage 05 does")
        if len(row.ids) > self.cfg.max_input_tokens:
            raise ApiError(400, f"the prompt has {len(row.ids)} tokens; this server takes at most "
                                f"{self.cfg.max_input_tokens} (--max-input-tokens)",
                           "prompt" if req.mode == "task" else "messages", "context_length_exceeded")
        limit = req.max_tokens or (cfg.max_new_tokens if req.mode == "task" else CHAT_MAX_TOKENS)
        sample = cfg.do_sample if req.temperature is None else req.temperature > 0
        row.max_new_tokens, row.do_sample, row.positions, row.stops = limit, sample, cfg.positions, req.stops
        row.temperature = req.temperature if req.temperature else cfg.sampling_temperature
        row.top_p = cfg.top_p if req.top_p is None else req.top_p
        row.seed = cfg.seed if req.seed is None else req.seed
        if ALGORITHMS[cfg.algo].adapters and req.user in self.adapters.names:
            row.adapter_user = req.user
        return Prepared(row, notes)

    def _task_row(self, req: Request, algo: ZeroShot) -> tuple[Row, bool]:
        sample = {**req.fields, "id": "request", "user_id": req.user, "input": req.text, "output": "", "history": []}
        if type(algo) is not ZeroShot and req.cfg.history_k:
            sample["history"] = self.histories.ranked(sample)
        try:
            prepared = algo([sample])
        except (ValueError, KeyError, TypeError) as err:
            raise ApiError(400, f"the task cannot build a prompt from this request: {err}", "prompt",
                           "invalid_value") from None
        message = prepared.messages[0]
        deltas = {k: v[0] for k, v in prepared.deltas.items()} if prepared.deltas else None
        ids = self.tok(chat_prompt(self.tok, message, self.prefix), add_special_tokens=False)["input_ids"]
        row = Row(ids, message, 1, deltas, response_prefix=self.prefix, constraint=self.constraint,
                  postprocess=self.task.postprocess)
        return row, req.user in prepared.missing_users

    def _chat_row(self, req: Request, algo: ZeroShot) -> tuple[Row, bool]:
        tok = self.tok
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        else:  # as chat_prompt renders one message for a model without a template
            prompt = (tok.bos_token or "") + "\n".join(m["content"] for m in req.messages) + "\n"
        deltas, missing = None, False
        spec = algo.settings.steer
        if isinstance(algo, Fints):
            vectors = algo.aggregator.vectors([req.user], [req.text])
            missing = req.user in algo.aggregator.missing_users
            deltas = {k: vectors[k][0].float() * spec.scales[k] for k in spec.keys}
        elif isinstance(algo, GlobalSteer):
            user = algo.user_vectors.get(req.user)
            missing = user is None
            deltas = None if user is None else {k: user[k].float() * spec.scales[k] for k in spec.keys}
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        return Row(ids, prompt, 1, deltas, postprocess=str.strip), missing

    def generate(self, rows: list[Row]):
        """Run one batch (rows sharing a batch key); see :func:`serve.engine.generate_rows`."""
        return generate_rows(self.model, self.tok, rows, self.adapters)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
