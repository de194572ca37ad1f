"""What OPRO needs from a task: start solutions, how a solution is shown, parsed, scored and compared.

A task is a small object; the loop (`opro.loop`) never looks inside a solution. Scores are floats where
`higher_is_better` says which way is up (a loss for `linreg` and `tsp`, an accuracy for `prompt`).
"""

from __future__ import annotations

import random
from typing import Any, Protocol


class Task(Protocol):
    """An optimisation problem the LLM proposes solutions for."""

    name: str
    higher_is_better: bool
    max_shown: int
    """How many past solutions the meta-prompt shows (the paper: 20 for linreg and prompts, 10 for TSP)."""

    def initial(self, rng: random.Random) -> list[Any]:
        """The starting solutions (the paper: 5 for linreg and TSP, one instruction for prompts)."""
        ...

    def score(self, solution: Any) -> float:
        """The objective of a solution (exact, deterministic)."""
        ...

    def key(self, solution: Any) -> Any:
        """A hashable identity: proposals equal to a solution already scored are not scored again."""
        ...

    def parse(self, text: str) -> Any | None:
        """The solution a model's answer proposes, or None when it is malformed."""
        ...

    def meta_prompt(self, shown: list[tuple[Any, float]], rng: random.Random) -> str:
        """The meta-prompt for one step; `shown` holds the best past solutions, worst first, best last."""
        ...

    def is_optimal(self, solution: Any, score: float) -> bool:
        """True when nothing better exists (the loop stops early)."""
        ...

    def random_solution(self, rng: random.Random) -> Any:
        """A uniformly random valid solution: the random-search baseline at equal evaluations."""
        ...

    def describe(self) -> dict[str, Any]:
        """The instance, for the report (true parameters, optimum, heuristics' scores)."""
        ...


def best_score(task: Task, entries: list[dict[str, Any]]) -> float | None:
    """The best score among history entries (dicts with a "score"); None for none."""
    scores = [e["score"] for e in entries]
    if not scores:
        return None
    return max(scores) if task.higher_is_better else min(scores)
