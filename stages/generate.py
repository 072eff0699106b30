"""Stage 05: generate answers for a test split with one algorithm.

Writes {run_dir}/generations/{split}/{algo}{tag}/generations.jsonl (resumable) and a
manifest; ``--eval`` scores it right away (stage 06).  ``--algo oppu`` / ``oppu+fints``
run under per-user LoRA adapters ({run_dir}/lora/<user_id>/ from scripts/train_lora, or
``--plugin DIR``); ``--plugin DIR`` with any other algorithm steers on top of DIR's adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from data_process.artifact_io import MANIFEST, JsonlWriter
from data_process.config import stage_dir
from data_process.stage import Stage
from stages.common import DecodingSettings, PromptSettings, load_samples, require, task_of, with_task_defaults
from stages.evaluate import evaluate_run
from stages.workers import WorkersConfig, absolute_paths, run_chunks, unfinished, user_chunks, write_in_order
from steering.aggregate import RETRIEVERS, WEIGHTINGS
from steering.algorithms import ALGORITHMS, AlgoSettings, SteerSpec, build_algorithm
from steering.decoding import decoding_kwargs
from steering.hooks import POSITIONS, SITES
from steering.layers import check_layers, find_layers
from steering.loading import load_model, load_tokenizer, model_name
from steering.runner import AdapterSet, UserAdapters, find_adapters, generate_records
from steering.user_vectors import USER_STRATEGIES
from tasks.base import count_cut_inputs

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig(WorkersConfig, PromptSettings, DecodingSettings):
    """Stage 05 settings (config sections ``prompt``, ``decoding``, then ``generate``); unset
    values come from the task."""

    STAGE = "05_generate"
    SECTIONS = ("prompt", "decoding", "generate")
    # The tag names the output directory; a batch's rows are independent; chunks only set
    # how often results are saved; --eval is what happens after.
    NOT_IN_FINGERPRINT = WorkersConfig.NOT_IN_FINGERPRINT | {"tag", "batch_size", "samples_per_chunk", "eval"}

    algo: str = field(default="fints", metadata={"help": "generation algorithm", "choices": list(ALGORITHMS)})
    split: str = field(default="seen_test",
                       metadata={"name": True, "help": "file name (no .jsonl) in {run_dir}/ranked/"})
    tag: str = field(default="", metadata={"name": True, "help": "suffix of the output directory name, e.g. _L15"})
    layers: list[int] = field(default_factory=lambda: [15],
                              metadata={"min": 0, "non_empty": True, "help": "layers steered"})
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"],
                             metadata={"non_empty": True, "help": "sites steered", "choices": list(SITES)})
    alpha: float = field(default=1.0, metadata={"help": "multiplier of attn (and block) vectors"})
    beta: float = field(default=1.0, metadata={"help": "multiplier of mlp vectors"})
    multipliers: list[float] = field(default_factory=list,
                                     metadata={"help": "one multiplier per layer (overrides alpha/beta)"})
    positions: str = field(default="all", metadata={"help": "tokens that are steered", "choices": list(POSITIONS)})
    vec_strategy: str = field(default="mean", metadata={"help": "steer: the per-user vector",
                                                        "choices": list(USER_STRATEGIES)})
    top_pairs: int = field(default=5, metadata={"min": 1, "help": "fints: pairs retrieved and aggregated per query"})
    pair_weighting: str = field(default="softmax", metadata={"help": "fints: weighting of the retrieved pairs",
                                                             "choices": list(WEIGHTINGS)})
    softmax_temperature: float = field(default=0.1,
                                       metadata={"gt": 0, "help": "fints: softmax temperature of retrieval scores"})
    retriever: str = field(default="bm25", metadata={"help": "fints: pair retrieval", "choices": list(RETRIEVERS)})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "rows per generation batch"})
    samples_per_chunk: int = field(default=64, metadata={
        "min": 1, "help": "samples (of whole users) generated and saved together: "
                          "the unit a worker computes and a resumed run redoes"})
    limit: int = field(default=0, metadata={"min": 0, "help": "only the first N samples of the split (0: all)"})
    plugin: str = field(default="", metadata={"help": "directory of per-user PEFT LoRA adapters <dir>/<user_id>/ "
                                                      "(oppu, oppu+fints: default {run_dir}/lora)"})
    eval: bool = field(default=False, metadata={"help": "run stage 06 on the result"})


def gen_dir(cfg: GenerateConfig) -> Path:
    """{run_dir}/generations/{split}/{algo}{tag}: where a generation run lives."""
    return stage_dir(cfg.run_dir, "generations") / cfg.split / f"{cfg.algo}{cfg.tag}"


def algo_settings(cfg: GenerateConfig, task, model, tok) -> AlgoSettings:
    """The algorithm settings of a 05 config (with the task's defaults filled in) on a loaded model."""
    spec = None
    if ALGORITHMS[cfg.algo].steers:
        check_layers(find_layers(model), cfg.layers)
        spec = SteerSpec.build(cfg.layers, cfg.sites, cfg.alpha, cfg.beta, cfg.multipliers)
    return AlgoSettings(
        task=task, tokenizer=tok, history_k=cfg.history_k, max_prompt_tokens=cfg.max_prompt_tokens, steer=spec,
        vectors_dir=stage_dir(cfg.run_dir, "vectors"), vec_strategy=cfg.vec_strategy, top_pairs=cfg.top_pairs,
        pair_weighting=cfg.pair_weighting, softmax_temperature=cfg.softmax_temperature, retriever=cfg.retriever,
        model=model, hidden_size=model.config.hidden_size)


def _adapters(cfg: GenerateConfig, samples: list[dict], source: Path) -> AdapterSet | None:
    """The adapters this run uses (None: no adapters), checked once against its users."""
    if not cfg.plugin and not ALGORITHMS[cfg.algo].adapters:
        return None
    plugin = Path(cfg.plugin) if cfg.plugin else stage_dir(cfg.run_dir, "lora")
    manifest = plugin / MANIFEST
    if not plugin.is_dir() or not (cfg.plugin or manifest.exists()):
        raise FileNotFoundError(f"{manifest} does not exist: no finished per-user adapters for --algo {cfg.algo} "
                                "(run scripts.train_lora first, or pass --plugin DIR)")
    return find_adapters(plugin, [s["user_id"] for s in samples], source)


class _Records:
    """Collects a chunk's records in a worker (the driver alone writes files)."""

    def __init__(self):
        self.existing: list[dict] = []
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)


