"""Bad input through the command line, as a new user meets it (issue 13).

Every case runs a stage's CLI entry point (:func:`data_process.cli.main`) on a copy of a
finished tiny run: exit code 2, one ``error:`` line naming the file, record and field (or
the config file, section and key, or the flag), and every file that was already written
is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_process.artifact_io import read_json, read_jsonl
from data_process.cli import main
from tests.conftest import as_if_written_by_its_stage, run_stage
from tests.test_pipeline import write_config, write_fixture

GEN = Path("generations") / "seen_test"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama_dir):
    """(config, run dir, raw data dir) with stages 01-04 and 05 rag/fints/steer finished."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "config.json", root / "run", write_fixture(root / "raw"), tiny_llama_dir)
    for name in ("select_users", "rank_history", "collect_pairs", "extract_vectors"):
        run_stage(name, ["--config", str(config)])
    for algo in ("rag", "fints", "steer"):
        run_stage("generate", ["--config", str(config), "--algo", algo])
    return config, root / "run", root / "raw"


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run: (config whose run_dir is the copy, run dir)."""
    config, run_dir, raw = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    edited = {**json.loads(config.read_text()), "run_dir": str(copy)}
    (tmp_path / "config.json").write_text(json.dumps(edited))
    return tmp_path / "config.json", copy


def stage_main(module: str):
    mod = importlib.import_module(f"stages.{module}")
    (config_cls,) = [v for v in vars(mod).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
                     and v.__module__ == mod.__name__]
    return config_cls, mod.run


def fails(capsys, module: str, argv: list[str]) -> str:
    """Run a stage as its script does; assert exit 2 with one error line and return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(*stage_main(module), argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("error: ") or "Traceback" in line]
    assert exit_info.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir`` (and nothing else) with its content hash."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def edit_config(config: Path, section: str | None, key: str, value) -> None:
    data = json.loads(config.read_text())
    (data.setdefault(section, {}) if section else data)[key] = value
    config.write_text(json.dumps(data))


# -- 1. settings ---------------------------------------------------------------------------

SETTINGS = [  # (stage, section, key, value, expected message)
    ("select_users", "select_users", "num_users", 2.5, "key 'num_users': must be an integer, got 2.5"),
    ("select_users", "select_users", "num_users", -1, "key 'num_users': must be at least 1, got -1"),
    ("select_users", "select_users", "history_rate", 0, "key 'history_rate': must be above 0, got 0"),
    ("extract_vectors", "extract_vectors", "layers", 15, "key 'layers': must be a list of integers, got 15"),
    ("extract_vectors", "extract_vectors", "layers", [], "key 'layers': must not be empty"),
    ("extract_vectors", "extract_vectors", "layers", [1, -1], "key 'layers': must be at least 0, got -1"),
    ("collect_pairs", "collect_pairs", "threshold", 2.0, "key 'threshold': must be at most 1, got 2.0"),
    ("collect_pairs", "collect_pairs", "history_k", -2, "key 'history_k': must be at least 0, got -2"),
    ("generate", "generate", "history_k", -3, "key 'history_k': must be at least 0, got -3"),
    ("generate", "generate", "do_sample", 1, "key 'do_sample': must be true or false, got 1"),
    ("generate", "generate", "tag", "/../x", "key 'tag': '/../x' is not a plain name"),
    ("generate", None, "seed", "7", "top-level key 'seed': must be an integer, got '7'"),
]


@pytest.mark.parametrize("stage, section, key, value, message", SETTINGS)
def test_a_bad_config_value_names_the_file_section_and_key(run, capsys, stage, section, key, value, message):
    config, run_dir = run
    before = snapshot(run_dir)
    edit_config(config, section, key, value)
    err = fails(capsys, stage, ["--config", str(config), "--overwrite"])
    where = f"section {section!r}, " if section else ""
    assert err.startswith(f"error: {config}: {where}{message}")
    assert snapshot(run_dir) == before


