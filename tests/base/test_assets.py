"""The bundled data follows the rules written down in src/rlhfkit/assets/README.md."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from functools import cache

import pytest

from rlhfkit.data.records import bundled_path, load_prompts, load_sft

FILES = ("sft.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
MAX_JACCARD = 0.75  # word-set similarity allowed between two prompts (README: "at most 0.75")
MIN_EVAL = 300  # held-out prompts, for a tight interval on the win rate (issue 20)
PROMPT_WORDS = (3, 25)
ENDINGS = (".", "!", "?", '"', "'", ")")
# The first 135 evaluation prompts (the whole file before issue 20), pinned: runs that evaluate a prefix
# (eval.limit <= 135) stay comparable with older runs. sha256 of the prompt texts joined by "\n".
EVAL_PREFIX = (135, "bee9cbeeeb2d12a68f89a9fa2d14b92a14dd27b4e0880f923c5954c52224131d")
_WORD = re.compile(r"[a-z0-9']+")


@cache
def rows(name: str) -> list[dict]:
    text = bundled_path(name).read_text(encoding="utf-8")
    assert text.endswith("\n") and "\n\n" not in text, f"{name}: blank line or no final newline"
    return [json.loads(line) for line in text.splitlines()]


@cache
def prompts(name: str) -> list[str]:
    """The user turn of every record: `messages[0]` for SFT, `prompt[0]` for prompt files."""
    key = "messages" if name == "sft.jsonl" else "prompt"
    return [r[key][0]["content"] for r in rows(name)]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def exact_duplicates(texts: list[str]) -> list[str]:
    """Texts that occur more than once, ignoring case and runs of whitespace."""
    seen: set[str] = set()
    dups = []
    for t in texts:
        key = normalise(t)
        if key in seen:
            dups.append(t)
        seen.add(key)
    return dups


def near_pairs(a: list[str], b: list[str] | None = None, limit: float = MAX_JACCARD) -> list[tuple]:
    """Pairs with word-set Jaccard > limit: every pair within `a`, or every (a, b) pair when `b` is given.

    Jaccard(x, y) <= min(|x|, |y|) / max(|x|, |y|), so pairs whose sizes differ too much are skipped."""
    sa = [words(t) for t in a]
    pairs = (
        itertools.combinations(range(len(a)), 2)
        if b is None
        else itertools.product(range(len(a)), range(len(b)))
    )
    sb = sa if b is None else [words(t) for t in b]
    tb = a if b is None else b
    out = []
    for i, j in pairs:
        x, y = sa[i], sb[j]
        if min(len(x), len(y)) <= limit * max(len(x), len(y)):
            continue
        if (s := jaccard(x, y)) > limit:
            out.append((round(s, 3), a[i], tb[j]))
    return out


# ------------------------------------------------------------------------------------ the checkers


def test_checkers_catch_duplicates_and_near_duplicates():
    assert exact_duplicates(["Why is snow white?", "why is  SNOW white?", "What is hail?"]) == [
        "why is  SNOW white?"
    ]
    # {why, is, snow, white} vs {why, is, snow, so, white}: 4/5 = 0.8 > 0.75; vs {what, is, hail}: 1/6
    a, b = "Why is snow white?", "Why is snow so white?"
    assert near_pairs([a, b, "What is hail?"]) == [(0.8, a, b)]
    assert near_pairs([a], [b]) == [(0.8, a, b)]
    assert near_pairs([a], [b], limit=0.8) == []  # at the limit is allowed
    assert near_pairs(["What is hail?"], [b]) == []


# ------------------------------------------------------------------------------------ the files


def test_every_line_parses_with_the_loaders():
    sft = load_sft(bundled_path("sft.jsonl"))
    assert len(sft) == len(rows("sft.jsonl"))
    for name in ("prompts.jsonl", "eval_prompts.jsonl"):
        assert len(load_prompts(bundled_path(name))) == len(rows(name))
    for name in FILES:
        for i, r in enumerate(rows(name), 1):
            if name == "sft.jsonl":
                assert list(r) == ["messages"], (name, i)
                assert [m["role"] for m in r["messages"]] == ["user", "assistant"], (name, i)
            else:
                assert list(r) == ["prompt"], (name, i)
                assert [m["role"] for m in r["prompt"]] == ["user"], (name, i)


def test_readme_counts_match_the_files():
    readme = (bundled_path("sft.jsonl").parent / "README.md").read_text(encoding="utf-8")
    for name in FILES:
        match = re.search(rf"^\| `{re.escape(name)}` \| (\d+) \|", readme, re.MULTILINE)
        assert match, f"README table has no row for {name}"
        assert int(match.group(1)) == len(rows(name)), name


def test_enough_held_out_prompts_and_the_old_prefix_unchanged():
    ev = prompts("eval_prompts.jsonl")
    assert len(ev) >= MIN_EVAL
    n, digest = EVAL_PREFIX
    assert hashlib.sha256("\n".join(ev[:n]).encode()).hexdigest() == digest, (
        f"the first {n} evaluation prompts changed; append new prompts after them instead"
    )


@pytest.mark.parametrize("name", FILES)
def test_prompt_lengths(name):
    lo, hi = PROMPT_WORDS
    bad = [p for p in prompts(name) if not lo <= len(p.split()) <= hi]
    assert not bad, f"{name}: prompts outside {lo}-{hi} words: {bad}"


def test_sft_answers_end_with_closing_punctuation():
    answers = [r["messages"][-1]["content"] for r in rows("sft.jsonl")]
    bad = [a for a in answers if not a.endswith(ENDINGS)]
    assert not bad, f"answers without closing punctuation: {bad}"


def test_no_exact_duplicates_within_or_across_files():
    everything = [p for name in FILES for p in prompts(name)]
    assert not exact_duplicates(everything)


@pytest.mark.parametrize("first,second", list(itertools.combinations(FILES, 2)))
def test_no_near_duplicates_across_files(first, second):
    pairs = near_pairs(prompts(first), prompts(second))
    assert not pairs, f"{first} vs {second}: word-set Jaccard > {MAX_JACCARD}: {pairs[:10]}"


@pytest.mark.parametrize("name", FILES)
def test_no_near_duplicates_within_a_file(name):
    pairs = near_pairs(prompts(name))
    assert not pairs, f"{name}: word-set Jaccard > {MAX_JACCARD}: {pairs[:10]}"
