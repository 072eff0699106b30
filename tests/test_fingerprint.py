"""Fingerprints: a stage reuses its outputs only for the same settings, inputs and model."""

from __future__ import annotations

import json

import pytest

from data_process.artifact_io import read_json, read_jsonl
from data_process.fingerprint import FINGERPRINT, model_identity
from data_process.stage import Stage
from stages.generate import GenerateConfig
from stages.generate import run as run_generate
from tests.conftest import run_stage
from tests.test_pipeline import write_config, write_fixture


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    """Stages 01-04 done on the tiny model; returns (config path, run dir)."""
    root = tmp_path_factory.mktemp("fingerprint")
    config = write_config(root / "config.json", root / "run", write_fixture(root / "raw"), tiny_llama_dir)
    for name in ("select_users", "rank_history", "collect_pairs", "extract_vectors"):
        run_stage(name, ["--config", str(config)])
    return config, root / "run"


def generate(config, *flags: str):
    from data_process.config import parse_config

    return run_generate(parse_config(GenerateConfig, ["--config", str(config), *flags]))


def test_same_settings_skip_and_other_settings_are_refused_naming_the_field(tmp_path):
    first = Stage("demo", tmp_path / "out", {"alpha": 1.0, "layers": [15]})
    first.finish(outputs=[])
    assert Stage("demo", tmp_path / "out", {"alpha": 1.0, "layers": [15]}).done
    with pytest.raises(ValueError, match=r"other settings: alpha \(1.0 -> 2.0\)\. Pass --overwrite") as err:
        Stage("demo", tmp_path / "out", {"alpha": 2.0, "layers": [15]})
    assert "layers" not in str(err.value) and "\n" not in str(err.value)
    assert not Stage("demo", tmp_path / "out", {"alpha": 2.0, "layers": [15]}, overwrite=True).done


def test_a_changed_input_makes_the_stage_stale(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"a": 1}\n')
    Stage("demo", tmp_path / "out", {}, inputs=[source]).finish(outputs=[])
    source.write_text('{"a": 2}\n')
    with pytest.raises(ValueError, match=r"is stale: its inputs changed since it ran: .*in.jsonl"):
        Stage("demo", tmp_path / "out", {}, inputs=[source])


def test_model_identity_hashes_config_and_weight_headers(tiny_llama_dir, tmp_path):
    ident = model_identity(tiny_llama_dir)
    assert ident["name"] == tiny_llama_dir.name and len(ident["sha256"]) == 64
    other = tmp_path / tiny_llama_dir.name
    other.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert model_identity(other)["sha256"] != ident["sha256"]


def test_rerunning_05_with_another_alpha_on_the_same_tag_is_refused(run):
    config, _ = run
    out = generate(config, "--algo", "fints", "--tag", "_fp")
    before = (out / "generations.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"alpha \(1.0 -> 2.0\)"):
        generate(config, "--algo", "fints", "--tag", "_fp", "--alpha", "2")
    assert (out / "generations.jsonl").read_bytes() == before
    # Settings that do not change the outputs do not count.
    assert generate(config, "--algo", "fints", "--tag", "_fp", "--batch-size", "1") == out
    fp = read_json(out / "manifest.json")["fingerprint"]
    assert "alpha" in fp["settings"] and "batch_size" not in fp["settings"] and "tag" not in fp["settings"]
    assert fp["model"]["name"] and any(p.endswith("vectors.safetensors") for p in fp["inputs"])


def test_a_killed_05_resumed_with_other_settings_is_refused(run, monkeypatch):
    import steering.runner

    config, _ = run
    real = steering.runner.generate_batches

    calls = []

    def dies_in_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(steering.runner, "generate_batches", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):  # chunks of 2 samples: the first one is written
        generate(config, "--algo", "fints", "--tag", "_kill", "--batch-size", "2", "--samples-per-chunk", "2")
    out = run[1] / "generations" / "seen_test" / "fints_kill"
    assert (out / FINGERPRINT).exists() and not (out / "manifest.json").exists()
    partial = (out / "generations.jsonl").read_bytes()
    monkeypatch.setattr(steering.runner, "generate_batches", real)
    with pytest.raises(ValueError, match=r"partial run with other settings: top_pairs \(5 -> 2\)"):
        generate(config, "--algo", "fints", "--tag", "_kill", "--top-pairs", "2")
    assert (out / "generations.jsonl").read_bytes() == partial  # nothing mixed in
    generate(config, "--algo", "fints", "--tag", "_kill")  # same settings: resumes
    assert read_json(out / "manifest.json")["n_resumed"] == 2


def test_changing_03s_threshold_marks_04_and_05_stale(run):
    config, run_dir = run
    out = generate(config, "--algo", "steer", "--tag", "_stale", "--eval")
    with pytest.raises(ValueError, match=r"threshold \(0.5 -> 0.0\)"):
        run_stage("collect_pairs", ["--config", str(config), "--threshold", "0"])
    pairs = run_dir / "pairs" / "pairs.jsonl"
    assert read_jsonl(pairs)
    run_stage("collect_pairs", ["--config", str(config), "--threshold", "0", "--overwrite"])
    assert read_jsonl(pairs) == []  # no try is below ROUGE-L 0: the pairs really changed
    with pytest.raises(ValueError, match=r"04_extract_vectors.*is stale: .*pairs.jsonl"):
        run_stage("extract_vectors", ["--config", str(config)])
    with pytest.raises(ValueError, match=r"05_generate.*is stale: .*pairs.jsonl \(upstream of .*user_vectors"):
        generate(config, "--algo", "steer", "--tag", "_stale")
    # Redone, 04 writes new vectors; 05 is then stale through its own input.
    run_stage("extract_vectors", ["--config", str(config), "--overwrite"])
    with pytest.raises(ValueError, match=r"is stale: its inputs changed since it ran: .*user_vectors.safetensors"):
        generate(config, "--algo", "steer", "--tag", "_stale")
    assert read_json(out / "eval" / "scores.json")["n"] > 0
