"""The style benchmark (positive control): generator, rules, the style_adherence metric, and
the property it checks: per-user vectors point the way of their user's rule."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from eval.run_report import results_section
from eval.style import FAMILIES, StyleRule, load_rules
from tasks import get_task
from tasks.lamp4 import TASK as LAMP4
from tests.conftest import CHATML, _train_tokenizer, fixture_generator, run_stage


def _generator():
    return fixture_generator("style")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("style")
    _generator().write(out, _generator().SOURCE, seed=0)
    return out


def _outputs(bench: Path) -> list[tuple[str, str]]:
    """(user, output) of every headline in the benchmark: profile titles and golds."""
    found = []
    for split in ("train", "dev"):
        golds = {g["id"]: g["output"] for g in json.loads((bench / f"{split}_outputs.json").read_text())["golds"]}
        for q in json.loads((bench / f"{split}_questions.json").read_text()):
            found += [(q["user_id"], p["title"]) for p in q["profile"]] + [(q["user_id"], golds[q["id"]])]
    return found


def _gold_records(bench: Path, split: str = "dev", output=lambda user, gold: gold) -> list[dict]:
    golds = {g["id"]: g["output"] for g in json.loads((bench / f"{split}_outputs.json").read_text())["golds"]}
    return [{"id": q["id"], "user_id": q["user_id"], "generation": output(q["user_id"], golds[q["id"]]),
             "gold": golds[q["id"]]} for q in json.loads((bench / f"{split}_questions.json").read_text())]


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_rules(bench, tmp_path):
    gen = _generator()
    gen.write(tmp_path / "again", gen.SOURCE, seed=0)
    gen.write(tmp_path / "other", gen.SOURCE, seed=1)
    names = sorted(p.name for p in bench.iterdir())
    assert names == ["dev_outputs.json", "dev_questions.json", "rules.json", "train_outputs.json",
                     "train_questions.json"]
    for name in names:
        assert (bench / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert load_rules(bench) != load_rules(tmp_path / "other")


def test_every_user_has_one_rule_and_every_family_is_dealt_evenly(bench):
    rules = load_rules(bench)
    assert len(rules) == 48 and {u for u, _ in _outputs(bench)} == set(rules)
    assert Counter(r.family for r in rules.values()) == {family: 8 for family in FAMILIES}
    for split in ("train", "dev"):  # the rules never reach a prompt: LaMP-4's fields only
        for q in json.loads((bench / f"{split}_questions.json").read_text()):
            assert set(q) == {"id", "user_id", "input", "profile"}
            assert all(set(p) == {"id", "title", "text"} for p in q["profile"])


def test_every_output_of_a_user_history_and_gold_alike_follows_that_users_rule(bench):
    rules = load_rules(bench)
    broken = [(user, text) for user, text in _outputs(bench) if not rules[user].check(text)]
    assert broken == []


def test_the_benchmark_loads_as_lamp4_with_articles_unchanged(bench):
    styled = get_task("lamp4_style").load(bench)
    source = json.loads(_generator().SOURCE.read_text())
    texts = {it["id"]: it["text"] for u in source["users"] for it in u["items"]}
    assert len({s["user_id"] for s in styled.test}) == 48
    assert all(LAMP4.text(s["input"]) == texts[s["id"]] for s in styled.test)


@pytest.mark.parametrize("family,variant,good,bad", [
    ("case", "lower", "portable library for emacs", "Portable library for emacs"),
    ("case", "upper", "PORTABLE LIBRARY 2", "PORTABLE library"),
    ("opening", "Psst:", "Psst: a boot loader", "A boot loader Psst:"),
    ("tag", "[deb]", "a boot loader [deb]", "[deb] a boot loader"),
    ("signature", "(signed, K.)", "a boot loader (signed, K.)", "a boot loader (signed, K.) again"),
    ("punct", "?!", "a boot loader?!", "a boot loader!?"),
    ("cap", "2", "boot loader", "a boot loader"),
    ("cap", "3", "arming/disarming/configuring tool", "whatiswhatiswhatiswhatiswhatiswhat"),
])
def test_a_rule_accepts_text_that_follows_it_and_rejects_text_that_does_not(family, variant, good, bad):
    rule = StyleRule(family, variant)
    assert rule.check(good) and not rule.check(bad) and not rule.check("")
    assert rule.check(rule.apply("A boot loader, for QEMU."))


def test_an_unknown_family_or_variant_is_refused_by_name():
    with pytest.raises(ValueError, match="family 'rhyme'"):
        StyleRule("rhyme", "x")
    with pytest.raises(ValueError, match="no variant 'sig'"):
        StyleRule("signature", "sig")


def test_gold_answers_score_full_adherence_and_unstyled_headlines_almost_none(bench):
    task = get_task("lamp4_style")
    assert task.selection_metric == "style_adherence" and "style_adherence" in task.metrics
    gold = task.evaluate(_gold_records(bench), data_dir=str(bench), run_dir=bench)
    assert gold["overall"]["style_adherence"] == 1.0 and gold["user_macro"]["style_adherence"] == 1.0
    assert all(u["style_adherence"] == 1.0 for u in gold["per_user"].values())
    source = json.loads(_generator().SOURCE.read_text())
    plain = {it["id"]: it["title"] for u in source["users"] for it in u["items"]}
    records = [{**r, "generation": plain[r["id"]]} for r in _gold_records(bench)]
    unstyled = task.evaluate(records, data_dir=str(bench), run_dir=bench)
    # Only what a plain headline does anyway: all lower case, or at most 2-3 words.
    assert unstyled["overall"]["style_adherence"] < 0.2
    assert [s["style_adherence"] for s in unstyled["per_sample"]] == [
        float(load_rules(bench)[r["user_id"]].check(r["generation"])) for r in records]


def test_the_report_shows_adherence_with_user_level_intervals(bench):
    task = get_task("lamp4_style")
    gold = task.evaluate(_gold_records(bench), data_dir=str(bench), run_dir=bench)
    plain = _gold_records(bench, output=lambda user, gold: "Some Plain Headline Here")  # breaks every rule
    none = task.evaluate(plain, data_dir=str(bench), run_dir=bench)
    lines = results_section({"rag": none, "steer": gold}, {}, list(task.metrics), n_boot=200)
    steer = next(line for line in lines if line.startswith("| steer") and "[" in line)
    assert "Δadherence" in "\n".join(lines) and "+1.000 [+1.000, +1.000] *" in steer


def test_evaluation_without_a_rules_file_or_a_rule_for_a_user_says_which(bench, tmp_path):
    task = get_task("lamp4_style")
    with pytest.raises(FileNotFoundError, match="rules.json"):
        task.evaluate(_gold_records(bench), data_dir=str(tmp_path), run_dir=tmp_path)
    records = _gold_records(bench) + [{"id": "x", "user_id": "nobody", "generation": "a", "gold": "a"}]
    with pytest.raises(ValueError, match="no style rule for user.*nobody"):
        task.evaluate(records, data_dir=str(bench), run_dir=bench)


# --- The property the positive control checks, on a tiny model -----------------------------

HEADLINES = [["Quick Tool to Convert Images", "Parser for JSON Files", "Library for Debian Packages",
              "Fox Jumps Over the Dog"],
             ["Steering Vectors for Language Models", "User History Review Tool", "Title Category Product Search",
              "Short Descriptions of Software"]]
# Users who differ only by their rule (same headlines), and users with one rule on other headlines.
STYLE_USERS = {"lower_a": ("case", "lower", 0), "sig_a": ("signature", "-- cheers", 0),
               "lower_b": ("case", "lower", 1), "sig_b": ("signature", "-- cheers", 1)}
KEY = "block.1"


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory) -> Path:
    """The tiny test Llama with its output layer tied to the embeddings.

    A trained LM reads tokens out of its residual stream; a random untied head reads out
    noise, so "a vector raises the likelihood of its tokens" is only a property of a
    model whose readout matches what the residual stream carries.  Tying is the smallest
    such model; everything else is the conftest tiny Llama.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tied_llama")
    tok = _train_tokenizer(path, CHATML)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(path)
    return path


