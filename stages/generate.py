"""Stage 05: generate answers for a test split with one algorithm.

Writes {run_dir}/generations/{split}/{algo}{tag}/generations.jsonl (resumable) and a
manifest; ``--eval`` scores it right away (stage 06).  ``--algo oppu`` / ``oppu+fints``
run under per-user LoRA adapters ({run_dir}/lora/<user_id>/ from scripts/train_lora, or
``--plugin DIR``); ``--plugin DIR`` with any other algorithm steers on top of DIR's adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_process.artifacts import JsonlWriter, Stage, read_json
from data_process.config import stage_dir
from data_process.schema import checked_name
from stages.common import load_samples, require, task_of
from stages.evaluate import evaluate_run
from stages.workers import WorkersConfig, absolute_paths, run_chunks, user_chunks, write_in_order
from steering.aggregate import RETRIEVERS, WEIGHTINGS
from steering.algorithms import ALGORITHMS, AlgoSettings, SteerSpec, build_algorithm
from steering.decoding import decoding_kwargs
from steering.hooks import POSITIONS, SITES
from steering.layers import check_layers, find_layers
from steering.loading import load_model, load_tokenizer, model_name
from steering.runner import UserAdapters, generate_records
from steering.user_vectors import USER_STRATEGIES
from tasks.base import DEFAULT_MAX_PROMPT_TOKENS, count_cut_inputs

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig(WorkersConfig):
    """Stage 05 settings (config section ``generate``); unset values come from the task."""

    STAGE = "05_generate"
    SECTIONS = ("generate",)
    # The tag names the output directory; a batch's rows are independent; chunks only set
    # how often results are saved; --eval is what happens after.
    NOT_IN_FINGERPRINT = WorkersConfig.NOT_IN_FINGERPRINT | {"tag", "batch_size", "samples_per_chunk", "eval"}

    algo: str = field(default="fints", metadata={"help": "generation algorithm", "choices": list(ALGORITHMS)})
    split: str = field(default="seen_test", metadata={"name": True, "help": "file name (no .jsonl) in {run_dir}/ranked/"})
    tag: str = field(default="", metadata={"name": True, "help": "suffix of the output directory name, e.g. _L15"})
    history_k: int | None = field(default=None, metadata={"min": 0, "help": "history items in the prompt (default: the task's)"})
    max_prompt_tokens: int = field(default=DEFAULT_MAX_PROMPT_TOKENS, metadata={"min": 1, "help": "prompt budget in tokens"})
    layers: list[int] = field(default_factory=lambda: [15], metadata={"min": 0, "non_empty": True, "help": "layers steered"})
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"], metadata={"non_empty": True, "help": "sites steered",
                                                                               "choices": list(SITES)})
    alpha: float = field(default=1.0, metadata={"help": "multiplier of attn (and block) vectors"})
    beta: float = field(default=1.0, metadata={"help": "multiplier of mlp vectors"})
    multipliers: list[float] = field(default_factory=list, metadata={"help": "one multiplier per layer (overrides alpha/beta)"})
    positions: str = field(default="all", metadata={"help": "tokens that are steered", "choices": list(POSITIONS)})
    vec_strategy: str = field(default="mean", metadata={"help": "steer: the per-user vector",
                                                        "choices": list(USER_STRATEGIES)})
    top_pairs: int = field(default=5, metadata={"min": 1, "help": "fints: pairs retrieved and aggregated per query"})
    pair_weighting: str = field(default="softmax", metadata={"help": "fints: weighting of the retrieved pairs",
                                                             "choices": list(WEIGHTINGS)})
    softmax_temperature: float = field(default=0.1, metadata={"gt": 0, "help": "fints: softmax temperature of retrieval scores"})
    retriever: str = field(default="bm25", metadata={"help": "fints: pair retrieval", "choices": list(RETRIEVERS)})
    max_new_tokens: int | None = field(default=None, metadata={"min": 1, "help": "generation length (default: the task's)"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "rows per generation batch"})
    samples_per_chunk: int = field(default=64, metadata={"min": 1, "help": "samples (of whole users) generated and saved together: "
                                                                 "the unit a worker computes and a resumed run redoes"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    sampling_temperature: float = field(default=1.0, metadata={"gt": 0, "help": "sampling temperature (with --do-sample)"})
    top_p: float = field(default=1.0, metadata={"gt": 0, "max": 1, "help": "nucleus sampling mass (with --do-sample)"})
    constrained: bool | None = field(default=None, metadata={"help": "decode only valid calls of the task's call schema (default: the task's)"})
    limit: int = field(default=0, metadata={"min": 0, "help": "only the first N samples of the split (0: all)"})
    plugin: str = field(default="", metadata={"help": "directory of per-user PEFT LoRA adapters <dir>/<user_id>/ "
                                                      "(oppu, oppu+fints: default {run_dir}/lora)"})
    eval: bool = field(default=False, metadata={"help": "run stage 06 on the result"})


def gen_dir(cfg: GenerateConfig) -> Path:
    """{run_dir}/generations/{split}/{algo}{tag}: where a generation run lives."""
    return stage_dir(cfg.run_dir, "generations") / cfg.split / f"{cfg.algo}{cfg.tag}"


def _settings(cfg: GenerateConfig, task, model, tok) -> AlgoSettings:
    spec = None
    if ALGORITHMS[cfg.algo].steers:
        check_layers(find_layers(model), cfg.layers)
        spec = SteerSpec.build(cfg.layers, cfg.sites, cfg.alpha, cfg.beta, cfg.multipliers)
    return AlgoSettings(
        task=task, tokenizer=tok, history_k=cfg.history_k, max_prompt_tokens=cfg.max_prompt_tokens, steer=spec,
        vectors_dir=stage_dir(cfg.run_dir, "vectors"), vec_strategy=cfg.vec_strategy, top_k=cfg.top_pairs,
        weighting=cfg.pair_weighting, temperature=cfg.softmax_temperature, retriever=cfg.retriever,
        model=model, hidden_size=model.config.hidden_size)


def _plugin_dir(cfg: GenerateConfig) -> Path | None:
    """The adapter directory this run uses (None: no adapters), checked against how it was trained."""
    if not cfg.plugin and not ALGORITHMS[cfg.algo].adapters:
        return None
    plugin = Path(cfg.plugin) if cfg.plugin else stage_dir(cfg.run_dir, "lora")
    manifest = plugin / "manifest.json"
    if not plugin.is_dir() or not (cfg.plugin or manifest.exists()):
        raise FileNotFoundError(f"{manifest} does not exist: no finished per-user adapters for --algo {cfg.algo} "
                                "(run scripts.train_lora first, or pass --plugin DIR)")
    trained = read_json(manifest).get("prompt") if manifest.exists() else None
    used = {"algo": "rag", "history_k": cfg.history_k, "max_prompt_tokens": cfg.max_prompt_tokens}
    if trained and ALGORITHMS[cfg.algo].adapters and trained != used:
        log.warning("[05_generate] the adapters in %s were trained on prompts %s, this run writes %s: "
                    "pass the same --history-k / --max-prompt-tokens to both stages", plugin, trained, used)
    return plugin


class _Records:
    """Collects a chunk's records in a worker (the driver alone writes files)."""

    def __init__(self):
        self.existing: list[dict] = []
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)


