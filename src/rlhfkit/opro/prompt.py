"""OPRO's prompt optimisation (Yang et al. 2023, section 5; shared/papers.md 1.4): find the instruction that
makes a scorer model answer a task's training questions right most often.

    score(instruction) = exact-match accuracy (%) of the scorer, greedy, on the training split, with the
    instruction at the question's start ("Q_begin") or end ("Q_end")
    meta-prompt: the best 20 instructions so far, ascending by score (best last), each as
    `<INS>...</INS>\\nscore:\\n<int>`, then 3 training exemplars picked at random each step, then the
    request for a new instruction between <INS> and </INS> (the paper's wording for instruction-tuned
    optimizers)

The starting instruction is the paper's "Let's solve the problem."; at the end the best instruction, "Let's
think step by step." and the empty instruction are scored on the held-out split. Where we depart: the
paper's A_begin position needs a pre-trained (not chat) scorer whose answer can be prefilled, which the
chat interface does not offer, so only Q_begin and Q_end are here. The random-search baseline draws
instructions of 3 to 8 words from the words of the starting and reference instructions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from rlhfkit.chat.llm import LLM
from rlhfkit.config import setting
from rlhfkit.opro.reasoning import TASKS, make_split
from rlhfkit.rollout.engine import SamplingConfig

INITIAL = "Let's solve the problem."
REFERENCES = {"step by step": "Let's think step by step.", "empty": ""}
_INS = re.compile(r"<INS>(.*?)</INS>", re.S)
_BASELINE_WORDS = ("let's solve the problem think step by carefully answer first then check work out "
                   "each part final be precise").split()  # fmt: skip


@dataclass
class PromptSettings:
    """The `prompt` task."""

    task: Literal[
        "boolean_expressions", "multistep_arithmetic", "word_sorting", "object_counting", "navigate", "dyck",
        "word_problems",
    ] = "multistep_arithmetic"  # fmt: skip
    """Which generated reasoning task."""
    train: int = setting(20, ge=1)
    """Training questions: every instruction is scored on all of them."""
    test: int = setting(60, ge=1)
    """Held-out questions for the final comparison."""
    seed: int = setting(0, ge=0)
    """Seed of the generated questions."""
    position: Literal["Q_begin", "Q_end"] = "Q_begin"
    """Where the instruction goes: before the question, or after it."""
    max_new_tokens: int = setting(96, ge=1)
    """Longest scorer answer."""


class PromptOptimisation:
    """A solution is an instruction; its score is the scorer's training accuracy in % (higher: better)."""

    name = "prompt"
    higher_is_better = True
    max_shown = 20

    def __init__(self, settings: PromptSettings, scorer: LLM) -> None:
        self.settings = settings
        self.task = TASKS[settings.task]
        self.train, self.test = make_split(self.task, settings.train, settings.test, settings.seed)
        self.scorer = scorer
        self.sampling = SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=0.0)
        self._cache: dict[str, float] = {}

    def accuracy(self, instruction: str, rows: list[tuple[str, str]]) -> float:
        """Exact-match accuracy (0..1) of the scorer on `rows` with this instruction, greedy."""

        def ask(question: str) -> str:
            if not instruction:
                return question
            return (
                f"{instruction}\n{question}"
                if self.settings.position == "Q_begin"
                else f"{question}\n{instruction}"
            )

        replies = self.scorer.chat(
            [[{"role": "user", "content": ask(q)}] for q, _ in rows], self.sampling, seed=0
        )
        return sum(self.task.check(r[0].text, a) for r, (_, a) in zip(replies, rows, strict=True)) / len(rows)

    def initial(self, rng: random.Random) -> list[str]:
        return [INITIAL]

    def score(self, solution: str) -> float:
        if solution not in self._cache:
            self._cache[solution] = 100.0 * self.accuracy(solution, self.train)
        return self._cache[solution]

    def key(self, solution: str) -> str:
        return " ".join(solution.split()).lower()

    def parse(self, text: str) -> str | None:
        found = _INS.findall(text)
        instruction = " ".join(found[-1].split()) if found else ""
        return instruction if 0 < len(instruction) <= 500 else None

    def meta_prompt(self, shown: list[tuple[Any, float]], rng: random.Random) -> str:
        history = "\n\n".join(f"<INS>{ins}</INS>\nscore:\n{round(score)}" for ins, score in shown)
        exemplars = "\n\n".join(
            f"input:\nQ: <INS>\n{q}\nA:\noutput:\n{a}"
            for q, a in rng.sample(self.train, min(3, len(self.train)))
        )
        return (
            "Your task is to generate the instruction <INS>. Below are some previous instructions with their "
            "scores. The score ranges from 0 to 100.\n\n"
            f"{history}\n\n"
            "Below are some problems.\n\n"
            f"{exemplars}\n\n"
            "Generate an instruction that is different from all the instructions <INS> above, and has a "
            "higher score than all the instructions <INS> above. The instruction should begin with <INS> and "
            "end with </INS>. The instruction should be concise, effective, and generally applicable to all "
            "problems above."
        )

    def is_optimal(self, solution: str, score: float) -> bool:
        return score >= 100.0

    def random_solution(self, rng: random.Random) -> str:
        words = [rng.choice(_BASELINE_WORDS) for _ in range(rng.randint(3, 8))]
        return " ".join(words).capitalize() + "."

    def describe(self) -> dict[str, Any]:
        return {"task": self.settings.task, "train": len(self.train), "test": len(self.test),
                "position": self.settings.position, "seed": self.settings.seed}  # fmt: skip

    def test_accuracies(self, best: str) -> dict[str, float]:
        """Held-out accuracy (%) of the best instruction found, the starting one and the references."""
        candidates = {"best found": best, "initial": INITIAL, **REFERENCES}
        return {name: 100.0 * self.accuracy(ins, self.test) for name, ins in candidates.items()}
