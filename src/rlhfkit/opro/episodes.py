"""OPRO histories as RL data (beyond the paper): every step's meta-prompt with each proposal
the optimizer wrote and how much it improved on the best solution it was shown, and the reward that lets
`rlhfkit grpo` train an optimizer on such meta-prompts.

    rlhfkit opro linreg --optimizer runs/sft --export-episodes episodes.jsonl
    rlhfkit grpo --policy runs/sft --prompts episodes.jsonl --reward-fn rlhfkit.opro.episodes:improvement

A record is an RL prompt (`{"prompt": [user: meta-prompt]}`) whose extra fields carry the task, its
settings and the best score shown, so `improvement` can rebuild the task and score any new proposal; the
proposal the optimizer actually wrote and its improvement are kept too (`completion`, `improvement`).
Improvement is relative: (best shown - score) / |best shown| for a loss, the reverse for an accuracy,
clipped to [-1, 1]; a malformed proposal gets -1. `prompt` tasks are not exported: scoring them needs the
scorer model.
"""

from __future__ import annotations

import dataclasses
import json
import random
from functools import lru_cache
from typing import Any

from rlhfkit.opro.linreg import LinearRegression, LinRegSettings
from rlhfkit.opro.task import Task, best_score
from rlhfkit.opro.tsp import TravellingSalesman, TSPSettings


def relative_improvement(task: Task, best_shown: float, score: float) -> float:
    gain = (score - best_shown) if task.higher_is_better else (best_shown - score)
    return max(-1.0, min(1.0, gain / max(abs(best_shown), 1e-12)))


def episodes(task: Task, settings: Any, entries: list[dict[str, Any]], steps: int, seed: int) -> list[dict]:
    """One record per proposal the optimizer wrote that was scored, with the meta-prompt it answered."""
    records = []
    for step in range(1, steps + 1):
        before = [e for e in entries if e["step"] < step]
        ranked = sorted(before, key=lambda e: e["score"], reverse=not task.higher_is_better)
        shown = [(tuple(e["solution"]) if isinstance(e["solution"], list) else e["solution"], e["score"])
                 for e in ranked[-task.max_shown :]]  # fmt: skip
        meta = task.meta_prompt(shown, random.Random(seed * 7919 + step))  # as the loop built it
        best = best_score(task, before)
        for entry in (e for e in entries if e["step"] == step):
            assert best is not None  # the starting solutions (step 0) were scored before any proposal
            records.append({
                "prompt": [{"role": "user", "content": meta}], "task": task.name,
                "settings": dataclasses.asdict(settings), "best_shown": best,
                "completion": entry.get("text", ""),
                "improvement": relative_improvement(task, best, entry["score"]),
            })  # fmt: skip
    return records


@lru_cache(maxsize=64)
def _task(name: str, settings: str) -> Task:
    values = json.loads(settings)
    return (
        LinearRegression(LinRegSettings(**values))
        if name == "linreg"
        else TravellingSalesman(TSPSettings(**values))
    )


def improvement(prompts: list[str], completions: list[str], task: list[str], settings: list[dict],
                best_shown: list[float], **_: Any) -> list[float]:  # fmt: skip
    """Reward for `rlhfkit grpo --reward-fn rlhfkit.opro.episodes:improvement` on exported episodes: the
    relative improvement of the proposal over the best solution the meta-prompt showed; -1 if malformed."""
    rewards = []
    for text, name, values, best in zip(completions, task, settings, best_shown, strict=True):
        problem = _task(name, json.dumps(values, sort_keys=True))
        solution = problem.parse(text)
        rewards.append(
            -1.0 if solution is None else relative_improvement(problem, best, problem.score(solution))
        )
    return rewards