class GenerateJob:
    """Stage 05 on one worker: the model, the algorithm and its users' adapters, loaded once."""

    def __init__(self, cfg: GenerateConfig, source: Path, model=None, tok=None):
        self.cfg, self.source, self.model, self.tok = cfg, source, model, tok
        self.algo = self.adapters = None

    def __getstate__(self) -> dict:  # a worker loads its own model, algorithm and adapters
        return {**self.__dict__, "model": None, "tok": None, "algo": None, "adapters": None}

    def setup(self, users: list[str]) -> None:
        """Load the model, the algorithm (its vectors, checked) and the users' adapters; a
        second call is a no-op (the driver sets a one-worker job up before it writes)."""
        if self.algo is not None:
            return
        cfg = self.cfg
        task = task_of(cfg)
        if self.model is None:
            self.model, self.tok = load_model(cfg.model, cfg.device, cfg.dtype, layers_attr=cfg.layers_attr)
        self.algo = build_algorithm(cfg.algo, _settings(cfg, task, self.model, self.tok))
        self.gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                               temperature=cfg.sampling_temperature, top_p=cfg.top_p, seed=cfg.seed,
                               positions=cfg.positions, **decoding_kwargs(task, self.model, self.tok, cfg.constrained))
        plugin = _plugin_dir(cfg)
        if plugin and any((plugin / u / "adapter_config.json").exists() for u in users):
            self.adapters = UserAdapters(self.model, plugin, users, self.source)

    def run(self, chunk) -> tuple[list[dict], list[str]]:
        """The records of a chunk's samples and its users without steering vectors."""
        records = _Records()
        summary = generate_records(self.model, self.tok, self.algo, chunk.items, records, task=task_of(self.cfg),
                                   algo_name=self.cfg.algo, batch_size=self.cfg.batch_size,
                                   gen_kwargs=self.gen_kwargs, adapters=self.adapters)
        return records.records, summary["users_without_vectors"]

    def close(self) -> None:
        if self.adapters is not None:
            self.adapters.close()  # the base model goes back as it was loaded (sweeps reuse it)
        self.algo = self.adapters = None


