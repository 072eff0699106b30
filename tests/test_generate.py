"""Stage 05 building blocks: algorithm prompts and deltas, steering multipliers, records."""

from __future__ import annotations

import pytest
import torch

import steering.runner
from data_process.artifact_io import JsonlWriter, read_jsonl
from steering.algorithms import AlgoSettings, Prepared, SteerSpec, ZeroShot, build_algorithm
from steering.runner import generate_records
from tasks import get_task

LAMP4, PWAB = get_task("lamp4"), get_task("pwab")

HISTORY = [{"id": f"h{i}", "input": f"Generate a headline for the following article: article {i}",
            "output": f"headline number {i}"} for i in range(4)]
SAMPLE = {"id": "s1", "user_id": "u1", "input": "Generate a headline for the following article: new text",
          "output": "gold headline", "history": HISTORY}


def test_zeroshot_prompt_has_no_history_and_rag_has_the_top_k_items_in_ranked_order():
    zero = build_algorithm("zeroshot", AlgoSettings(task=LAMP4))([SAMPLE])
    rag = build_algorithm("rag", AlgoSettings(task=LAMP4, history_k=2))([SAMPLE])
    assert "headline number" not in zero.messages[0] and zero.deltas is None
    message = rag.messages[0]
    assert message.index("headline number 0") < message.index("headline number 1")
    assert "headline number 2" not in message and message.endswith(zero.messages[0])


def test_rag_uses_the_task_default_number_of_history_items_unless_the_config_sets_one():
    from stages.common import task_of, with_task_defaults
    from stages.generate import GenerateConfig

    given = GenerateConfig(task="lamp4")
    assert task_of(given) is LAMP4 and with_task_defaults(given).history_k == 5
    assert given.history_k is None and task_of(given) is LAMP4  # looking the task up changes nothing
    assert with_task_defaults(GenerateConfig(task="longlamp")).history_k == 3
    assert with_task_defaults(GenerateConfig(task="lamp4", history_k=0)).history_k == 0


def test_alpha_scales_attention_and_beta_scales_mlp_sites():
    spec = SteerSpec.build([3, 7], ["attn", "mlp"], alpha=0.5, beta=2.0)
    assert spec.scales == {"attn.3": 0.5, "mlp.3": 2.0, "attn.7": 0.5, "mlp.7": 2.0}


def test_multipliers_give_one_scale_per_layer_and_must_match_the_layers():
    spec = SteerSpec.build([3, 7], ["attn", "mlp"], alpha=9, beta=9, multipliers=[1.0, 4.0])
    assert spec.scales == {"attn.3": 1.0, "mlp.3": 1.0, "attn.7": 4.0, "mlp.7": 4.0}
    with pytest.raises(ValueError, match="one per layer"):
        SteerSpec.build([3, 7], ["attn"], multipliers=[1.0])
    with pytest.raises(ValueError, match="unknown steering site"):
        SteerSpec.build([3], ["atn"])


def test_an_unknown_algorithm_names_the_closest_one():
    with pytest.raises(ValueError, match="Did you mean 'steer'"):
        build_algorithm("stear", AlgoSettings(task=LAMP4))


def test_steering_algorithms_without_vectors_say_to_run_stage_04(tmp_path):
    spec = SteerSpec.build([1], ["attn"])
    for name in ("steer", "fints"):
        with pytest.raises(FileNotFoundError, match="04_extract_vectors"):
            build_algorithm(name, AlgoSettings(task=LAMP4, steer=spec, vectors_dir=tmp_path))


class RowSteer(ZeroShot):
    """One distinct delta per row (row i gets i * unit), to check rows travel with samples."""

    def __call__(self, samples: list[dict]) -> Prepared:
        prepared = super().__call__(samples)
        rows = torch.tensor([[float(s["id"][1:])] * 4 for s in samples])
        prepared.deltas = {"attn.0": rows}
        return prepared


def test_records_carry_their_own_delta_row_and_cleaned_answer(tmp_path, monkeypatch):
    seen = []

    def fake_batches(model, tok, messages, *, deltas, batch_size, **kwargs):
        for start in range(0, len(messages), batch_size):
            rows = list(range(start, min(start + batch_size, len(messages))))
            seen.append(([messages[i] for i in rows], deltas["attn.0"][rows, 0].tolist()))
            yield rows, [f"Headline: answer to {messages[i].split(': ')[-1].split(chr(10))[0]}\nextra line"
                         for i in rows]

    monkeypatch.setattr(steering.runner, "generate_batches", fake_batches)
    samples = [{**SAMPLE, "id": f"s{i}", "user_id": f"u{i % 2}", "input": "x: " + "w" * i} for i in range(1, 6)]
    with JsonlWriter(tmp_path / "g.jsonl") as writer:
        summary = generate_records(None, None, RowSteer(AlgoSettings(task=LAMP4)), samples, writer, task=LAMP4,
                                   algo_name="fints", batch_size=2, gen_kwargs={"max_new_tokens": 4})
    for messages, rows in seen:  # every message carries its own sample's delta row
        assert [float(len(m.split(": ")[-1].split("\n")[0])) for m in messages] == rows
    records = {r["id"]: r for r in read_jsonl(tmp_path / "g.jsonl")}
    assert sorted(records) == [f"s{i}" for i in range(1, 6)]
    assert records["s3"]["generation"] == "answer to www" and records["s3"]["gold"] == "gold headline"
    assert set(records["s3"]) == {"id", "user_id", "algo", "prompt", "generation", "gold"}
    assert summary["n_generated"] == 5 and summary["n_resumed"] == 0


def test_pwab_records_keep_type_target_and_timestamp(tmp_path, monkeypatch):
    monkeypatch.setattr(steering.runner, "generate_batches",
                        lambda model, tok, messages, **kw: iter([(list(range(len(messages))),
                                                                  ['{"name": "search"}'] * len(messages))]))
    monkeypatch.setattr(type(PWAB), "prompt", lambda self, sample, history, **kw: "ask")
    sample = {**SAMPLE, "type": "search", "target": {"query": "red shoes"}, "timestamp": 17}
    with JsonlWriter(tmp_path / "g.jsonl") as writer:
        generate_records(None, None, ZeroShot(AlgoSettings(task=PWAB)), [sample], writer, task=PWAB,
                         algo_name="zeroshot", batch_size=2, gen_kwargs={"max_new_tokens": 4})
    (record,) = read_jsonl(tmp_path / "g.jsonl")
    assert record["type"] == "search" and record["target"] == {"query": "red shoes"} and record["timestamp"] == 17
    assert record["generation"] == '{"name": "search"}'


def test_fints_retrieves_pairs_with_the_task_query_text_not_the_instruction(tmp_path, monkeypatch):
    from steering.aggregate import PairAggregator
    from steering.vectors import save_vectors

    index = [{"pair_id": "p0", "user_id": "u1", "sample_id": "h0", "prompt": "p", "query": "article 0"}]
    save_vectors(tmp_path, {"attn.1": torch.ones(1, 4)}, index, {"model": "m", "hidden_size": 4})
    asked = []
    real = PairAggregator.vectors
    monkeypatch.setattr(PairAggregator, "vectors", lambda self, users, queries: asked.append(queries)
                        or real(self, users, queries))
    fints = build_algorithm("fints", AlgoSettings(task=LAMP4, steer=SteerSpec.build([1], ["attn"]),
                                                  vectors_dir=tmp_path, hidden_size=4))
    prepared = fints([SAMPLE])
    assert asked == [["new text"]]
    torch.testing.assert_close(prepared.deltas["attn.1"], torch.ones(1, 4))