def test_a_nan_in_the_config_file_is_refused_too(run, capsys):
    config, _ = run
    config.write_text(config.read_text().replace('"batch_size": 3', '"batch_size": 3, "alpha": NaN'))
    err = fails(capsys, "generate", ["--config", str(config), "--algo", "fints", "--tag", "_nan"])
    assert "section 'generate', key 'alpha': must be a finite number, got nan" in err


FLAGS = [  # (stage, flags, expected message): the same rules as the config values
    ("select_users", ["--num-users", "-1"], "error: --num-users: must be at least 1, got -1"),
    ("generate", ["--alpha", "nan"], "error: --alpha: must be a finite number, got nan"),
    ("generate", ["--multipliers", "1", "inf"], "error: --multipliers: must be a finite number, got inf"),
    ("generate", ["--split", "../data/train"], "error: --split: '../data/train' is not a plain name"),
    ("generate", ["--tag", "/tmp/x"], "error: --tag: '/tmp/x' is not a plain name"),
    ("generate", ["--top-p", "0"], "error: --top-p: must be above 0, got 0.0"),
    ("select_users", ["--num-users", "2.5"], "invalid int value: '2.5'"),
    ("select_users", ["--conf", "x.json"], "['--conf', 'x.json']"),  # no abbreviation of --config
]


@pytest.mark.parametrize("stage, flags, message", FLAGS)
def test_a_bad_flag_value_names_the_flag(run, capsys, stage, flags, message):
    config, run_dir = run
    before = snapshot(run_dir)
    assert message in fails(capsys, stage, ["--config", str(config), *flags])
    assert snapshot(run_dir) == before


# -- 2. --overwrite --------------------------------------------------------------------------

@pytest.mark.parametrize("stage, folder", [("generate", GEN / "rag"), ("collect_pairs", Path("pairs")),
                                           ("extract_vectors", Path("vectors"))])
def test_overwrite_with_a_missing_model_leaves_the_finished_outputs_as_they_were(run, capsys, stage, folder):
    config, run_dir = run
    before = snapshot(run_dir)
    argv = ["--config", str(config), "--overwrite", "--model", str(run_dir / "no-model")]
    err = fails(capsys, stage, argv + (["--algo", "rag"] if stage == "generate" else []))
    assert f"model directory {run_dir / 'no-model'} has no config.json" in err
    assert snapshot(run_dir) == before and not (run_dir / f"{folder}.new").exists()


def test_overwrite_with_a_bad_pairs_row_leaves_the_vectors_as_they_were(run, capsys):
    config, run_dir = run
    pairs = run_dir / "pairs" / "pairs.jsonl"
    with open(pairs, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pair_id": "extra"}) + "\n")
    as_if_written_by_its_stage(pairs)
    before = snapshot(run_dir)
    err = fails(capsys, "extract_vectors", ["--config", str(config), "--overwrite"])
    n = len(read_jsonl(pairs))
    assert err == f"error: {pairs} record {n}: pair 'extra' has no valid 'user_id' field"
    assert snapshot(run_dir) == before and not (run_dir / "vectors.new").exists()


def test_a_stage_failing_on_input_leaves_no_empty_folder(run, capsys):
    config, run_dir = run
    fails(capsys, "generate", ["--config", str(config), "--algo", "rag", "--tag", "_new", "--model", "/nonexistent"])
    assert not (run_dir / GEN / "rag_new").exists()


def test_a_successful_overwrite_replaces_the_outputs_and_a_killed_one_keeps_them(run, capsys, monkeypatch):
    import steering.runner

    config, run_dir = run
    out = run_dir / GEN / "rag"
    before = snapshot(out)
    real = steering.runner.generate_batches

    calls = []

    def killed(*args, **kwargs):  # one chunk of one sample per call: killed in the fourth
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(steering.runner, "generate_batches", killed)
    argv = ["--config", str(config), "--algo", "rag", "--overwrite", "--max-new-tokens", "4",
            "--samples-per-chunk", "1"]
    with pytest.raises(KeyboardInterrupt):
        main(*stage_main("generate"), argv)
    assert snapshot(out) == before and len(read_jsonl(out.with_name("rag.new") / "generations.jsonl")) == 3
    monkeypatch.setattr(steering.runner, "generate_batches", real)
    main(*stage_main("generate"), argv)  # resumes the redo in rag.new, then swaps it in
    records = read_jsonl(out / "generations.jsonl")
    assert len(records) == len({r["id"] for r in records}) == len(read_jsonl(run_dir / "ranked" / "seen_test.jsonl"))
    assert read_json(out / "manifest.json")["config"]["max_new_tokens"] == 4
    assert not out.with_name("rag.new").exists() and not out.with_name("rag.old").exists()


# -- 3. vectors ------------------------------------------------------------------------------

def rewrite_vectors(path: Path, tensors=lambda t: t, meta=lambda m: m) -> None:
    with safe_open(str(path), framework="pt") as f:
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors(old), str(path), metadata=meta(old_meta))


