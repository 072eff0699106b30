"""PersonalWAB scores: FACC, RACC per type (rank formula, review cosine), parse failures."""

from __future__ import annotations

import pytest
import torch

import data_process.dense
from eval.pwab_eval import evaluate_pwab, rank_score, review_similarity
from eval.pwab_tools import ToolCall, format_tool_call
from eval.sasrec import save_sasrec
from tasks.pwab import TASK
from tasks.pwab_data import load_pwab, user_sequences
from tests.conftest import FIXTURES, ROOT
from train.sasrec import train_sasrec

PWAB = FIXTURES / "pwab"
ENCODER_DIR = ROOT / "models" / "all-minilm-l6-v2"


class FakeEncoder:
    """Unit vectors chosen by hand, so cosines are known exactly."""

    VECTORS = {"great": [1.0, 0.0], "good": [0.6, 0.8], "awful": [0.0, 1.0]}

    def encode(self, texts):
        return torch.tensor([self.VECTORS.get(t, [0.0, 1.0]) for t in texts])


class FakeEnv:
    def __init__(self, results):
        self.results, self.calls = results, []

    def run(self, call):
        self.calls.append(call)
        key = call.arguments.get("query") or ",".join(call.arguments.get("product_sequence", []))
        return self.results[key]


def call(name, **arguments):
    return format_tool_call(ToolCall(name, arguments))


def record(i, user, kind, generation, target_asin="T", review="great"):
    return {"id": f"s{i}", "user_id": user, "algo": "rag", "prompt": "p", "generation": generation,
            "gold": "", "type": kind,
            "target": {"product_info": {"parent_asin": target_asin}, "review": {"text": review}}}


def test_rank_score_is_one_minus_rank_over_length():
    assert rank_score(["T", "a", "b", "c"], "T") == 1.0
    assert rank_score(["a", "T", "b", "c"], "T") == 0.75
    assert rank_score(["a"] * 9 + ["T"], "T") == pytest.approx(0.1)
    assert rank_score(["a", "b"], "T") == 0.0 and rank_score([], "T") == 0.0


def test_function_and_result_accuracy_per_type_and_user():
    records = [
        record(1, "u1", "search", call("search_product_by_query", query="q1")),       # T at rank 1 of 4
        record(2, "u1", "search", call("add_product_review", review="great")),        # wrong function
        record(3, "u2", "recommend", call("get_recommendations_by_history", product_sequence=["a"])),
        record(4, "u2", "recommend", "```json\n" + call("get_recommendations_by_history",
                                                         product_sequence=["b"]) + "\n```"),
        record(5, "u1", "review", call("add_product_review", review="good")),         # cosine 0.6
        record(6, "u2", "review", '{"name": "add_product_review", "arguments": {"review": 5}}'),
    ]
    env = FakeEnv({"q1": ["X", "T", "Y", "Z"], "a": ["X"] * 10, "b": ["T"] + ["X"] * 9})
    scores = evaluate_pwab(records, PWAB, "unused", env=env, encoder=FakeEncoder())
    o = scores["overall"]
    assert o["n"] == 6 and o["facc"] == pytest.approx(4 / 6) and o["racc"] == pytest.approx(2.35 / 6)
    assert (o["facc_search"], o["racc_search"]) == pytest.approx((0.5, 0.375))
    assert (o["facc_recommend"], o["racc_recommend"]) == pytest.approx((1.0, 0.5))
    assert (o["facc_review"], o["racc_review"]) == pytest.approx((0.5, 0.3))
    assert scores["per_user"]["u1"]["racc"] == pytest.approx(1.35 / 3)
    assert scores["per_user"]["u2"]["facc_review"] == 0.0
    assert scores["parse_failures"] == {"total": 1, "wrong_argument_type": 1}
    assert len(env.calls) == 3  # a wrong function is never executed
    assert [r["racc"] for r in scores["per_sample"]] == pytest.approx([0.75, 0, 0, 1, 0.6, 0])


def test_a_record_without_type_uses_the_gold_function_and_one_without_target_fails():
    r = record(1, "u1", None, call("search_product_by_query", query="q1"))
    r["gold"] = call("search_product_by_query", query="anything")
    scores = evaluate_pwab([r], PWAB, "unused", env=FakeEnv({"q1": ["T"]}), encoder=FakeEncoder())
    assert scores["overall"]["racc_search"] == 1.0
    del r["target"]
    with pytest.raises(ValueError, match=r"record 0 \(id 's1'\): field 'target'"):
        evaluate_pwab([r], PWAB, "unused", env=FakeEnv({}), encoder=FakeEncoder())


def test_an_empty_review_scores_zero():
    assert review_similarity(FakeEncoder(), ["great", "  "], ["great", "great"]) == [1.0, 0.0]


def test_gold_calls_score_perfectly_in_the_real_environment(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest
    try:
        model, items, _ = train_sasrec(list(user_sequences(PWAB).values()), epochs=2, hidden=8, blocks=1,
                                       heads=1, max_len=8)
    finally:
        torch.set_num_threads(threads)
    env_dir = tmp_path / "pwab_env"  # where a run keeps the environment: {run_dir}/pwab_env
    save_sasrec(model, items, env_dir / "sasrec")
    bench = load_pwab(PWAB)
    records = [{**s, "generation": s["output"], "gold": s["output"], "algo": "gold"} for s in bench.test]
    scores = evaluate_pwab(records, PWAB, env_dir, encoder=FakeEncoder())
    o = scores["overall"]
    assert o["facc"] == 1.0 and o["racc_search"] == 1.0 and o["racc_review"] == 1.0  # same text, same vector
    assert 0.0 <= o["racc_recommend"] <= 1.0 and scores["parse_failures"] == {"total": 0}
    assert (env_dir / "search_index" / "meta.json").exists()
    # The task scores a run with the environment of its run directory (and the shared encoder).
    monkeypatch.setattr(data_process.dense, "shared_encoder", FakeEncoder)
    assert TASK.evaluate(records, data_dir=str(PWAB), run_dir=tmp_path) == {"n": len(records), **scores}


@pytest.mark.real_model
@pytest.mark.skipif(not (ENCODER_DIR / "config.json").exists(), reason="models/all-minilm-l6-v2 not built")
def test_review_similarity_uses_mean_pooled_minilm_cosines():
    from data_process.dense import shared_encoder

    gold = "Heavy skillet that sears steak beautifully."
    sims = review_similarity(shared_encoder(), [gold, "This cast iron pan sears meat really well.",
                                                "My dog loves this rubber chew toy."], [gold] * 3)
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] > 0.51 > sims[2]