class GenerateJob:
    """Stage 05 on one worker: the model, the algorithm and its users' adapters, loaded once."""

    def __init__(self, cfg: GenerateConfig, adapters: AdapterSet | None, model=None, tok=None):
        self.cfg, self.found, self.model, self.tok = cfg, adapters, model, tok
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
        self.algo = build_algorithm(cfg.algo, algo_settings(cfg, task, self.model, self.tok))
        self.gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                               temperature=cfg.sampling_temperature, top_p=cfg.top_p, seed=cfg.seed,
                               positions=cfg.positions, **decoding_kwargs(task, self.model, self.tok, cfg.constrained))
        mine = self.found.only(users) if self.found else None
        if mine and mine.users:
            self.adapters = UserAdapters(self.model, mine)

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
    ``--workers 1``).  The records are in split order however they were computed.  The
    stage's inputs -- the split, the algorithm's vectors and the adapter files of the
    split's users -- are fingerprinted: retraining an adapter makes the run stale.
    """
    cfg = with_task_defaults(cfg)
    require(cfg, "history_k", "max_new_tokens")
    out = gen_dir(cfg)
    source = stage_dir(cfg.run_dir, "ranked") / f"{cfg.split}.jsonl"
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such split; run scripts.02_rank_history first (or check --split)")
    vectors = [stage_dir(cfg.run_dir, "vectors") / name for name in ALGORITHMS[cfg.algo].vector_files]
    for path in vectors:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no steering vectors for --algo {cfg.algo} "
                                    "(run scripts/04_extract_vectors first)")
    samples = load_samples(source)
    samples = samples[: cfg.limit] if cfg.limit > 0 else samples
    adapters = _adapters(cfg, samples, source)
    stage = Stage(cfg.STAGE, out, cfg, overwrite=cfg.overwrite, model=cfg.model,
                  inputs=[source, *vectors, *(adapters.files() if adapters else [])])
    if not stage.done:
        _generate(cfg, stage, samples, adapters, model, tok)
    if cfg.eval:
        scores = evaluate_run(out, cfg)
        log.info("[06_evaluate] %s: %s", cfg.algo, scores.get("overall"))
    return out


def _generate(cfg: GenerateConfig, stage: Stage, samples: list[dict], adapters: AdapterSet | None, model, tok) -> None:
    """Write the split's generations (resuming what a killed run wrote) and the manifest."""
    spec = SteerSpec.build(cfg.layers, cfg.sites, cfg.alpha, cfg.beta, cfg.multipliers) \
        if ALGORITHMS[cfg.algo].steers else None
    job = GenerateJob(absolute_paths(cfg), adapters and replace(adapters, root=adapters.root.resolve()),
                      model if cfg.workers == 1 else None, tok)
    if cfg.workers == 1:  # model, layers, vectors and adapters checked before anything is written
        job.setup(sorted({s["user_id"] for s in samples}))
        model, tok = job.model, job.tok
    else:  # the workers load the model; here the tokenizer (checks the model directory)
        tok = tok or load_tokenizer(cfg.model)
    prompts_cut = count_cut_inputs(task_of(cfg), samples, tok, cfg.max_prompt_tokens, cfg.STAGE)
    path = stage.start() / "generations.jsonl"  # in out, or out.new for an --overwrite of a previous run
    no_vectors: set[str] = set()
    try:
        with JsonlWriter(path) as writer:
            done = {r["id"] for r in writer.existing}
            already = len(done & {s["id"] for s in samples})
            todo = unfinished(user_chunks(samples, lambda s: s["user_id"], cfg.samples_per_chunk), done)
            for _, (records, missing) in run_chunks(job, todo, cfg, desc=f"05 {cfg.algo}", total=len(samples),
                                                    done=len(samples) - sum(len(c.items) for c in todo)):
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
    _report(cfg, summary, adapters, path)
    name = model_name(model) if model is not None else Path(cfg.model).name
    stage.finish(outputs=[path], model=name, seed=cfg.seed, steering=spec.scales if spec else None, **summary)


def _report(cfg: GenerateConfig, summary: dict, adapters: AdapterSet | None, path: Path) -> None:
    """Log the run; users without an adapter join the summary."""
    if summary["users_without_vectors"]:
        log.warning("[05_generate] %d user(s) have no steering vectors (no pairs: unseen users, or all their "
                    "tries were dropped); their rows ran as plain RAG: %s",
                    len(summary["users_without_vectors"]), summary["users_without_vectors"])
    if adapters:
        summary["users_without_adapter"] = adapters.missing
        if adapters.missing:
            log.warning("[05_generate] %d user(s) have no adapter in %s; their rows ran on the base model: %s",
                        len(adapters.missing), adapters.root, adapters.missing)
    log.info("[05_generate] %s on %s: %d generated, %d resumed -> %s", cfg.algo, cfg.split,
             summary["n_generated"], summary["n_resumed"], path)
