"""The seeded synthetic PersonalWAB benchmark (tests/fixtures/pwab_synth/make_fixture.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_process.config import parse_config
from eval import report
from tasks.pwab_data import load_pwab
from tests.conftest import ROOT, fixture_generator


def _generator():
    return fixture_generator("pwab_synth")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("pwab_synth")
    sizes = _generator().make_fixture(out, seed=0)
    return out, sizes


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_data(synth, tmp_path):
    out, _ = synth
    _generator().make_fixture(tmp_path / "again", seed=0)
    _generator().make_fixture(tmp_path / "other", seed=1)
    names = ("all_products_part_1.json", "user_history_part_1.json", "user_instructions.json", "user_profiles.json")
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (out / "user_instructions.json").read_bytes() != (tmp_path / "other" / "user_instructions.json").read_bytes()


def test_the_benchmark_is_large_enough_to_measure_and_loads_cleanly(synth):
    out, sizes = synth
    assert sizes["users"] >= 40 and sizes["products"] >= 300 and sizes["train_tasks"] + sizes["test_tasks"] >= 400
    products = json.loads((out / "all_products_part_1.json").read_text())
    assert len({p["main_category"] for p in products.values()}) >= 4
    bench = load_pwab(out)
    assert not bench.errors
    assert Counter(s["type"] for s in bench.test) == {"search": 48, "recommend": 48, "review": 48}
    assert all(isinstance(s["timestamp"], int) and s["history"] for s in bench.train + bench.test)
    for s in bench.test:  # a test target never leaks into any history
        target = f"{s['target']['product_info']['parent_asin']}@{s['timestamp']}"
        assert all(h["id"] != target for h in s["history"])


def test_histories_show_consistent_personal_preferences(synth):
    out, _ = synth
    history = json.loads((out / "user_history_part_1.json").read_text())
    for behaviours in history.values():
        categories = Counter(b["product_info"]["main_category"] for b in behaviours)
        assert categories.most_common(1)[0][1] / len(behaviours) >= 0.5  # one main category
        stores = Counter(b["product_info"]["store"] for b in behaviours)
        assert stores.most_common(1)[0][1] >= 4  # a preferred brand
        endings = Counter(" ".join(b["review"]["text"].split()[-2:]) for b in behaviours)
        assert len(endings) == 1  # the user's closing line and signature end every review


def test_the_pwab_config_points_at_the_synthetic_benchmark():
    from stages.generate import GenerateConfig

    cfg = parse_config(GenerateConfig, ["--config", str(ROOT / "configs" / "pwab.json")])
    assert cfg.data_dir == "data/pwab_synth" and cfg.task == "pwab"


def test_per_type_intervals_compare_only_the_samples_of_that_type():
    def scores(values):
        return {"per_sample": [{"id": str(i), "user_id": f"u{i}", "type": t, "facc": v}
                               for i, (t, v) in enumerate(values)]}

    base = scores([("search", 0.0), ("search", 0.0), ("review", 1.0)])
    better = scores([("search", 1.0), ("search", 1.0), ("review", 1.0)])
    out = report.intervals_vs({"rag": base, "fints": better}, "rag", ["facc", "facc_search", "facc_review"], n_boot=200)
    assert out["fints"]["facc_search"]["diff"] == 1.0 and out["fints"]["facc_search"]["n"] == 2
    assert out["fints"]["facc_review"]["diff"] == 0.0 and abs(out["fints"]["facc"]["diff"] - 2 / 3) < 1e-9
    table = report.interval_table(out, ["facc", "facc_search"])
    assert "| fints | +0.6667 [" in table and "+1.0000 [+1.0000, +1.0000] *" in table
