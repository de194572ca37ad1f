"""The simulated annotators' gold preference and their noise, checked by hand."""

from __future__ import annotations

import math
import random

import pytest

from rlhfkit.rewards.panel import Annotator, gold_breakdown, gold_ranks, gold_score, load_gold, make_panel

PROMPT = "Why do volcanoes erupt?"
GOOD = (
    "Volcanoes erupt when hot molten rock called magma rises from deep underground. Gas dissolved in the "
    "magma expands as it nears the surface, and the pressure finally breaks through the crust."
)  # 31 words: inside the 20-45 band


def test_good_answer_has_no_penalty_and_full_relevance():
    b = gold_breakdown(PROMPT, GOOD)
    # key words of the prompt: {"volca", "erupt"} ("why", "do" are stop words); both used in the answer
    assert b == gold_breakdown(PROMPT, GOOD)
    assert (b.relevance, b.concise, b.complete, b.repeats, b.polite, b.clean) == (
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    )


def test_each_fault_costs_what_the_docstring_says():
    cut = GOOD.rstrip(".") + " and then"  # no final punctuation
    assert gold_breakdown(PROMPT, cut).complete == -1.0
    long = " ".join([GOOD] * 3)  # 93 words, every trigram of the 2nd and 3rd copies repeated
    b = gold_breakdown(PROMPT, long)
    assert b.concise == pytest.approx(-math.log(93 / 45))
    # 91 trigrams; unique: 29 inside one copy + 2 spanning a copy boundary (the same at both boundaries)
    assert b.repeats == pytest.approx(-2.0 * (91 - 31) / 91)
    assert gold_breakdown(PROMPT, "Great question! " + GOOD).polite == -0.5
    assert gold_breakdown(PROMPT, GOOD + "<|im_end|>").clean == -1.0
    assert gold_score(PROMPT, "") < gold_score(PROMPT, "Magma.") < gold_score(PROMPT, GOOD)
    short = "Magma rises."  # 2 words, no key word
    assert gold_breakdown(PROMPT, short).concise == pytest.approx(-math.log(20 / 2))


def test_ranks_with_ties():
    assert gold_ranks([0.5, 2.0, 0.5, -1.0]) == [1, 0, 1, 2]


def test_annotator_without_noise_ranks_by_gold_and_flip_rate_matches():
    exact = Annotator("a", 0.0, random.Random(0))
    assert exact.rank([0.1, 0.9, 0.5]) == [2, 0, 1]
    noisy = Annotator("b", 0.25, random.Random(0))
    flips = sum(noisy.rank([1.0, 0.0]) == [1, 0] for _ in range(4000))
    # K = 2: a label flip with probability 0.25 (AlpacaFarm); 4000 draws: std 0.0068, so +-0.03 is > 4 sigma
    assert abs(flips / 4000 - 0.25) < 0.03


def test_panel_and_plugin():
    panel = make_panel(3, 0.25, seed=1)
    assert [a.name for a in panel] == ["sim-0", "sim-1", "sim-2"]
    assert load_gold("rlhfkit.rewards.panel:gold_score") is gold_score
    with pytest.raises(Exception, match="expected module:function"):
        load_gold("nonsense")
