"""Stage 05: :class:`GenerateConfig` and :func:`run_generation`, which runs an algorithm
over a test split and appends generation records.

Records are written batch by batch (so a killed run resumes where it stopped), batches
are length-sorted and mix users and queries with one steering row each.  With per-user
LoRA adapters (``--plugin``), rows are grouped by user instead: see :class:`UserAdapters`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_process.artifacts import JsonlWriter, Stage, read_jsonl
from data_process.config import CommonConfig, choose, stage_dir
from data_process.schema import validate_sample
from steering.algorithms import ZeroShot

log = logging.getLogger(__name__)

TASK_FORM = {"lamp4": "raw", "longlamp": "raw", "pwab": "raw"}  # pwab: the call is parsed by postprocess
TASK_MAX_NEW_TOKENS = {"lamp4": 32, "longlamp": 256, "pwab": 128}
PWAB_FIELDS = ("type", "target", "timestamp")


class UserAdapters:
    """Per-user PEFT LoRA adapters, ``plugin_dir/<user_id>/``, on top of a frozen model.

    Why group rows by user instead of one mixed batch with ``adapter_names=``: the shared
    generation utility (and its steering hooks) takes plain ``generate`` kwargs, and
    grouping keeps every row's computation identical to running that user alone.  Steering
    hooks sit on the decoder layers' attention/MLP outputs, which LoRA leaves in place, so
    steering applies on top of the adapter.  Users without an adapter run the base model.
    """

    def __init__(self, model, plugin_dir: str | Path, user_ids: list[str]):
        from peft import PeftModel

        root = Path(plugin_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--plugin {root}: no such directory")
        found = [u for u in sorted(set(user_ids)) if (root / u / "adapter_config.json").exists()]
        if not found:
            raise FileNotFoundError(f"--plugin {root}: no <user_id>/adapter_config.json for any of "
                                    f"the {len(set(user_ids))} users of this split")
        # Adapter names become module keys, so they must be plain identifiers.
        self.names = {u: f"user_{i}" for i, u in enumerate(found)}
        self.model = PeftModel.from_pretrained(model, root / found[0], adapter_name=self.names[found[0]])
        for user in found[1:]:
            self.model.load_adapter(root / user, adapter_name=self.names[user])
        self.model.eval()
        self.model.requires_grad_(False)
        self.missing = sorted(set(user_ids) - set(found))

    def close(self) -> None:
        """Take the LoRA layers out again, leaving the base model as it was loaded."""
        self.model.unload()

    @contextmanager
    def active(self, user_id: str) -> Iterator[None]:
        """Run the body with ``user_id``'s adapter (or no adapter when the user has none)."""
        if user_id in self.names:
            self.model.set_adapter(self.names[user_id])
            yield
        else:
            with self.model.disable_adapter():
                yield


def _record(task: str, algo: str, sample: dict, message: str, generation: str) -> dict[str, Any]:
    record = {"id": sample["id"], "user_id": sample["user_id"], "algo": algo, "prompt": message,
              "generation": generation, "gold": sample["output"]}
    if task == "pwab":
        record.update({k: sample.get(k) for k in PWAB_FIELDS})
    return record


def _groups(samples: list[dict], messages: list[str], by_user: bool, batch_size: int) -> list[list[int]]:
    """Index batches: length-sorted across users, or per user when adapters differ."""
    order = sorted(range(len(samples)), key=lambda i: (-len(messages[i]), samples[i]["id"]))
    if not by_user:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_user: dict[str, list[int]] = {}
    for i in order:
        per_user.setdefault(samples[i]["user_id"], []).append(i)
    return [rows[j:j + batch_size] for rows in per_user.values() for j in range(0, len(rows), batch_size)]