def _style_pairs() -> list[dict]:
    """Chosen = the headline under the user's rule; rejected = the same headline without it
    (what a model that does not know the user writes)."""
    pairs = []
    for user, (family, variant, group) in STYLE_USERS.items():
        rule = StyleRule(family, variant)
        for i, headline in enumerate(HEADLINES[group]):
            prompt = (f"Generate a headline for the following article: {headline.lower()} explained.\n"
                      "Write only the headline.")
            pairs.append({"pair_id": f"{user}-{i}", "user_id": user, "sample_id": f"{user}-{i}", "prompt": prompt,
                          "query": headline, "chosen": rule.apply(headline), "rejected": headline})
    return pairs


@pytest.fixture(scope="module")
def style_vectors(tmp_path_factory, tied_llama_dir):
    """Stage 04 (the real extraction and per-user mean) over the style pairs: user -> vector."""
    from steering.vectors import load_user_vectors

    run_dir = tmp_path_factory.mktemp("style_run")
    (run_dir / "pairs").mkdir()
    (run_dir / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _style_pairs()))
    run_stage("extract_vectors", ["--run-dir", str(run_dir), "--model", str(tied_llama_dir), "--device", "cpu",
                                  "--dtype", "float32", "--layers", "1", "--sites", "block",
                                  "--user-strategies", "mean", "--save-dtype", "float32"])
    vectors = load_user_vectors(run_dir / "vectors", "mean", [KEY])
    return {user: vectors[user][KEY] for user in STYLE_USERS}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_users_who_differ_only_by_their_rule_get_vectors_that_point_the_way_of_their_rule(style_vectors):
    v = style_vectors
    # Same rule on other headlines: close.  Other rule on the same headlines: far.
    for user, same, other in (("lower_a", "lower_b", "sig_a"), ("sig_a", "sig_b", "lower_a"),
                              ("lower_b", "lower_a", "sig_b"), ("sig_b", "sig_a", "lower_b")):
        assert _cos(v[user], v[same]) > _cos(v[user], v[other]) + 0.2, (user, same, other)
        assert abs(_cos(v[user], v[other])) < 0.3, (user, other)


