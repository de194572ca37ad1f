"""The lake of the `commons` environment: GovSim's fishery dynamics, its metrics, the scripted fishers and
the tasks (Piatti et al. 2024, "Cooperate or Collapse", arXiv 2312.04350; giorgiopiatti/GovSim,
`simulation/scenarios/common/environment/concurrent_env.py`). No text and no model here: `agents.commons`
renders the lake for a model.

A month, as GovSim plays it:
1. every fisher states a catch (its wish, an integer number of tons);
2. if the wishes fit in the lake everyone gets its wish; else the tons are handed out one at a time, each
   to a fisher drawn uniformly among those who still want more, until the lake is empty (GovSim's
   "stochastic" rule, here from a `random.Random` seeded by the task, so a task replays exactly);
3. if fewer than `threshold` tons are left the lake collapses and the season ends (GovSim: 5 of 100);
4. else the fish left multiply by `regrowth`, capped at `capacity` (GovSim: doubles, capped at 100).
The season lasts `months` months (GovSim: 12).

Where we depart from GovSim, and why: tasks vary the number of fishers, capacity, starting stock and
regrowth (GovSim: 5 fishers, a full lake of 100 that doubles), so an agent must read the lake rather than
learn one number; the collapse threshold scales with capacity (capacity // 20, GovSim's 5 at 100). The
sustainable share generalises GovSim's universalization threshold `(stock // 2) // n` to any regrowth r:
the most each of n fishers may take so that the fish left regrow to at least this month's stock,
`(stock - ceil(stock / r)) // n`, which is `(stock // 2) // n` when r = 2. The one-ton draws run only when
the wishes exceed the lake (GovSim also draws when they fit; the result is the same).

Metrics (GovSim's, paper sec. 2.3): survival time (the month the lake collapsed in, or `months` if it did
not: GovSim counts a collapse in month 1 as 1), survived (all months), total and per-fisher catch, equality
(1 - Gini of the fishers' totals), over-use (the share of stated catches above that month's sustainable
share: an action, as GovSim counts it, even if the allocation gave less) and efficiency (total catch over
the most a lake at capacity yields sustainably in the season, months x (capacity - ceil(capacity / r))).

Scripted fishers (the population the learning seat trains against):
    fair         the sustainable share every month;
    greedy       stock // n every month (an equal split of the whole lake: with 4 fair fishers a lake of 100
                 shrinks by a fifth a month and collapses near month 12);
    retaliating  fair until another fisher states a catch above a month's sustainable share, then greedy;
    random       uniform in [0, stock // n], from a task-seeded generator of its own.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

from rlhfkit.agents.env import Split, Task, generated_split

SIZES = {"train": 2000, "test": 200}
MONTHS = 12
CHARACTERS = {"fair": 0.4, "retaliating": 0.25, "greedy": 0.15, "random": 0.2}
"""The scripted characters and how often a task draws each for a seat other than the agent's."""
AGENT = "agent"
NAMES = ["John", "Kate", "Jack", "Emma", "Luke", "Mia", "Omar", "Sofia", "Ivan", "Priya", "Tom", "Lena"]


class Chooser(Protocol):
    def choice(self, seq: Sequence[int]) -> int: ...


# ------------------------------------------------------------------------------------------ dynamics
def sustainable_share(stock: int, n: int, regrowth: Fraction) -> int:
    """The most each of `n` fishers may catch so that the fish left regrow to `stock`:
    (stock - ceil(stock / r)) // n; GovSim's universalization threshold (stock // 2) // n for r = 2."""
    keep = math.ceil(Fraction(stock) / regrowth)
    return max(0, stock - keep) // n


def regrow(left: int, regrowth: Fraction, capacity: int) -> int:
    """The stock next month: floor(left x r), at most `capacity` (GovSim: min(100, 2 x left))."""
    return min(capacity, math.floor(left * regrowth))


