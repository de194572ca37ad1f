"""OPRO's linear regression task (Yang et al. 2023, section 3.1; the paper's code, as summarised in
shared/papers.md 1.2): find integer (w, b) minimising the squared error of y = w x + b on 50 noisy points.

    x = 1..50,  y = w_true x + b_true + N(0, 1)  (numpy seed `seed + 1`)
    loss(w, b) = ||y - (w x + b)||^2 (a sum, as in the paper's code)
    five starting pairs: w and b uniform in [10, 20], rounded (numpy seeds 10 (seed + 1), 100 (seed + 1))

The meta-prompt shows the best 20 pairs in descending order of loss (best last), each as
`input:\\nw=.., b=..\\nvalue:\\n<int loss>`, and asks for a new pair ending with `[w, b]`; the last `[...]`
of the answer is parsed and rounded. The optimum is the exact integer argmin (a convex quadratic: for each
w near the continuous optimum, the best b is the rounding of its continuous optimum or a neighbour), which
for the paper's (w_true, b_true) is those values themselves.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhfkit.config import setting

_PAIR = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


@dataclass
class LinRegSettings:
    """The `linreg` task."""

    w: int = 15
    """True slope (the paper's cases: (15, 14), (17, 17), (16, 10), (3, 5), (25, 23), (2, 30), (36, -1))."""
    b: int = 14
    """True intercept."""
    seed: int = setting(0, ge=0)
    """Instance seed: the noise and the starting pairs (the paper's i_rep)."""
    search_range: int = setting(50, ge=1)
    """Random search draws w and b uniformly from [-range, range] (a box holding the paper's cases)."""


class LinearRegression:
    """A (w, b) pair is a tuple of two ints; the score is the loss (lower is better)."""

    name = "linreg"
    higher_is_better = False
    max_shown = 20

    def __init__(self, settings: LinRegSettings) -> None:
        self.settings = settings
        self.x = np.arange(50, dtype=np.float64) + 1  # (50,)
        noise = np.random.RandomState(settings.seed + 1).randn(50)  # the paper: np.random.seed(i_rep + 1)
        self.y = self.x * settings.w + settings.b + noise  # (50,)
        self.optimum = self._integer_argmin()
        self.optimum_loss = self.score(self.optimum)

    def _integer_argmin(self) -> tuple[int, int]:
        a = np.stack([self.x, np.ones_like(self.x)], axis=1)  # (50, 2)
        w_star, _ = np.linalg.lstsq(a, self.y, rcond=None)[0]
        best: tuple[float, tuple[int, int]] | None = None
        for w in range(int(np.floor(w_star)) - 3, int(np.ceil(w_star)) + 4):
            b_cont = float(np.mean(self.y - w * self.x))  # the best b for this w
            for b in range(int(np.floor(b_cont)) - 1, int(np.ceil(b_cont)) + 2):
                loss = self.score((w, b))
                if best is None or loss < best[0]:
                    best = (loss, (w, b))
        assert best is not None
        return best[1]

    def initial(self, rng: random.Random) -> list[tuple[int, int]]:
        seed = self.settings.seed
        ws = np.random.RandomState((seed + 1) * 10).uniform(10, 20, 5)
        bs = np.random.RandomState((seed + 1) * 100).uniform(10, 20, 5)
        return [(round(w), round(b)) for w, b in zip(ws, bs, strict=True)]

    def score(self, solution: tuple[int, int]) -> float:
        w, b = solution
        return float(np.sum((self.y - (w * self.x + b)) ** 2))

    def key(self, solution: tuple[int, int]) -> tuple[int, int]:
        return solution

    def parse(self, text: str) -> tuple[int, int] | None:
        found = _PAIR.findall(text)
        if not found:
            return None
        w, b = found[-1]
        return round(float(w)), round(float(b))

    def meta_prompt(self, shown: list[tuple[Any, float]], rng: random.Random) -> str:
        pairs = "\n\n".join(f"input:\nw={w}, b={b}\nvalue:\n{int(loss)}" for (w, b), loss in shown)
        return (
            "Now you will help me minimize a function with two input variables w, b. I have some (w, b) "
            "pairs and the function values at those points. The pairs are arranged in descending order "
            "based on their function values, where lower values are better.\n\n"
            f"{pairs}\n\n"
            "Give me a new (w, b) pair that is different from all pairs above, and has a function value "
            "lower than any of the above. Do not write code. The output must end with a pair [w, b], where "
            "w and b are numerical values."
        )

    def is_optimal(self, solution: tuple[int, int], score: float) -> bool:
        return solution == self.optimum

    def random_solution(self, rng: random.Random) -> tuple[int, int]:
        r = self.settings.search_range
        return rng.randint(-r, r), rng.randint(-r, r)

    def describe(self) -> dict[str, Any]:
        return {"w_true": self.settings.w, "b_true": self.settings.b, "seed": self.settings.seed,
                "optimum": list(self.optimum), "optimum_loss": self.optimum_loss}  # fmt: skip
