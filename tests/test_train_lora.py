"""Per-user LoRA training (OPPU) and the oppu / oppu+fints rows, on the tiny Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stages.train_lora as train_lora
from data_process.artifact_io import read_json, read_jsonl
from tests.conftest import as_if_written_by_its_stage, run_stage
from tests.test_pipeline import generate, generations, write_config, write_fixture

pytest.importorskip("peft")
# The tiny model's answers only move with a learning rate far above OPPU's 1e-4.
FAST = ["--lr", "0.05", "--epochs", "2", "--rank", "4"]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    """A run directory with stages 01-04 and train_lora done; returns (config, run dir)."""
    root = tmp_path_factory.mktemp("lora_run")
    config = write_config(root / "config.json", root / "run", write_fixture(root / "raw"), tiny_llama_dir)
    settings = json.loads(config.read_text())
    settings["train_lora"] = {"history_k": 2, "max_prompt_tokens": 256}  # the prompts 05 writes (--prompt rag)
    config.write_text(json.dumps(settings))
    for name in ("select_users", "rank_history", "collect_pairs", "extract_vectors"):
        run_stage(name, ["--config", str(config)])
    run_stage("train_lora", ["--config", str(config), *FAST])
    return config, root / "run"


def users(run_dir: Path, split: str = "train") -> list[str]:
    return sorted({s["user_id"] for s in read_jsonl(run_dir / "ranked" / f"{split}.jsonl")})


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / WEIGHTS)


def test_every_seen_user_gets_a_peft_adapter_and_training_lowers_its_loss(run):
    _, run_dir = run
    manifest = read_json(run_dir / "lora" / "manifest.json")
    assert sorted(manifest["users"]) == users(run_dir)
    for user, row in manifest["users"].items():
        assert row["loss_after"] < row["loss_before"], user
        assert row["seconds"] > 0 and len(row["epoch_losses"]) == 2
        assert row["steps"] == 2 * -(-row["n_samples"] // 4)  # epochs x batches of --batch-size 4
        assert 0 < row["tokens_per_step"] <= row["padded_tokens_per_step"]
        config = json.loads((run_dir / "lora" / user / "adapter_config.json").read_text())
        assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
        assert any("lora_B" in k for k in adapter(run_dir / "lora" / user))
    assert manifest["prompt"] == {"algo": "zeroshot", "history_k": 2, "max_prompt_tokens": 256}  # lamp4's
    rows = manifest["users"].values()
    assert manifest["tokens_per_step"]["steps"] == sum(r["steps"] for r in rows)
    assert manifest["seconds_per_user"]["total"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.05)


def test_the_oppu_prompt_is_the_tasks_choice_unless_a_flag_or_the_config_sets_it(tmp_path):
    from data_process.config import parse_config

    def prompt(*argv: str) -> str:
        return train_lora.with_prompt(parse_config(train_lora.TrainLoraConfig, list(argv))).prompt

    # As OPPU's checkpoints were trained: zero-shot for LaMP and LongLaMP, RAG for PersonalWAB.
    assert {task: prompt("--task", task) for task in ("lamp4", "lamp4_style", "lamp5", "longlamp", "pwab")} == {
        "lamp4": "zeroshot", "lamp4_style": "zeroshot", "lamp5": "zeroshot", "longlamp": "zeroshot", "pwab": "rag"}
    assert prompt("--task", "lamp4", "--prompt", "rag") == "rag"
    assert prompt("--task", "pwab", "--prompt", "zeroshot") == "zeroshot"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": "lamp4", "train_lora": {"prompt": "rag"}}))
    assert prompt("--config", str(config)) == "rag"


def test_a_lamp4_run_trains_on_zero_shot_prompts_unless_told_rag(run, tmp_path, monkeypatch):
    from tasks.lamp4 import TASK

    config, run_dir = run
    seen: list[str] = []
    real = train_lora.encode_example
    monkeypatch.setattr(train_lora, "encode_example", lambda tok, message, *rest: seen.append(message)
                        or real(tok, message, *rest))
    argv = ["--config", str(config), "--epochs", "1"]
    default = run_stage("train_lora", [*argv, "--out-dir", str(tmp_path / "default")])
    zero_shot, seen[:] = list(seen), []
    rag = run_stage("train_lora", [*argv, "--out-dir", str(tmp_path / "rag"), "--prompt", "rag"])
    train = read_jsonl(run_dir / "ranked" / "train.jsonl")
    assert len(zero_shot) == len(seen) == len(train)  # one encoding per training sample
    assert not any(TASK.header in m or "\n- " in m for m in zero_shot)  # no history lines
    with_history = sum(bool(s["history"]) for s in train)
    assert with_history > 0 and sum(TASK.header in m and "\n- " in m for m in seen) == with_history
    assert default["prompt"]["algo"] == "zeroshot" and rag["prompt"]["algo"] == "rag"
    assert rag["tokens_per_step"]["tokens_per_step"] > default["tokens_per_step"]["tokens_per_step"]


def test_adapters_trained_on_the_old_default_rag_prompt_are_refused_naming_the_setting(run, tmp_path):
    config, _ = run
    argv = ["--config", str(config), "--out-dir", str(tmp_path / "lora"), "--epochs", "1"]
    run_stage("train_lora", [*argv, "--prompt", "rag"])
    with pytest.raises(ValueError, match=r'holds a finished run with other settings: prompt \("rag" -> "zeroshot"\)'):
        run_stage("train_lora", argv)


def test_oppu_generates_with_the_rag_prompt_whatever_prompt_its_adapters_learned(run):
    from tasks.lamp4 import TASK

    config, run_dir = run
    assert read_json(run_dir / "lora" / "manifest.json")["prompt"]["algo"] == "zeroshot"
    prompts = {algo: [r["prompt"] for r in read_jsonl(generate(config, "--algo", algo) / "generations.jsonl")]
               for algo in ("rag", "oppu")}
    assert prompts["oppu"] == prompts["rag"]
    assert all(TASK.header in p for p in prompts["oppu"])


def test_training_sees_only_train_samples_and_never_a_test_gold(run, tmp_path, monkeypatch):
    config, run_dir = run
    seen = []
    real = train_lora.encode_example

    def spy(tok, message, answer, *rest):
        seen.append((message, answer))
        return real(tok, message, answer, *rest)

    monkeypatch.setattr(train_lora, "encode_example", spy)
    run_stage("train_lora", ["--config", str(config), "--out-dir", str(tmp_path / "spy"), "--epochs", "1",
                             "--prompt", "rag"])  # prompts with history: where a test gold could hide
    train = read_jsonl(run_dir / "ranked" / "train.jsonl")
    tests = [s for split in ("seen_test", "unseen_test") for s in read_jsonl(run_dir / "ranked" / f"{split}.jsonl")]
    assert sorted(answer for _, answer in seen) == sorted(s["output"] for s in train)
    for message, answer in seen:
        for s in tests:
            assert s["output"] not in message and s["output"] != answer


def test_a_train_file_holding_a_test_sample_is_refused(run, tmp_path):
    config, run_dir = run
    leaky = tmp_path / "run"
    shutil.copytree(run_dir / "ranked", leaky / "ranked")
    test_sample = read_jsonl(leaky / "ranked" / "seen_test.jsonl")[0]
    with open(leaky / "ranked" / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(test_sample) + "\n")
    as_if_written_by_its_stage(leaky / "ranked" / "train.jsonl")
    with pytest.raises(ValueError, match=r"train\.jsonl:\d+ .*field 'id' is a test sample's id"):
        run_stage("train_lora", ["--config", str(config), "--run-dir", str(leaky)])
    assert not (leaky / "lora" / "manifest.json").exists()


def test_a_users_adapter_changes_only_that_users_outputs_in_a_mixed_split(run, tmp_path):
    config, run_dir = run
    rag = generations(generate(config, "--algo", "rag"))
    test_users = sorted({s["user_id"] for s in read_jsonl(run_dir / "ranked" / "seen_test.jsonl")})
    assert len(test_users) >= 2
    one = tmp_path / "one_adapter"
    shutil.copytree(run_dir / "lora" / test_users[0], one / test_users[0])
    oppu = generations(generate(config, "--algo", "oppu", "--plugin", str(one), "--tag", "_one"))
    owner = {s["id"]: s["user_id"] for s in read_jsonl(run_dir / "ranked" / "seen_test.jsonl")}
    changed = {owner[i] for i in rag if oppu[i] != rag[i]}
    assert changed == {test_users[0]}
    manifest = read_json(run_dir / "generations" / "seen_test" / "oppu_one" / "manifest.json")
    assert manifest["users_without_adapter"] == test_users[1:]


def test_oppu_fints_at_multiplier_zero_equals_oppu_and_steers_otherwise(run):
    config, run_dir = run
    oppu = generations(generate(config, "--algo", "oppu"))
    zero = generations(generate(config, "--algo", "oppu+fints", "--multipliers", "0", "--tag", "_m0"))
    strong = generations(generate(config, "--algo", "oppu+fints", "--multipliers", "50", "--tag", "_m50"))
    rag = generations(generate(config, "--algo", "rag"))
    assert zero == oppu
    assert strong != oppu
    assert oppu != rag  # the adapters act, so oppu is not rag under another name
    records = read_jsonl(run_dir / "generations" / "seen_test" / "oppu+fints_m0" / "generations.jsonl")
    assert {r["algo"] for r in records} == {"oppu+fints"}


def test_oppu_without_trained_adapters_says_which_script_to_run(run, tmp_path):
    config, run_dir = run
    empty = tmp_path / "run"
    shutil.copytree(run_dir / "ranked", empty / "ranked")
    with pytest.raises(FileNotFoundError, match="run scripts.train_lora first"):
        generate(config, "--algo", "oppu", "--run-dir", str(empty))
    shutil.copytree(run_dir / "lora", empty / "lora")
    (empty / "lora" / "manifest.json").unlink()  # a killed train_lora: some adapters, no manifest
    with pytest.raises(FileNotFoundError, match=r"lora/manifest.json does not exist.*run scripts.train_lora first"):
        generate(config, "--algo", "oppu", "--run-dir", str(empty))


def test_a_killed_run_resumes_with_the_next_user_and_matches_a_fresh_run(run, tmp_path, monkeypatch):
    config, run_dir = run
    argv = ["--config", str(config), *FAST]
    real, calls = train_lora.train_adapter, []

    def dies_on_the_second_user(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        return real(*args, **kwargs)

    monkeypatch.setattr(train_lora, "train_adapter", dies_on_the_second_user)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_stage("train_lora", [*argv, "--out-dir", str(out)])
    first = read_jsonl(out / "progress.jsonl")
    assert [r["user_id"] for r in first] == calls[:1] and not (out / "manifest.json").exists()
    (out / f"{calls[1]}.partial").mkdir()  # what a kill during saving leaves behind
    monkeypatch.setattr(train_lora, "train_adapter", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    run_stage("train_lora", [*argv, "--out-dir", str(out)])
    assert calls.count(calls[0]) == 1  # the finished user was not trained again
    assert sorted(calls[2:]) == sorted(set(users(run_dir)) - {calls[0]})  # the killed user started over
    manifest = read_json(out / "manifest.json")
    assert manifest["users"][calls[0]] == first[0]
    for user in users(run_dir):  # seeded per user: the same adapters as the uninterrupted run
        resumed, fresh = adapter(out / user), adapter(run_dir / "lora" / user)
        assert resumed.keys() == fresh.keys()
        assert all(torch.equal(resumed[k], fresh[k]) for k in fresh), user
    assert not (out / f"{calls[1]}.partial").exists()


def test_the_loss_covers_answer_tokens_only_and_matches_the_full_head(tiny_llama):
    from steering.lora import collate, encode_example, mean_loss

    model, tok = tiny_llama
    examples = [encode_example(tok, "the quick brown fox", "jumps over", 16),
                encode_example(tok, "a library for parsing JSON files and a tool", "parser", 16)]
    batch = collate(examples, tok.pad_token_id, "cpu")
    for e, labels in zip(examples, batch["labels"], strict=True):
        assert labels[:e.answer_start].eq(-100).all() and labels[len(e.ids):].eq(-100).all()
        assert labels[len(e.ids) - 1] == tok.eos_token_id  # the answer ends with EOS, which is learned
    with torch.no_grad():  # transformers' own loss: every position through the head, mean over labels
        reference = model(**batch).loss.item()
    assert mean_loss(model, examples, tok.pad_token_id) == pytest.approx(reference, rel=1e-5)


def test_length_grouped_batches_cover_every_example_once_and_are_seeded():
    import random

    from steering.lora import length_grouped_batches

    lengths = [random.Random(i).randint(5, 500) for i in range(70)]
    batches = length_grouped_batches(lengths, 4, random.Random(3))
    assert sorted(i for b in batches for i in b) == list(range(70))
    assert all(1 <= len(b) <= 4 for b in batches)
    assert batches == length_grouped_batches(lengths, 4, random.Random(3))
    assert batches != length_grouped_batches(lengths, 4, random.Random(4))


def test_a_training_answer_equal_to_a_test_gold_is_skipped_not_learned(run, tmp_path, caplog):
    config, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "ranked", copy / "ranked")
    test_sample = read_jsonl(copy / "ranked" / "seen_test.jsonl")[0]
    train = read_jsonl(copy / "ranked" / "train.jsonl")
    twin = next(s for s in train if s["user_id"] == test_sample["user_id"])
    twin["output"] = test_sample["output"]  # same text, different question
    (copy / "ranked" / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in train))
    as_if_written_by_its_stage(copy / "ranked" / "train.jsonl")
    manifest = run_stage("train_lora", ["--config", str(config), "--run-dir", str(copy), "--epochs", "1"])
    assert manifest["users"][twin["user_id"]]["n_samples"] == sum(s["user_id"] == twin["user_id"] for s in train) - 1
    assert (f"skipped 1 training sample(s) whose answer is also a test gold of their user: ['{twin['id']}']"
            in caplog.text)


def test_base_trains_a_shared_adapter_on_remain_train_that_every_user_starts_from(run, tmp_path):
    config, run_dir = run
    argv = ["--config", str(config), *FAST, "--epochs", "1"]
    manifest = run_stage("train_lora", [*argv, "--out-dir", str(tmp_path / "lora"), "--base", "true",
                                        "--base-limit", "6"])
    run_stage("train_lora", [*argv, "--out-dir", str(tmp_path / "scratch")])
    assert manifest["base"]["n_samples"] == 6 and manifest["base_adapter"] == str(tmp_path / "lora_base")
    assert (tmp_path / "lora_base" / WEIGHTS).exists()
    for user in users(run_dir):
        from_base, scratch = adapter(tmp_path / "lora" / user), adapter(tmp_path / "scratch" / user)
        assert not all(torch.equal(from_base[k], scratch[k]) for k in scratch), user


def test_a_changed_training_file_makes_finished_adapters_stale(run, tmp_path):
    config, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "ranked", copy / "ranked")
    argv = ["--config", str(config), "--run-dir", str(copy), "--epochs", "1"]
    manifest = run_stage("train_lora", argv)
    assert {Path(p).name for p in manifest["fingerprint"]["inputs"]} >= {"train.jsonl", "seen_test.jsonl"}
    train = read_jsonl(copy / "ranked" / "train.jsonl")
    train[0]["output"] = "an edited answer"
    (copy / "ranked" / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in train))
    as_if_written_by_its_stage(copy / "ranked" / "train.jsonl")
    with pytest.raises(ValueError, match=r"\[train_lora\] .* is stale: .*ranked/train\.jsonl"):
        run_stage("train_lora", argv)


def test_retraining_one_users_adapter_makes_an_existing_oppu_run_stale_naming_its_file(run, tmp_path):
    from safetensors.torch import save_file

    config, run_dir = run
    plugin = tmp_path / "plugin"
    shutil.copytree(run_dir / "lora", plugin)
    out = generate(config, "--algo", "oppu", "--plugin", str(plugin), "--tag", "_retrained")
    user = users(run_dir, "seen_test")[0]
    fingerprint = read_json(out / "manifest.json")["fingerprint"]["inputs"]
    assert str(plugin / user / WEIGHTS) in fingerprint and str(plugin / user / "adapter_config.json") in fingerprint
    assert generate(config, "--algo", "oppu", "--plugin", str(plugin), "--tag", "_retrained") == out  # skipped
    save_file({k: v * 2 for k, v in adapter(plugin / user).items()}, plugin / user / WEIGHTS)  # the retrain
    with pytest.raises(ValueError, match=rf"05_generate.*is stale: its inputs changed since it ran: "
                                         rf"\S*plugin/{user}/{WEIGHTS}"):
        generate(config, "--algo", "oppu", "--plugin", str(plugin), "--tag", "_retrained")


def test_the_adapters_are_checked_once_per_run(run, monkeypatch):
    import stages.generate
    import steering.runner

    config, run_dir = run
    checked, real = [], steering.runner.checked_name

    def spy(name, *args, **kwargs):
        checked.append(name)
        return real(name, *args, **kwargs)

    # Wherever a user id is checked as an adapter folder name, in the stage or the runner.
    monkeypatch.setattr(steering.runner, "checked_name", spy)
    monkeypatch.setattr(stages.generate, "checked_name", spy, raising=False)
    generate(config, "--algo", "oppu", "--tag", "_checked_once")
    assert sorted(checked) == users(run_dir, "seen_test")