def allocate(wishes: Sequence[int], stock: int, rng: Chooser) -> list[int]:
    """Each fisher's catch: its wish when the wishes fit in the lake, else GovSim's stochastic rule (one ton
    at a time to a fisher drawn among those who still want more, until the lake is empty)."""
    if sum(wishes) <= stock:
        return list(wishes)
    want, got = list(wishes), [0] * len(wishes)
    for _ in range(stock):
        i = rng.choice([k for k, w in enumerate(want) if w > 0])
        want[i] -= 1
        got[i] += 1
    return got


def gini(values: Sequence[float]) -> float:
    """G = sum_i sum_j |x_i - x_j| / (2 n^2 mean); 0 when all are equal (all zero included)."""
    n, total = len(values), sum(values)
    if n == 0 or total == 0:
        return 0.0
    return sum(abs(a - b) for a in values for b in values) / (2 * n * total)


@dataclass(frozen=True)
class Month:
    """One month of a season, as every fisher saw it."""

    number: int  # 1-based
    stock: int  # tons in the lake before fishing
    share: int  # the sustainable share of this month
    wishes: tuple[int, ...]  # the catches the fishers stated
    catches: tuple[int, ...]  # what they got
    left: int  # tons left after fishing
    regrown: int  # the stock next month (0 after a collapse)
    messages: tuple[str, ...]  # what each fisher said, read by the others next month
    collapsed: bool


@dataclass
class Fishery:
    """A season on one lake (see the module docstring): `play` one month at a time until `over`."""

    names: list[str]
    capacity: int
    stock: int
    regrowth: Fraction
    threshold: int
    months: int
    seed: int
    history: list[Month] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"commons-allocation:{self.seed}")

    @classmethod
    def from_task(cls, task: Task) -> Fishery:
        d = task.data
        return cls(list(d["names"]), d["capacity"], d["stock"], Fraction(d["regrowth"]), d["threshold"],
                   d["months"], d["seed"])  # fmt: skip

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def month(self) -> int:
        """The month about to be fished (1-based)."""
        return len(self.history) + 1

    @property
    def collapsed(self) -> bool:
        return bool(self.history) and self.history[-1].collapsed

    @property
    def over(self) -> bool:
        return self.collapsed or len(self.history) >= self.months

    def share(self) -> int:
        """This month's sustainable share."""
        return sustainable_share(self.stock, self.n, self.regrowth)

    def play(self, wishes: Sequence[int], messages: Sequence[str]) -> Month:
        """Fish one month: allocate, check collapse, regrow."""
        if self.over:
            raise RuntimeError("the season is over")
        if len(wishes) != self.n or len(messages) != self.n or min(wishes) < 0:
            raise ValueError(f"play needs {self.n} catches >= 0 and {self.n} messages, got {wishes}")
        catches = allocate(wishes, self.stock, self.rng)
        left = self.stock - sum(catches)
        collapsed = left < self.threshold
        regrown = 0 if collapsed else regrow(left, self.regrowth, self.capacity)
        month = Month(self.month, self.stock, self.share(), tuple(wishes), tuple(catches), left, regrown,
                      tuple(messages), collapsed)  # fmt: skip
        self.history.append(month)
        self.stock = regrown
        return month

    def totals(self) -> list[int]:
        return [sum(m.catches[i] for m in self.history) for i in range(self.n)]

    def sustainable_season(self) -> int:
        """What one fisher catches in a season of sustainable shares of a full lake (the return's unit)."""
        return max(1, self.months * sustainable_share(self.capacity, self.n, self.regrowth))

    def metrics(self, seat: int) -> dict[str, float]:
        """GovSim's metrics of the season so far (see the module docstring), and `seat`'s own."""
        totals, played = self.totals(), len(self.history)
        over = [m.wishes[i] > m.share for m in self.history for i in range(self.n)]
        own = [m.wishes[seat] > m.share for m in self.history]
        best = self.months * (self.capacity - math.ceil(Fraction(self.capacity) / self.regrowth))
        return {
            "survival_months": float(played),
            "survived": float(played == self.months and not self.collapsed),
            "total_catch": float(sum(totals)),
            "mean_catch": sum(totals) / self.n,
            "own_catch": float(totals[seat]),
            "equality": 1.0 - gini(totals),
            "over_use": sum(over) / len(over) if over else 0.0,
            "own_over_use": sum(own) / len(own) if own else 0.0,
            "efficiency": sum(totals) / best if best > 0 else 0.0,
        }