def generate_records(model, tok, algo: ZeroShot, samples: list[dict], writer: JsonlWriter, *,
                     task: str, algo_name: str, batch_size: int, gen_kwargs: dict[str, Any],
                     adapters: UserAdapters | None = None) -> dict[str, Any]:
    """Generate every sample not yet in ``writer`` and append its record; return a summary.

    ``gen_kwargs`` go to :func:`collect.generation.generate` (max_new_tokens, do_sample,
    temperature, top_p, seed, positions); the output form follows the task.
    """
    from collect.generation import generate
    from data_process.prompts import postprocess

    done = {r["id"] for r in writer.existing}
    pending = [s for s in samples if s["id"] not in done]
    prepared = algo(pending) if pending else None
    missing = sorted(prepared.missing_users) if prepared else []
    if pending:
        batches = _groups(pending, prepared.messages, adapters is not None, batch_size)
        # The LoRA layers live inside the wrapped model; calling it directly keeps the
        # steering hooks' per-call pre-hook on the module that actually runs forward.
        run_model = adapters.model.get_base_model() if adapters else model
        for rows in tqdm(batches, desc=f"05 {algo_name}", unit="batch"):
            index = torch.tensor(rows, dtype=torch.long)
            deltas = {k: v[index] for k, v in prepared.deltas.items()} if prepared.deltas else None
            scope = adapters.active(pending[rows[0]]["user_id"]) if adapters else nullcontext()
            with scope:
                texts = generate(run_model, tok, [prepared.messages[i] for i in rows],
                                 batch_size=batch_size, form=TASK_FORM.get(task, "raw"),
                                 deltas=deltas, desc=algo_name, **gen_kwargs)
            for i, text in zip(rows, texts):
                writer.write(_record(task, algo_name, pending[i], prepared.messages[i],
                                     postprocess(task, text)))
    return {"n_samples": len(samples), "n_resumed": len(samples) - len(pending),
            "n_generated": len(pending), "users_without_vectors": missing}


