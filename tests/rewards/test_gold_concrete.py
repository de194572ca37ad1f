"""The second gold preference (examples/gold_concrete.py), checked by hand against the default one."""

from __future__ import annotations

import math

import pytest
from examples.gold_concrete import (
    concrete_breakdown,
    concrete_gold,
    first_person_words,
    has_example,
    named_things,
)

from rlhfkit.rewards.panel import gold_score, load_gold

PROMPT = "Why do volcanoes erupt?"  # key words {"volca", "erupt"}
PLAIN = (
    "Volcanoes erupt when hot molten rock called magma rises from deep underground. Gas dissolved in the "
    "magma expands as it nears the surface, and the pressure finally breaks through the crust."
)  # 31 words, both key words, no example, no first person
EXAMPLE = (
    PLAIN
    + " For example, Mount Etna in Sicily has erupted many times in the last few decades, often several "
    "times in a single year."
)  # 31 + 22 = 53 words: inside 15-60, outside the default's 20-45
FIRST_PERSON = (
    "I think volcanoes erupt because magma, which is molten rock, rises and the gas trapped inside it builds "
    "up pressure until it bursts through weak spots in the crust above."
)  # 30 words, one "I"
SHORT = "Magma rises, gas inside it expands, and the pressure bursts through the crust, so volcanoes erupt."
# 16 words: inside 15-60, under the default's 20


def terms(answer: str, prompt: str = PROMPT) -> tuple[float, ...]:
    b = concrete_breakdown(prompt, answer)
    return (b.example, b.first_person, b.length, b.finished, b.on_topic)


def test_hand_computed_scores():
    # example, first_person, length, finished, on_topic (0.5 x 2/2 key words)
    assert terms(PLAIN) == (0.0, 0.0, 0.0, 0.0, 0.5)
    assert terms(EXAMPLE) == (1.0, 0.0, 0.0, 0.0, 0.5)  # "For example", Mount Etna, Sicily
    assert terms(FIRST_PERSON) == (0.0, -0.5, 0.0, 0.0, 0.5)
    assert terms(SHORT) == (0.0, 0.0, 0.0, 0.0, 0.5)
    assert concrete_gold(PROMPT, EXAMPLE) == pytest.approx(1.5)
    assert concrete_gold(PROMPT, FIRST_PERSON) == pytest.approx(0.0)
    # empty: counted as one word, -log(15 / 1); not finished; no key word
    assert terms("") == pytest.approx((0.0, 0.0, -math.log(15), -1.0, 0.0))
    assert concrete_gold(PROMPT, "") == pytest.approx(-math.log(15) - 1.0)  # -3.708


def test_each_term_matters():
    # example: a cue phrase, a number in digits, or a named thing (not the first word of a sentence)
    assert not has_example("Many volcanoes are active today.")
    assert has_example("About 50 volcanoes erupt each year.")
    assert has_example("Volcanoes in Iceland erupt often.")
    assert not has_example("Iceland has volcanoes. Japan does too.")  # both start a sentence
    assert has_example("Some volcanoes, such as shield volcanoes, are gentle.")
    assert named_things('He said "Hello" to Ann. I agreed.') == ["Hello", "Ann"]  # "I" is not a name
    # first person: 0.5 a word, at most 1.5; "US" in capitals is the country (and a named thing)
    assert first_person_words("We think our friends and I, and us, and the US.") == ["We", "our", "I", "us"]
    assert terms("I’m sure we know.")[1] == -1.0  # curly apostrophe too
    assert terms("I think we know our own minds and my view is clear.")[1] == -1.5
    assert terms("Volcanoes in the US erupt.")[:2] == (1.0, 0.0)
    # length: log-distance to the 15-60 band
    ten = "Magma rises and the pressure breaks through the thin crust."  # 10 words
    assert terms(ten)[2] == pytest.approx(-math.log(15 / 10))
    assert terms(" ".join([PLAIN] * 3))[2] == pytest.approx(-math.log(93 / 60))
    # finished: cut off mid-sentence
    assert terms(PLAIN.rstrip(".") + " and then")[3] == -1.0
    assert terms(PLAIN + ")")[3] == 0.0
    # on topic: the share of the prompt's key words, half weight; a prompt without key words gives 0.25
    assert terms("Magma is hot and it erupts through the crust.")[4] == pytest.approx(0.25)
    assert terms("Magma is hot.", prompt="What is it?")[4] == pytest.approx(0.25)


def test_ranks_differently_from_the_default_gold():
    # an example that takes the answer past 45 words: the default prefers the plain answer, this gold not
    assert gold_score(PROMPT, PLAIN) > gold_score(PROMPT, EXAMPLE)  # 1.0 > 1 - log(53/45) = 0.836
    assert concrete_gold(PROMPT, EXAMPLE) > concrete_gold(PROMPT, PLAIN)  # 1.5 > 0.5
    # "I think" costs nothing by default, a 16-word answer does; here the other way round
    assert gold_score(PROMPT, FIRST_PERSON) > gold_score(PROMPT, SHORT)  # 1.0 > 1 - log(20/16) = 0.777
    assert concrete_gold(PROMPT, SHORT) > concrete_gold(PROMPT, FIRST_PERSON)  # 0.5 > 0.0
    # they still agree on the obvious: anything beats an empty answer
    for gold in (gold_score, concrete_gold):
        assert gold(PROMPT, SHORT) > gold(PROMPT, "")


def test_deterministic_and_loads_as_a_gold_setting():
    assert concrete_gold(PROMPT, EXAMPLE) == concrete_gold(PROMPT, EXAMPLE)
    assert load_gold("examples.gold_concrete:concrete_gold") is concrete_gold