# ------------------------------------------------------------------------------------------ scripted fishers
def in_tons(n: int) -> str:
    """ "1 ton", "12 tons"."""
    return f"{n} ton" if n == 1 else f"{n} tons"


def scripted_turn(character: str, fishery: Fishery, seat: int, rng: random.Random) -> tuple[int, str]:
    """A scripted fisher's (catch, message) this month, from the lake as every fisher sees it."""
    share, greedy = fishery.share(), fishery.stock // fishery.n
    if character == "fair":
        return share, f"Let's each keep to {in_tons(share)} so the lake can refill."
    if character == "greedy":
        return greedy, f"I'm taking {in_tons(greedy)}. The fish are there to be caught."
    if character == "retaliating":
        over = {i for m in fishery.history for i, w in enumerate(m.wishes) if i != seat and w > m.share}
        culprits = [fishery.names[i] for i in sorted(over)]
        if culprits:
            return (
                greedy,
                f"{', '.join(culprits)} took more than their share, so I'm taking {in_tons(greedy)} too.",
            )
        return share, f"I keep to {in_tons(share)} as long as everyone does."
    if character == "random":
        catch = rng.randint(0, greedy)
        return catch, rng.choice(["", "Good luck, everyone.", f"I'll take {in_tons(catch)}."])
    raise ValueError(f"unknown fisher character {character!r}: use one of {', '.join(CHARACTERS)}")


def fisher_rng(task: Task, seat: int) -> random.Random:
    """The generator of a scripted fisher (only `random` draws from it)."""
    return random.Random(f"commons-fisher:{task.data['seed']}:{seat}")


# ------------------------------------------------------------------------------------------ tasks
def draw(rng: random.Random, months: int) -> tuple[str, dict[str, Any]]:
    """One task: (prompt, data) with names, seat (the agent's), characters (AGENT at the seat), capacity,
    stock, regrowth (a fraction as text), threshold, months and the seed of the lake's draws."""
    n = rng.choices([3, 4, 5, 6], weights=[0.2, 0.25, 0.35, 0.2])[0]
    capacity = rng.choice([60, 80, 100, 100, 120, 150, 200])
    stock = capacity * rng.choice([4, 4, 4, 3, 2]) // 4
    regrowth = rng.choice(["2", "2", "2", "3/2", "3"])
    names = rng.sample(NAMES, n)
    seat = rng.randrange(n)
    characters = rng.choices(list(CHARACTERS), weights=list(CHARACTERS.values()), k=n)
    characters[seat] = AGENT
    data = {"names": names, "seat": seat, "characters": characters, "capacity": capacity, "stock": stock,
            "regrowth": regrowth, "threshold": max(1, capacity // 20), "months": months,
            "seed": rng.randrange(2**31)}  # fmt: skip
    prompt = f"A fishing season of {months} months on a lake shared by {n} fishers; you are {names[seat]}."
    return prompt, data


def task_key(prompt: str, data: dict[str, Any]) -> str:
    """What makes two tasks the same game: everything but the names and the seed of the draws."""
    keep = ("seat", "characters", "capacity", "stock", "regrowth", "months")
    return json.dumps([data[k] for k in keep])


@functools.cache
def make_tasks(split: Split, months: int = MONTHS) -> tuple[Task, ...]:
    """The tasks of a split, the same on every call and machine; no test game is a train game."""
    return generated_split("commons", split, SIZES, lambda rng: draw(rng, months), task_key)