def with_nan(tensors):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    return tensors


VECTOR_CASES = {  # name -> (algo, file, edit, expected message after the file name)
    "nan pair vectors": ("fints", "vectors.safetensors", lambda p: rewrite_vectors(p, with_nan),
                         "tensor 'attn.1' holds NaN or Inf in row 0"),
    "nan user vectors": ("steer", "user_vectors.safetensors", lambda p: rewrite_vectors(p, with_nan),
                         "holds NaN or Inf"),
    "wrong width": ("fints", "vectors.safetensors",
                    lambda p: rewrite_vectors(p, lambda t: {k: torch.cat([v, v[:, :1]], 1) for k, v in t.items()}),
                    "has shape [ROWS, 33], expected [ROWS, 32]"),
    "an extra row": ("fints", "vectors.safetensors",
                     lambda p: rewrite_vectors(p, lambda t: {k: torch.cat([v, v[:1]]) for k, v in t.items()}),
                     "has shape [ROWS+1, 32], expected [ROWS, 32]"),
    "wrong user width": ("steer", "user_vectors.safetensors",
                         lambda p: rewrite_vectors(p, lambda t: {k: v[:16] for k, v in t.items()}),
                         "has shape [16], expected [32]"),
    "truncated": ("fints", "vectors.safetensors", lambda p: p.write_bytes(p.read_bytes()[:200]),
                  "not a readable safetensors file"),
    "not safetensors": ("steer", "user_vectors.safetensors", lambda p: p.write_bytes(b"\xff" * 64),
                        "not a readable safetensors file"),
    "malformed metadata": ("fints", "vectors.safetensors",
                           lambda p: rewrite_vectors(p, meta=lambda m: {"fints": m["fints"][:-3]}),
                           "malformed 'fints' metadata"),
    "metadata missing a field": ("fints", "vectors.safetensors", lambda p: rewrite_vectors(p, meta=lambda m: {
        "fints": json.dumps({k: v for k, v in json.loads(m["fints"]).items() if k != "hidden_size"})}),
        "'fints' metadata field 'hidden_size' missing or not int"),
}


@pytest.mark.parametrize("case", list(VECTOR_CASES))
def test_a_bad_vector_file_is_an_error_naming_it(run, capsys, case):
    config, run_dir = run
    algo, name, edit, message = VECTOR_CASES[case]
    path = run_dir / "vectors" / name
    rows = len(read_json(run_dir / "vectors" / "vectors.index.json"))
    edit(path)
    before = snapshot(run_dir)
    err = fails(capsys, "generate", ["--config", str(config), "--algo", algo, "--tag", "_bad"])
    message = message.replace("ROWS+1", str(rows + 1)).replace("ROWS", str(rows))
    assert err.startswith(f"error: {path}: ") and message in err
    assert snapshot(run_dir) == before


