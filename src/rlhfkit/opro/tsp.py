"""OPRO's travelling salesman task (Yang et al. 2023, section 3.2; the paper's code, shared/papers.md 1.3).

    n cities with integer coordinates uniform in [-100, 100]^2 (truncated with int(), as the paper's code)
    a solution: a closed tour, a permutation of 0..n-1 starting at 0; its score: the Euclidean length
    five random starting tours; the meta-prompt lists the cities as `(i): (x, y)` and the best 10 tours in
    descending order of length (best last) as `<trace> 0,3,1,... </trace>\\nlength:\\n<int>`

Where we depart from the paper's code and why: a malformed proposal (not a permutation starting at 0) is
counted and not re-sampled, so every step costs the same number of model calls. The optimum comes from exact
dynamic programming (Held-Karp) for n <= 12; above that the gap is reported against the best of the
heuristics (nearest neighbour, farthest insertion, 2-opt), which is said in the results.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from rlhfkit.config import setting

_TRACE = re.compile(r"<trace>(.*?)</trace>", re.S)
EXACT_MAX = 12  # Held-Karp: O(2^n n^2), about a second in Python at n = 12


@dataclass
class TSPSettings:
    """The `tsp` task."""

    n: int = setting(10, ge=4, le=100)
    """Number of cities."""
    seed: int = setting(0, ge=0)
    """Instance seed (the city coordinates)."""


def tour_length(points: list[tuple[int, int]], tour: tuple[int, ...]) -> float:
    """Length of the closed tour (back to its start)."""
    return sum(math.dist(points[a], points[b]) for a, b in zip(tour, tour[1:] + tour[:1], strict=True))


def held_karp(points: list[tuple[int, int]]) -> tuple[float, tuple[int, ...]]:
    """Exact shortest closed tour from city 0 by dynamic programming over subsets (Held 1962, Karp 1962):
    best[S][j] = shortest path from 0 through the cities of S ending at j."""
    n = len(points)
    d = [[math.dist(p, q) for q in points] for p in points]
    best: dict[tuple[int, int], tuple[float, int]] = {(1 << j, j): (d[0][j], 0) for j in range(1, n)}
    for size in range(2, n):
        for subset in itertools.combinations(range(1, n), size):
            bits = sum(1 << j for j in subset)
            for j in subset:
                prev = bits & ~(1 << j)
                best[(bits, j)] = min((best[(prev, k)][0] + d[k][j], k) for k in subset if k != j)
    full = (1 << n) - 2
    length, last = min((best[(full, j)][0] + d[j][0], j) for j in range(1, n))
    tour, bits = [], full
    while last:
        tour.append(last)
        bits, last = bits & ~(1 << last), best[(bits, last)][1]
    return length, (0, *reversed(tour))


def nearest_neighbour(points: list[tuple[int, int]]) -> tuple[int, ...]:
    """From city 0, always go to the nearest unvisited city."""
    tour, left = [0], set(range(1, len(points)))
    while left:
        nxt = min(left, key=lambda j: (math.dist(points[tour[-1]], points[j]), j))
        tour.append(nxt)
        left.remove(nxt)
    return tuple(tour)


def farthest_insertion(points: list[tuple[int, int]]) -> tuple[int, ...]:
    """Insert the city farthest from the tour at its cheapest place, until all are in (the paper's FI)."""
    d = lambda i, j: math.dist(points[i], points[j])  # noqa: E731
    far = max(range(1, len(points)), key=lambda j: d(0, j))
    tour, left = [0, far], set(range(1, len(points))) - {far}
    while left:
        k = max(left, key=lambda c: (min(d(c, t) for t in tour), -c))
        pos = min(range(len(tour)), key=lambda i: d(tour[i], k) + d(k, tour[(i + 1) % len(tour)])
                  - d(tour[i], tour[(i + 1) % len(tour)]))  # fmt: skip
        tour.insert(pos + 1, k)
        left.remove(k)
    return tuple(tour)


def two_opt(points: list[tuple[int, int]], tour: tuple[int, ...]) -> tuple[int, ...]:
    """Reverse segments while that shortens the tour (local search to a 2-opt optimum)."""
    best, improved = list(tour), True
    while improved:
        improved = False
        for i in range(1, len(best) - 1):
            for j in range(i + 1, len(best)):
                a, b, c, e = best[i - 1], best[i], best[j], best[(j + 1) % len(best)]
                delta = math.dist(points[a], points[c]) + math.dist(points[b], points[e])
                if delta < math.dist(points[a], points[b]) + math.dist(points[c], points[e]) - 1e-9:
                    best[i : j + 1] = reversed(best[i : j + 1])
                    improved = True
    return tuple(best)


class TravellingSalesman:
    """A solution is a tuple of city indices starting with 0; the score is the tour length (lower: better)."""

    name = "tsp"
    higher_is_better = False
    max_shown = 10

    def __init__(self, settings: TSPSettings) -> None:
        self.settings = settings
        rng = random.Random(settings.seed)
        self.points = [(int(rng.uniform(-100, 100)), int(rng.uniform(-100, 100))) for _ in range(settings.n)]
        self.heuristics = {
            "nearest_neighbour": nearest_neighbour(self.points),
            "farthest_insertion": farthest_insertion(self.points),
        }
        self.heuristics["two_opt"] = two_opt(self.points, self.heuristics["nearest_neighbour"])
        if settings.n <= EXACT_MAX:
            self.optimum_length, self.optimum = held_karp(self.points)
            self.exact = True
        else:
            self.optimum = min(self.heuristics.values(), key=self.score)
            self.optimum_length, self.exact = self.score(self.optimum), False

    def gap(self, length: float) -> float:
        """(length - optimum) / optimum, the paper's optimality gap (above n = 12: the best heuristic's)."""
        return (length - self.optimum_length) / self.optimum_length

    def initial(self, rng: random.Random) -> list[tuple[int, ...]]:
        return [self.random_solution(rng) for _ in range(5)]

    def score(self, solution: tuple[int, ...]) -> float:
        return tour_length(self.points, solution)

    def key(self, solution: tuple[int, ...]) -> tuple[int, ...]:
        return solution

    def parse(self, text: str) -> tuple[int, ...] | None:
        found = _TRACE.findall(text)
        if not found:
            return None
        try:
            tour = tuple(int(t) for t in re.split(r"[,\s]+", found[-1].strip()) if t)
        except ValueError:
            return None
        if sorted(tour) != list(range(self.settings.n)) or tour[0] != 0:
            return None
        return tour

    def meta_prompt(self, shown: list[tuple[Any, float]], rng: random.Random) -> str:
        cities = ", ".join(f"({i}): ({x}, {y})" for i, (x, y) in enumerate(self.points))
        traces = "\n\n".join(
            f"<trace> {','.join(map(str, tour))} </trace>\nlength:\n{int(length)}" for tour, length in shown
        )
        return (
            f"You are given a list of points with coordinates below: {cities}.\n\n"
            "Below are some previous traces and their lengths. The traces are arranged in descending order "
            "based on their lengths, where lower values are better.\n\n"
            f"{traces}\n\n"
            "Give me a new trace that is different from all traces above, and has a length lower than any of "
            f"the above. The trace should traverse all points exactly once. The trace should start with "
            "'<trace>' and end with </trace>."
        )

    def is_optimal(self, solution: tuple[int, ...], score: float) -> bool:
        return self.exact and score <= self.optimum_length + 1e-6

    def random_solution(self, rng: random.Random) -> tuple[int, ...]:
        rest = list(range(1, self.settings.n))
        rng.shuffle(rest)
        return (0, *rest)

    def describe(self) -> dict[str, Any]:
        lengths = {name: self.score(t) for name, t in self.heuristics.items()}
        return {"n": self.settings.n, "seed": self.settings.seed, "points": self.points,
                "optimum_length": self.optimum_length, "optimum_exact": self.exact,
                "optimum": list(self.optimum), "heuristics": lengths,
                "heuristic_gaps": {k: self.gap(v) for k, v in lengths.items()}}  # fmt: skip
