"""Reasoning tasks for prompt optimisation, generated offline with exact answers, in the style of Big-Bench
Hard (Suzgun et al. 2022) and GSM8K (Cobbe et al. 2021): boolean expressions, multi-step arithmetic, word
sorting, object counting, navigate, Dyck languages, and arithmetic word problems.

Each task is a generator `(rng) -> (question, answer)` and a checker that reads the answer off the end of a
model's reply the way BBH's evaluation does (the last number, the last True/False, Yes/No, the sorted words
or the closing brackets), so a reply that reasons first and answers last is scored right.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

WORDS = ("apple banana cherry dune ember fable grove harbor iris jade kite lemon maple noble orbit pearl "
         "quartz river sable tulip umber velvet willow xenon yarrow zephyr").split()  # fmt: skip
FRUITS = ("apple", "banana", "plum", "peach", "orange", "grape", "strawberry")
OTHERS = ("chair", "violin", "car", "lamp", "dog", "book")
NUMBER_WORDS = ("a", "two", "three", "four", "five")
PEOPLE = ("Tom", "Ana", "Lee", "Maya", "Omar", "Zoe")
ITEMS = ("apples", "stickers", "marbles", "books", "coins", "cookies")


@dataclass(frozen=True)
class ReasoningTask:
    name: str
    generate: Callable[[random.Random], tuple[str, str]]
    check: Callable[[str, str], bool]


# ------------------------------------------------------------------------------------------- checkers
def _last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def check_number(reply: str, answer: str) -> bool:
    last = _last(r"-?\d+(?:\.\d+)?", reply.replace(",", ""))
    return last is not None and float(last) == float(answer)


def check_word(options: tuple[str, ...]) -> Callable[[str, str], bool]:
    def check(reply: str, answer: str) -> bool:
        last = _last(r"\b(" + "|".join(options) + r")\b", reply)
        return last is not None and last.lower() == answer.lower()

    return check


def check_sorted_words(reply: str, answer: str) -> bool:
    words = answer.split()
    found = re.findall(r"[a-z]+", reply.lower())
    return found[-len(words) :] == words if len(found) >= len(words) else False


def check_brackets(reply: str, answer: str) -> bool:
    closing = re.findall(r"[)\]}>]", reply)
    return "".join(closing[-len(answer.split()) :]) == answer.replace(" ", "")


# ------------------------------------------------------------------------------------------- generators
def boolean_expressions(rng: random.Random) -> tuple[str, str]:
    def expr(depth: int) -> tuple[str, bool]:
        if depth == 0 or rng.random() < 0.3:
            value = rng.random() < 0.5
            text, value = (f"not {value}", not value) if rng.random() < 0.3 else (str(value), value)
            return text, value
        (a, va), (b, vb) = expr(depth - 1), expr(depth - 1)
        if rng.random() < 0.5:
            return f"( {a} and {b} )", va and vb
        return f"( {a} or {b} )", va or vb

    text, value = expr(2)
    return f"Evaluate the result of a random Boolean expression.\n\n{text} is", str(value)


def multistep_arithmetic(rng: random.Random) -> tuple[str, str]:
    def term() -> tuple[str, int]:
        a, b, op = rng.randint(-9, 9), rng.randint(-9, 9), rng.choice("+-*")
        return f"({a} {op} {b})", {"+": a + b, "-": a - b, "*": a * b}[op]

    (x, vx), (y, vy) = term(), term()
    op = rng.choice("+-*")
    return f"Solve the arithmetic expression.\n\n({x} {op} {y}) =", str(
        {"+": vx + vy, "-": vx - vy, "*": vx * vy}[op]
    )


def word_sorting(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(4, 7))
    return f"Sort the following words alphabetically: List: {' '.join(words)}", " ".join(sorted(words))


def object_counting(rng: random.Random) -> tuple[str, str]:
    counts = {f: rng.randint(1, 3) for f in rng.sample(FRUITS, rng.randint(2, 4))}
    things = [f"{NUMBER_WORDS[n - 1]} {f}{'s' if n > 1 else ''}" for f, n in counts.items()]
    things += [f"a {o}" for o in rng.sample(OTHERS, rng.randint(0, 2))]
    rng.shuffle(things)
    listed = ", ".join(things[:-1]) + f", and {things[-1]}"
    return f"I have {listed}. How many fruits do I have?", str(sum(counts.values()))


def navigate(rng: random.Random) -> tuple[str, str]:
    position, facing, steps = 0, 1, []
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.3:
            facing = -facing
            steps.append("Turn around.")
        else:
            n = rng.randint(1, 6)
            position += facing * n
            steps.append(f"Take {n} step{'s' if n > 1 else ''}.")
    question = "If you follow these instructions, do you return to the starting point? " + " ".join(steps)
    return question, "Yes" if position == 0 else "No"


def dyck(rng: random.Random) -> tuple[str, str]:
    pairs = {"(": ")", "[": "]", "{": "}", "<": ">"}
    stack: list[str] = []
    seq: list[str] = []
    for _ in range(rng.randint(4, 8)):
        if stack and rng.random() < 0.35:
            seq.append(pairs[stack.pop()])
        else:
            opener = rng.choice(list(pairs))
            stack.append(opener)
            seq.append(opener)
    if not stack:
        opener = rng.choice(list(pairs))
        stack.append(opener)
        seq.append(opener)
    answer = " ".join(pairs[o] for o in reversed(stack))
    question = ("Complete the rest of the sequence, making sure that the parentheses are closed properly. "
                f"Input: {' '.join(seq)}")  # fmt: skip
    return question, answer


def word_problems(rng: random.Random) -> tuple[str, str]:
    who, item = rng.choice(PEOPLE), rng.choice(ITEMS)
    boxes, per, start, gave = rng.randint(2, 6), rng.randint(3, 12), rng.randint(1, 20), rng.randint(1, 9)
    question = (
        f"{who} buys {boxes} boxes of {item} with {per} {item} in each box. {who} already had {start} "
        f"{item} and gives {gave} to a friend. How many {item} does {who} have now?"
    )
    return question, str(boxes * per + start - gave)


TASKS = {
    "boolean_expressions": ReasoningTask(
        "boolean_expressions", boolean_expressions, check_word(("True", "False"))
    ),
    "multistep_arithmetic": ReasoningTask("multistep_arithmetic", multistep_arithmetic, check_number),
    "word_sorting": ReasoningTask("word_sorting", word_sorting, check_sorted_words),
    "object_counting": ReasoningTask("object_counting", object_counting, check_number),
    "navigate": ReasoningTask("navigate", navigate, check_word(("Yes", "No"))),
    "dyck": ReasoningTask("dyck", dyck, check_brackets),
    "word_problems": ReasoningTask("word_problems", word_problems, check_number),
}


def make_split(task: ReasoningTask, train: int, test: int, seed: int) -> tuple[list[tuple[str, str]], ...]:
    """Distinct (question, answer) pairs: `train` for the optimisation, `test` held out."""
    rng, seen = random.Random(seed), set()
    rows: list[tuple[str, str]] = []
    while len(rows) < train + test:
        question, answer = task.generate(rng)
        if question not in seen:
            seen.add(question)
            rows.append((question, answer))
    return rows[:train], rows[train:]
