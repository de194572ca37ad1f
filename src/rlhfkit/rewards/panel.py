"""Simulated human feedback: a gold preference and a panel of noisy annotators (as AlpacaFarm does).

When no people are at hand, the pipeline asks simulated annotators to rank answers. What they value is
written down here, once, as `gold_score(prompt, answer) -> float` (higher is better):

  relevance   the answer uses the key words of the question            +1.0 x share of key words used
  concise     about 20-45 words; longer or shorter costs log-distance  -1.0 x |log(n / band edge)|
  complete    ends with . ! or ? (not cut off mid-sentence)           -1.0 if not
  no repeats  no word trigram said twice                               -2.0 x share of repeated trigrams
  polite      no filler ("Great question!") or rude words              -0.5 per phrase
  clean       no leftover markup or special tokens, not empty          -1.0 / -3.0

The gold function is only ever used to label answers and to evaluate policies, never as a training
reward: the policy learns from the reward model trained on the panel's (noisy) rankings, so what RL can
exploit is the reward model's view of these preferences, as with real people.

A user plugs in their own preference with `module:function` taking (prompt, answer) -> float.

Annotators: each ranks the K answers of a prompt by the gold score (equal scores tie), then flips each
adjacent pair of its ranking with probability `flip_prob` (0.25 by default, AlpacaFarm's `p_label_flip`);
for K = 2 that is exactly AlpacaFarm's label flip. Several annotators per item give the agreement figures.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhfkit.config import import_spec
from rlhfkit.errors import ConfigError

GoldFn = Callable[[str, str], float]

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_STOPWORDS = frozenset(
    """a an the is are was were be been being am do does did doing have has had having i me my we our you your
    he she it its they them their this that these those what which who whom whose when where why how and or
    but if then than so as of at by for with about into through to from in on up down out over under again
    can could should would will shall may might must not no yes very just also please tell explain give
    describe some any all most more less few many much one two three name list short simple simply briefly
    quick way ways good best make makes made get gets thing things really know""".split()
)
_FILLER = (
    "great question",
    "good question",
    "as an ai",
    "i hope this helps",
    "feel free to ask",
    "certainly!",
)
_RUDE = ("stupid", "idiot", "shut up", "dumb question", "obviously you")
_MARKUP = re.compile(r"<\|[^>]*\|>|</?[a-z]+>|\[/?INST\]")
BAND = (20, 45)


def key_words(text: str) -> set[str]:
    """Content words of a text, cut to their first 5 letters (a crude stem: 'volcanoes' ~ 'volcanic')."""
    return {w.lower()[:5] for w in _WORD.findall(text) if w.lower() not in _STOPWORDS and len(w) > 2}


@dataclass(frozen=True)
class GoldBreakdown:
    relevance: float
    concise: float
    complete: float
    repeats: float
    polite: float
    clean: float

    @property
    def total(self) -> float:
        return self.relevance + self.concise + self.complete + self.repeats + self.polite + self.clean


def gold_breakdown(prompt: str, answer: str) -> GoldBreakdown:
    """Each term of the gold preference (see the module docstring)."""
    text = answer.strip()
    words = _WORD.findall(text)
    n = len(words)
    if n == 0:
        return GoldBreakdown(0.0, -math.log(BAND[0]), -1.0, 0.0, 0.0, -3.0)
    wanted = key_words(prompt)
    relevance = len(wanted & key_words(text)) / len(wanted) if wanted else 0.5
    if n < BAND[0]:
        concise = -abs(math.log(n / BAND[0]))
    elif n > BAND[1]:
        concise = -abs(math.log(n / BAND[1]))
    else:
        concise = 0.0
    complete = 0.0 if text[-1] in ".!?" or text.endswith(('."', '!"', '?"', ".)", ".'")) else -1.0
    lowered = [w.lower() for w in words]
    trigrams = list(zip(lowered, lowered[1:], lowered[2:], strict=False))
    repeated = len(trigrams) - len(set(trigrams))
    repeats = -2.0 * repeated / len(trigrams) if trigrams else 0.0
    low = text.lower()
    polite = -0.5 * sum(low.count(p) for p in _FILLER + _RUDE)
    clean = -1.0 if _MARKUP.search(text) else 0.0
    return GoldBreakdown(relevance, concise, complete, repeats, polite, clean)


def gold_score(prompt: str, answer: str) -> float:
    """The default gold preference of the simulated annotators (higher is better)."""
    return gold_breakdown(prompt, answer).total


def load_gold(spec: str | None) -> GoldFn:
    """`None` or "default" -> gold_score; otherwise import `module:function`."""
    if spec in (None, "", "default"):
        return gold_score
    return import_spec(spec, "gold")


def gold_ranks(scores: Sequence[float], tol: float = 1e-9) -> list[int]:
    """Rank levels (0 = best) from scores; scores within `tol` of each other tie."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    level = 0
    for pos, i in enumerate(order):
        if pos > 0 and scores[order[pos - 1]] - scores[i] > tol:
            level += 1
        ranks[i] = level
    return ranks


@dataclass
class Annotator:
    """One simulated person: ranks by the gold score, then flips adjacent pairs with `flip_prob`."""

    name: str
    flip_prob: float
    rng: random.Random

    def rank(self, scores: Sequence[float]) -> list[int]:
        """Rank levels (0 = best) of K answers with this annotator's noise."""
        levels = gold_ranks(scores)
        # groups of tied answers, best first; flipping two adjacent groups swaps their levels
        groups = [[i for i, r in enumerate(levels) if r == lvl] for lvl in range(max(levels) + 1)]
        for pos in range(len(groups) - 1):
            if self.rng.random() < self.flip_prob:
                groups[pos], groups[pos + 1] = groups[pos + 1], groups[pos]
        out = [0] * len(scores)
        for lvl, group in enumerate(groups):
            for i in group:
                out[i] = lvl
        return out


def make_panel(size: int, flip_prob: float, seed: int) -> list[Annotator]:
    if not 0.0 <= flip_prob <= 0.5:
        raise ConfigError(f"flip_prob must be in [0, 0.5], got {flip_prob}")
    return [Annotator(f"sim-{i}", flip_prob, random.Random(f"{seed}-{i}")) for i in range(size)]
