"""A second gold preference, kept aside from development: concrete, impersonal answers of 15-60 words.

The default gold (`rlhfkit.rewards.panel.gold_score`) is the taste the defaults were developed against. This
one is a different, plausible reader: someone who wants one concrete example, dislikes answers that talk
about themselves, and tolerates a longer or shorter answer. Running the pipeline with it shows whether
the defaults improve on a gold they were not tuned to:

    PYTHONPATH=. rlhfkit pipeline --set gold=examples.gold_concrete:concrete_gold

Terms (higher is better; `concrete_breakdown` returns each):

  example       gives a concrete example: "for example", "for instance", "such as"   +1.0 if any
                or "e.g.", a number written in digits, or a named thing (a
                capitalised word that does not start a sentence, other than "I")
  first_person  talks about itself: I, me, my, mine, myself, we, us, our, ours,       -0.5 per word,
                ourselves (and I'm, we're, ... ; "US" in capitals is the country)    at most -1.5
  length        15-60 words; shorter or longer costs the log-distance to the band     -1.0 x |log(n / edge)|
  finished      ends with . ! ? or a closing quote or bracket (not cut off)          -1.0 if not
  on_topic      uses the key words of the question (`rlhfkit.rewards.panel.key_words`)      +0.5 x share used

Compared with the default gold it rewards examples (the default does not look for them), punishes the
first person (the default does not), has a wider length band (15-60 words, not 20-45), weighs relevance
half as much, and ignores repetition, filler and markup. It is deterministic and needs nothing but the
answer's text and the prompt's key words.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rlhfkit.rewards.panel import key_words

BAND = (15, 60)
FIRST_PERSON_COST = 0.5
FIRST_PERSON_CAP = 1.5
EXAMPLE_PHRASES = ("for example", "for instance", "such as", "e.g.")
FIRST_PERSON = frozenset(
    """i i'm i've i'd i'll me my mine myself we we're we've we'd we'll us our ours ourselves""".split()
)
ENDINGS = (".", "!", "?", '"', "'", ")")

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n+")


@dataclass(frozen=True)
class ConcreteBreakdown:
    example: float
    first_person: float
    length: float
    finished: float
    on_topic: float

    @property
    def total(self) -> float:
        return self.example + self.first_person + self.length + self.finished + self.on_topic


def _first_person(word: str) -> bool:
    return word.replace("’", "'").lower() in FIRST_PERSON and word != "US"


def named_things(text: str) -> list[str]:
    """Capitalised words that do not start a sentence (a crude proper-noun test), other than "I"."""
    found = []
    for sentence in _SENTENCE_END.split(text):
        words = _WORD.findall(sentence)
        found += [w for w in words[1:] if w[0].isupper() and not _first_person(w)]
    return found


def has_example(text: str) -> bool:
    low = text.lower()
    return (
        any(p in low for p in EXAMPLE_PHRASES) or any(ch.isdigit() for ch in text) or bool(named_things(text))
    )


def first_person_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if _first_person(w)]


def concrete_breakdown(prompt: str, answer: str) -> ConcreteBreakdown:
    """Each term of the concrete gold preference (see the module docstring)."""
    text = answer.strip()
    n = max(len(_WORD.findall(text)), 1)  # an empty answer costs as much as a one-word one
    example = 1.0 if has_example(text) else 0.0
    first_person = 0.0 - min(FIRST_PERSON_COST * len(first_person_words(text)), FIRST_PERSON_CAP)
    lo, hi = BAND
    length = -abs(math.log(n / lo)) if n < lo else -abs(math.log(n / hi)) if n > hi else 0.0
    finished = 0.0 if text.endswith(ENDINGS) else -1.0
    wanted = key_words(prompt)
    on_topic = 0.5 * len(wanted & key_words(text)) / len(wanted) if wanted else 0.25
    return ConcreteBreakdown(example, first_person, length, finished, on_topic)


def concrete_gold(prompt: str, answer: str) -> float:
    """The concrete gold preference (higher is better): `gold=examples.gold_concrete:concrete_gold`."""
    return concrete_breakdown(prompt, answer).total