def run(cfg: GenerateConfig, model=None, tok=None) -> Path:
    """Generate (or resume) one split with one algorithm; return the output directory.

    Pass a loaded ``(model, tok)`` to reuse it across runs (sweeps, tests; with
    ``--workers 1``).  The records are in split order however they were computed.
    """
    task = task_of(cfg)
    require(cfg, "history_k", "max_new_tokens")
    out = gen_dir(cfg)
    source = stage_dir(cfg.run_dir, "ranked") / f"{cfg.split}.jsonl"
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such split; run scripts.02_rank_history first (or check --split)")
    vectors = [stage_dir(cfg.run_dir, "vectors") / name for name in ALGORITHMS[cfg.algo].vector_files]
    for path in vectors:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no steering vectors for --algo {cfg.algo} (run scripts/04_extract_vectors first)")
    stage = Stage(cfg.STAGE, out, cfg, overwrite=cfg.overwrite, inputs=[source, *vectors], model=cfg.model)
    if not stage.done:
        samples = load_samples(source)
        samples = samples[: cfg.limit] if cfg.limit > 0 else samples
        spec = SteerSpec.build(cfg.layers, cfg.sites, cfg.alpha, cfg.beta, cfg.multipliers) \
            if ALGORITHMS[cfg.algo].steers else None
        plugin = _plugin_dir(cfg)
        users = sorted({s["user_id"] for s in samples})
        for user in users if plugin else []:  # a user id names its adapter folder
            checked_name(user, f"{source} (adapters in --plugin {plugin})")
        no_adapter = [u for u in users if not (plugin / u / "adapter_config.json").exists()] if plugin else []
        if plugin and len(no_adapter) == len(users):
            raise FileNotFoundError(f"--plugin {plugin}: no <user_id>/adapter_config.json for any of "
                                    f"the {len(users)} users of this split")
        job = GenerateJob(absolute_paths(cfg), source, model if cfg.workers == 1 else None, tok)
        if cfg.workers == 1:  # model, layers, vectors and adapters checked before anything is written
            job.setup(users)
            model, tok = job.model, job.tok
        else:  # the workers load the model; here the tokenizer (checks the model directory)
            tok = tok or load_tokenizer(cfg.model)
        prompts_cut = count_cut_inputs(task, samples, tok, cfg.max_prompt_tokens, cfg.STAGE)
        path = stage.start() / "generations.jsonl"  # in out, or out.new for an --overwrite of a previous run
        no_vectors: set[str] = set()
        try:
            with JsonlWriter(path) as writer:
                done = {r["id"] for r in writer.existing}
                already = len(done & {s["id"] for s in samples})
                chunks = user_chunks(samples, lambda s: s["user_id"], cfg.samples_per_chunk)
                todo = [c for c in chunks if any(s["id"] not in done for s in c.items)]
                resumed = len(samples) - sum(len(c.items) for c in todo)
                for _, (records, missing) in run_chunks(job, todo, cfg, desc=f"05 {cfg.algo}", total=len(samples),
                                                        done=resumed):
                    no_vectors.update(missing)
                    for record in records:
                        if record["id"] not in done:
                            writer.write(record)
                            done.add(record["id"])
        finally:
            job.close()  # the adapters come off a model the caller may reuse
        write_in_order(path, [s["id"] for s in samples], "id")
        summary = {"n_samples": len(samples), "n_resumed": already, "n_generated": len(samples) - already,
                   "users_without_vectors": sorted(no_vectors), "prompts_cut": prompts_cut}
        if summary["users_without_vectors"]:
            log.warning("[05_generate] %d user(s) have no steering vectors (no pairs: unseen users, or all their "
                        "tries were dropped); their rows ran as plain RAG: %s",
                        len(summary["users_without_vectors"]), summary["users_without_vectors"])
        if plugin:
            summary["users_without_adapter"] = no_adapter
            if no_adapter:
                log.warning("[05_generate] %d user(s) have no adapter in %s; their rows ran on the base model: %s",
                            len(no_adapter), plugin, no_adapter)
        log.info("[05_generate] %s on %s: %d generated, %d resumed -> %s", cfg.algo, cfg.split,
                 summary["n_generated"], summary["n_resumed"], path)
        name = model_name(model) if model is not None else Path(cfg.model).name
        stage.finish(inputs=[source, *vectors], outputs=[path], model=name, seed=cfg.seed,
                     steering=spec.scales if spec else None, **summary)
    if cfg.eval:
        scores = evaluate_run(out, cfg)
        log.info("[06_evaluate] %s: %s", cfg.algo, scores.get("overall"))
    return out