@dataclass
class GenerateConfig(CommonConfig):
    algo: str = field(default="fints", metadata={"help": "zeroshot | rag | steer | fints"})
    split: str = field(default="seen_test", metadata={"help": "file name (no .jsonl) in {run_dir}/ranked/"})
    tag: str = field(default="", metadata={"help": "suffix of the output directory name, e.g. _L15"})
    k: int = field(default=-1, metadata={"help": "history items in the prompt (-1: task default, LaMP-4 5, abstracts 3)"})
    max_prompt_tokens: int = field(default=0, metadata={"help": "prompt budget in tokens (0: builder default)"})
    layers: list[int] = field(default_factory=lambda: [15], metadata={"help": "layers steered"})
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"], metadata={"help": "attn | mlp | block"})
    alpha: float = field(default=1.0, metadata={"help": "multiplier of attn (and block) vectors"})
    beta: float = field(default=1.0, metadata={"help": "multiplier of mlp vectors"})
    multipliers: list[float] = field(default_factory=list, metadata={"help": "one multiplier per layer (overrides alpha/beta)"})
    positions: str = field(default="all", metadata={"help": "all | prompt | response"})
    vec_strategy: str = field(default="mean", metadata={"help": "steer: per-user vector mean | pca | logistic"})
    top_k: int = field(default=5, metadata={"help": "fints: pairs aggregated per query"})
    weight_steer: str = field(default="softmax", metadata={"help": "fints: softmax | mean weighting of pairs"})
    temperature: float = field(default=0.1, metadata={"help": "fints: softmax temperature of retrieval scores"})
    retriever: str = field(default="bm25", metadata={"help": "fints: bm25 | dense pair retrieval"})
    max_new_tokens: int = field(default=0, metadata={"help": "0: task default (LaMP-4 32, abstracts 256, pwab 128)"})
    batch_size: int = field(default=8, metadata={"help": "rows per generation batch"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    sample_temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --do-sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (with --do-sample)"})
    limit: int = field(default=0, metadata={"help": "only the first N samples of the split (0: all)"})
    plugin: str = field(default="", metadata={"help": "directory of per-user PEFT LoRA adapters <dir>/<user_id>/"})
    eval: bool = field(default=False, metadata={"help": "run stage 06 on the result"})


def gen_dir(cfg) -> Path:
    """{run_dir}/generations/{split}/{algo}{tag}: where a generation run lives."""
    return stage_dir(cfg.run_dir, "generations") / cfg.split / f"{cfg.algo}{cfg.tag}"


def _settings(cfg: GenerateConfig, model, tok, steers: bool):
    from steering.algorithms import AlgoSettings, SteerSpec
    from steering.model import check_layers, find_layers

    spec = None
    if steers:
        check_layers(find_layers(model), cfg.layers)
        spec = SteerSpec.build(cfg.layers, cfg.sites, cfg.alpha, cfg.beta, cfg.multipliers)
    return AlgoSettings(
        task=cfg.task, tokenizer=tok, k=cfg.k, max_prompt_tokens=cfg.max_prompt_tokens, steer=spec,
        vectors_dir=stage_dir(cfg.run_dir, "vectors"), vec_strategy=cfg.vec_strategy, top_k=cfg.top_k,
        weighting=cfg.weight_steer, temperature=cfg.temperature, retriever=cfg.retriever,
        model=model, hidden_size=model.config.hidden_size)


def run_generation(cfg: GenerateConfig, model=None, tok=None) -> Path:
    """Generate (or resume) one split with one algorithm; return the output directory.

    Pass a loaded ``(model, tok)`` to reuse it across runs (sweeps, tests).
    """
    from steering.algorithms import ALGORITHMS, build_algorithm
    from steering.model import load_model, model_name

    algo_cls = choose("algorithm", cfg.algo, ALGORITHMS)
    out = gen_dir(cfg)
    stage = Stage("05_generate", out, cfg, overwrite=cfg.overwrite)
    if not stage.done:
        source = stage_dir(cfg.run_dir, "ranked") / f"{cfg.split}.jsonl"
        samples = [validate_sample(r, f"{source}:{i + 1}") for i, r in enumerate(read_jsonl(source))]
        samples = samples[: cfg.limit] if cfg.limit > 0 else samples
        if model is None:
            model, tok = load_model(cfg.model, cfg.device, cfg.dtype)
        settings = _settings(cfg, model, tok, algo_cls.steers)
        algo = build_algorithm(cfg.algo, settings)
        gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens or TASK_MAX_NEW_TOKENS.get(cfg.task, 32),
                          do_sample=cfg.do_sample, temperature=cfg.sample_temperature, top_p=cfg.top_p,
                          seed=cfg.seed, positions=cfg.positions)
        adapters = UserAdapters(model, cfg.plugin, [s["user_id"] for s in samples]) if cfg.plugin else None
        try:
            with JsonlWriter(out / "generations.jsonl") as writer:
                summary = generate_records(model, tok, algo, samples, writer, task=cfg.task, algo_name=cfg.algo,
                                           batch_size=cfg.batch_size, gen_kwargs=gen_kwargs, adapters=adapters)
        finally:
            if adapters is not None:
                adapters.close()
        if summary["users_without_vectors"]:
            print(f"[05_generate] {len(summary['users_without_vectors'])} user(s) have no steering vectors "
                  f"(no pairs: unseen users, or all their tries were dropped); their rows ran as plain RAG: "
                  f"{summary['users_without_vectors']}")
        if adapters is not None:
            summary["users_without_adapter"] = adapters.missing
        print(f"[05_generate] {cfg.algo} on {cfg.split}: {summary['n_generated']} generated, "
              f"{summary['n_resumed']} resumed -> {out / 'generations.jsonl'}")
        stage.finish(inputs=[source], outputs=[out / "generations.jsonl"], model=model_name(model), seed=cfg.seed,
                     steering=settings.steer.scales if settings.steer else None, **summary)
    if cfg.eval:
        from eval.report import evaluate_run

        scores = evaluate_run(out, task=cfg.task, config=asdict(cfg), data_dir=cfg.data_dir)
        print(f"[06_evaluate] {cfg.algo}: {scores.get('overall')}")
    return out