# -- 4. ids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("user", ["../x", "/tmp/x", "a/b", ".."])
def test_a_user_id_that_is_not_a_plain_name_never_reaches_a_path(run, capsys, tmp_path, user):
    pytest.importorskip("peft")
    config, run_dir = run
    split = run_dir / "ranked" / "seen_test.jsonl"
    samples = read_jsonl(split)
    split.write_text("".join(json.dumps({**s, "user_id": user}) + "\n" for s in samples))
    as_if_written_by_its_stage(split)
    (tmp_path / "plugin").mkdir()
    err = fails(capsys, "generate", ["--config", str(config), "--algo", "oppu", "--plugin", str(tmp_path / "plugin")])
    assert err.startswith(f"error: {split} (adapters in --plugin {tmp_path / 'plugin'}): user_id {user!r} "
                          "cannot name a folder or file")
    train = run_dir / "ranked" / "train.jsonl"
    train.write_text("".join(json.dumps({**s, "user_id": user}) + "\n" for s in read_jsonl(train)))
    as_if_written_by_its_stage(train)
    err = fails(capsys, "train_lora", ["--config", str(config), "--history-k", "1"])
    assert err.startswith(f"error: {train}: user_id {user!r} cannot name a folder or file")
    assert not (run_dir / "lora").exists()


def test_an_integer_and_a_string_user_id_of_the_same_text_are_an_error(finished, capsys, tmp_path):
    config, _, raw = finished
    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    questions = json.loads((data / "train_questions.json").read_text())
    users = sorted({q["user_id"] for q in questions})
    for q in questions:
        q["user_id"] = {users[0]: "123", users[1]: 123}.get(q["user_id"], q["user_id"])
    moved = next(i for i, q in enumerate(questions) if q["user_id"] == 123)
    for i, q in enumerate(questions):  # one record of the integer user is enough
        if q["user_id"] == 123 and i != moved:
            q["user_id"] = "123"
    (data / "train_questions.json").write_text(json.dumps(questions))
    err = fails(capsys, "select_users", ["--config", str(config), "--data-dir", str(data),
                                          "--run-dir", str(tmp_path / "run")])
    assert f"{data / 'train_questions.json'}: record {moved}" in err and "field 'user_id' is 123 (int)" in err
    assert not (tmp_path / "run").exists()


# -- 5. inputs -------------------------------------------------------------------------------

def test_a_torn_last_line_of_a_finished_input_is_an_error_not_a_dropped_sample(run, capsys):
    config, run_dir = run
    split = run_dir / "ranked" / "seen_test.jsonl"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    err = fails(capsys, "generate", ["--config", str(config), "--algo", "rag", "--tag", "_t"])
    assert err.startswith(f"error: {split}:{len(lines)}: malformed JSON")
    data = run_dir / "data" / "train.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    err = fails(capsys, "rank_history", ["--config", str(config), "--overwrite"])
    assert err.startswith(f"error: {data}:{len(lines)}: malformed JSON")
    assert not (run_dir / GEN / "rag_t").exists() and not (run_dir / "ranked.new").exists()


def test_an_edited_finished_input_is_an_error_naming_it_and_its_manifest(run, capsys):
    config, run_dir = run
    split = run_dir / "ranked" / "seen_test.jsonl"
    split.write_text(split.read_text().replace('"output": "', '"output": "edited ', 1))
    err = fails(capsys, "generate", ["--config", str(config), "--algo", "rag", "--tag", "_e"])
    assert err == (f"error: {split}: changed since its stage finished (its sha256 differs from the one in "
                   f"{split.parent / 'manifest.json'}); restore it, or rerun that stage with --overwrite")


def test_duplicate_ids_in_a_split_are_an_error(run, capsys):
    config, run_dir = run
    split = run_dir / "ranked" / "seen_test.jsonl"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines + lines[:1]) + "\n")
    as_if_written_by_its_stage(split)
    err = fails(capsys, "generate", ["--config", str(config), "--algo", "rag", "--tag", "_d"])
    first = json.loads(lines[0])["id"]
    assert err == f"error: {split}:{len(lines) + 1}: record {first!r}: duplicate id (first at record 1)"


def test_an_empty_split_is_an_error_naming_the_file(run, capsys):
    config, run_dir = run
    split = run_dir / "ranked" / "seen_test.jsonl"
    split.write_text("")
    as_if_written_by_its_stage(split)
    err = fails(capsys, "generate", ["--config", str(config), "--algo", "rag", "--tag", "_0"])
    assert err == f"error: {split}: no samples (the file holds none)"
    assert not (run_dir / GEN / "rag_0").exists()


