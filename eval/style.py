"""Style rules of the positive control and the metric that checks them (style adherence).

Every user of the style benchmark (``tests/fixtures/style/make_fixture.py``) writes ALL of
their outputs under one rule: a rule family (all lower/upper case, a fixed opening word,
a bracketed tag, a closing signature, a punctuation habit, a length cap) and a
user-specific variant.  The rules need no content knowledge and a model does not follow
them by itself, so whether a method picks up a user's style is a number:
:func:`style_adherence` is the share of a user's outputs that satisfy that user's rule.

The rules live in ``rules.json`` beside the benchmark files (never in a prompt):
``{"seed", "families", "users": {user_id: {"family", "variant", "description"}}}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_process.artifact_io import read_json

RULES_FILE = "rules.json"
_END_PUNCT = ".!?;:, "
# The longest "word" a length cap accepts: a run of text without spaces (a degenerate
# "whatiswhatiswhat...") is not a short headline.  The longest of the benchmark is 28.
MAX_WORD = 30


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _cap(text: str, n: int) -> str:
    return " ".join(text.split()[:n]).rstrip(_END_PUNCT + "-") or text.split()[0]


@dataclass(frozen=True)
class Family:
    """One kind of rule: its variants, how a text is made to follow it, how it is checked."""

    variants: tuple[str, ...]
    apply: Callable[[str, str], str]
    check: Callable[[str, str], bool]
    describe: Callable[[str], str]


# Every apply() gives a text its check() accepts (tests/test_style.py checks every output
# of the benchmark).  Variants are whole tokens a headline never ends or starts with, so a
# model that does not know the user almost never satisfies them by chance.
FAMILIES: dict[str, Family] = {
    "case": Family(
        ("lower", "upper"),
        lambda t, v: t.lower() if v == "lower" else t.upper(),
        lambda t, v: _has_letters(t) and t == (t.lower() if v == "lower" else t.upper()),
        lambda v: f"all {v} case"),
    "opening": Family(
        ("Behold:", "Psst:", "Voila:", "Yo:"),
        lambda t, v: f"{v} {t}",
        lambda t, v: t.startswith(v + " ") and _has_letters(t[len(v):]),
        lambda v: f"starts with {v!r}"),
    "tag": Family(
        ("[deb]", "[oss]", "[pkg]", "[cli]"),
        lambda t, v: f"{t} {v}",
        lambda t, v: t.endswith(" " + v) and _has_letters(t[:-len(v)]),
        lambda v: f"ends with the tag {v!r}"),
    "signature": Family(
        ("-- cheers", "~ peace out", "(signed, K.)", "// fin"),
        lambda t, v: f"{t} {v}",
        lambda t, v: t.endswith(" " + v) and _has_letters(t[:-len(v)]),
        lambda v: f"ends with the signature {v!r}"),
    "punct": Family(
        ("!!!", "?!"),
        lambda t, v: t.rstrip(_END_PUNCT) + v,
        lambda t, v: t.endswith(v) and _has_letters(t),
        lambda v: f"ends with {v!r}"),
    "cap": Family(
        ("2", "3"),
        lambda t, v: _cap(t, int(v)),
        lambda t, v: _has_letters(t) and 1 <= len(t.split()) <= int(v) and max(map(len, t.split())) <= MAX_WORD,
        lambda v: f"at most {v} words"),
}


@dataclass(frozen=True)
class StyleRule:
    """A user's rule: a family of :data:`FAMILIES` and one of its variants."""

    family: str
    variant: str

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown style rule family {self.family!r}; choose from {sorted(FAMILIES)}")
        if self.variant not in FAMILIES[self.family].variants:
            raise ValueError(f"style rule family {self.family!r} has no variant {self.variant!r}; "
                             f"choose from {list(FAMILIES[self.family].variants)}")

    def apply(self, text: str) -> str:
        """``text`` (stripped) written under this rule."""
        return FAMILIES[self.family].apply(re.sub(r"\s+", " ", text).strip(), self.variant)

    def check(self, text: str) -> bool:
        """Whether ``text`` (stripped) follows this rule."""
        text = (text or "").strip()
        return bool(text) and FAMILIES[self.family].check(text, self.variant)

    def describe(self) -> str:
        return FAMILIES[self.family].describe(self.variant)

    def to_json(self) -> dict[str, str]:
        return {"family": self.family, "variant": self.variant, "description": self.describe()}


def load_rules(data_dir: str | Path) -> dict[str, StyleRule]:
    """User id -> rule, from ``data_dir/rules.json``."""
    path = Path(data_dir) / RULES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the style benchmark's rules; write the benchmark with "
                                "tests/fixtures/style/make_fixture.py)")
    users = read_json(path).get("users")
    if not isinstance(users, dict):
        raise ValueError(f"{path}: field 'users' missing or not an object of user id -> rule")
    rules = {}
    for user, raw in users.items():
        try:
            rules[user] = StyleRule(raw["family"], raw["variant"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: users[{user!r}]: needs fields 'family' and 'variant' ({err})") from None
        except ValueError as err:
            raise ValueError(f"{path}: users[{user!r}]: {err}") from None
    return rules


def add_style_adherence(scores: dict[str, Any], records: list[dict[str, Any]], rules: dict[str, StyleRule],
                        where: str = RULES_FILE) -> dict[str, Any]:
    """``scores`` (of :func:`eval.report.score_records`) with ``style_adherence`` added.

    Per sample 1.0 when the generation follows its user's rule, else 0.0; per user the
    share of that user's samples; ``overall`` the mean over samples (the unit the
    intervals pool) and ``user_macro`` the mean of the per-user shares.
    """
    missing = sorted({r["user_id"] for r in records} - set(rules))
    if missing:
        raise ValueError(f"{where}: no style rule for user(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    hits = {r["id"]: float(rules[r["user_id"]].check(r["generation"])) for r in records}
    for row in scores["per_sample"]:
        row["style_adherence"] = hits[row["id"]]
    by_user: dict[str, list[float]] = {}
    for row in scores["per_sample"]:
        by_user.setdefault(row["user_id"], []).append(row["style_adherence"])
    for user, values in by_user.items():
        scores["per_user"][user]["style_adherence"] = sum(values) / len(values)
    per_user = [scores["per_user"][u]["style_adherence"] for u in by_user]
    scores["metrics"] = [*scores["metrics"], "style_adherence"]
    scores["overall"]["style_adherence"] = sum(hits.values()) / len(hits) if hits else float("nan")
    scores["user_macro"]["style_adherence"] = sum(per_user) / len(per_user) if per_user else float("nan")
    return scores