def _answer_logprob(model, tok, pair: dict, side: str, vector: torch.Tensor | None) -> float:
    """Sum of the log-probabilities of ``pair[side]``'s answer tokens, steered by ``vector``."""
    from steering.extract import encode_pair
    from steering.hooks import add_vectors

    seq = encode_pair(tok, pair, 64)[0 if side == "chosen" else 1]
    ids = torch.tensor([seq.ids])
    with torch.no_grad():
        if vector is None:
            logits = model(input_ids=ids).logits
        else:
            with add_vectors(model, {KEY: vector.unsqueeze(0)}):
                logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][seq.answer_start - 1:].sum().item()


def test_a_users_own_vector_raises_the_likelihood_of_its_rule_more_than_another_rules_vector(
        style_vectors, tied_llama_dir):
    from steering.loading import load_model

    model, tok = load_model(tied_llama_dir, device="cpu", dtype="float32")
    pairs = _style_pairs()

    def margin(user: str, vector: torch.Tensor | None) -> float:
        # log p(answer with the rule) - log p(the same answer without it): the rule's own tokens.
        mine = [p for p in pairs if p["user_id"] == user]
        return sum(_answer_logprob(model, tok, p, "chosen", vector) - _answer_logprob(model, tok, p, "rejected", vector)
                   for p in mine) / len(mine)

    for user, other in (("lower_a", "sig_a"), ("sig_a", "lower_a"), ("lower_b", "sig_b"), ("sig_b", "lower_b")):
        plain = margin(user, None)
        own, others = margin(user, style_vectors[user]) - plain, margin(user, style_vectors[other]) - plain
        assert own > 0.1 and own > others + 0.1, (user, own, other, others)