def test_an_empty_test_file_of_the_benchmark_is_named(finished, capsys, tmp_path):
    config, _, raw = finished
    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    (data / "dev_questions.json").write_text("[]")
    (data / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": []}))
    err = fails(capsys, "select_users", ["--config", str(config), "--data-dir", str(data),
                                          "--run-dir", str(tmp_path / "run")])
    assert err == f"error: {data / 'dev_questions.json'}: no dev questions (the file holds none)"


@pytest.mark.parametrize("what", ["benchmark file", "config", "jsonl"])
def test_non_utf8_input_names_the_file_and_the_byte_offset(finished, run, capsys, tmp_path, what):
    config, run_dir = run
    if what == "benchmark file":
        data = tmp_path / "raw"
        shutil.copytree(finished[2], data)
        path = data / "train_questions.json"
        stage, argv = "select_users", ["--data-dir", str(data), "--overwrite"]
    elif what == "config":
        path, stage, argv = config, "select_users", ["--overwrite"]
    else:
        path, stage, argv = run_dir / "ranked" / "seen_test.jsonl", "generate", ["--algo", "rag", "--tag", "_u"]
    data = path.read_bytes()
    offset = data.index(b"e", len(data) // 2)
    path.write_bytes(data[:offset] + b"\xe9" + data[offset + 1:])
    err = fails(capsys, stage, ["--config", str(config), *argv])
    line = data.count(b"\n", 0, offset) + 1
    assert err.startswith(f"error: {path}: byte {offset} (line {line}) is not UTF-8")


# -- 6. the question is cut to the budget ----------------------------------------------------

def test_a_huge_article_is_cut_to_the_prompt_budget_and_counted(run, capsys):
    from steering.loading import load_tokenizer

    config, run_dir = run
    split = run_dir / "ranked" / "seen_test.jsonl"
    samples = read_jsonl(split)
    huge = "Generate a headline for the following article: " + " ".join(f"w{i}" for i in range(200_000))
    samples[0] = {**samples[0], "input": huge}
    split.write_text("".join(json.dumps(s) + "\n" for s in samples))
    as_if_written_by_its_stage(split)
    main(*stage_main("generate"), ["--config", str(config), "--algo", "rag", "--tag", "_big"])
    assert f"1 of {len(samples)} prompt(s) were cut" in capsys.readouterr().err
    out = run_dir / GEN / "rag_big"
    assert read_json(out / "manifest.json")["prompts_cut"] == 1
    tok = load_tokenizer(json.loads(config.read_text())["model"])
    budget = json.loads(config.read_text())["generate"]["max_prompt_tokens"]
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(out / "generations.jsonl")}
    assert len(tok(prompts[samples[0]["id"]], add_special_tokens=False)["input_ids"]) <= budget
    assert "w0 w1" in prompts[samples[0]["id"]] and "w199999" not in prompts[samples[0]["id"]]


# -- 7. identical runs are byte-identical wherever they live ---------------------------------

def test_identical_runs_in_two_folders_write_identical_artifacts(finished, tmp_path):
    config, run_dir, _ = finished
    other = tmp_path / "elsewhere" / "run"
    for name in ("select_users", "rank_history", "collect_pairs", "extract_vectors"):
        run_stage(name, ["--config", str(config), "--run-dir", str(other)])
    run_stage("generate", ["--config", str(config), "--run-dir", str(other), "--algo", "fints"])

    def artifacts(root: Path) -> dict[str, str]:
        return {k: v for k, v in snapshot(root).items()
                if Path(k).name not in ("manifest.json", "fingerprint.json") and not k.startswith(str(GEN / "rag"))
                and not k.startswith(str(GEN / "steer"))}

    assert artifacts(other) == artifacts(run_dir)
    meta = json.loads(safe_open(str(other / "vectors" / "vectors.safetensors"), "pt").metadata()["fints"])
    assert meta["settings"]["pairs_file"] == "pairs/pairs.jsonl"
