"""Read dataset files and validate every record before any training starts.

Nothing is tokenised here: each row becomes a typed, frozen record, and the first bad row stops
the load with a one-line ``DataError`` such as ``train.jsonl:3: field 'rejected': is identical to 'chosen'``.

File types and how a record's line is counted: `rlhfkit.data.files`.

Record formats (TRL's conventions). A *prompt* is a non-empty string or a non-empty list of
messages ending with a user or tool turn. An *answer* is a non-empty string or a non-empty list
of assistant messages, in the same form as its prompt (both strings or both message lists).
A message is ``{"role": R, "content": S}`` with R one of system, user, assistant, tool and S a
string (non-empty for user and assistant); other keys are dropped.

* SFT: ``{"prompt": P, "completion": A}``, or ``{"messages": [...]}`` ending with an assistant
  turn, normalised to ``prompt = messages[:-1]`` and ``completion = [messages[-1]]`` (SFT learns that
  last turn; with ``assistant_turns: all`` it learns every assistant turn of ``conversation``).
  Checked in order: messages, or prompt then completion (a row may not mix the two forms).
* Preference pair: ``{"prompt": P, "chosen": A, "rejected": A, "margin": x}``; margin is an
  optional finite number (default 0.0). Checked in order: prompt, chosen, rejected
  (must differ from chosen), margin.
* Ranking: ``{"prompt": P, "completions": [A, A, ...], "ranking": [2, [0, 3], 1]}``: at least
  2 distinct answers; the ranking lists completion indices best to worst, a nested list being a
  tie, and must use each index exactly once and have at least two levels. In Parquet and
  ``datasets`` lists are homogeneous, so write every level as a list: ``[[2], [0, 3], [1]]``.
  Normalised to ``ranks`` (level per completion, 0 = best). Checked in order: prompt,
  completions (no duplicates), ranking. A preference file may mix pairs and rankings: a row with
  ``completions`` is a ranking and may not also have chosen, rejected or margin.
* Trajectory ranking: ``{"prompt": [...], "episodes": [...], "ranking": [...]}``, a ranked group of whole
  agent episodes (`rlhfkit.data.trajectories`); a preference file may mix it with pairs and rankings.
* Prompt-only (RL): ``{"prompt": P, ...}``; every other field is kept in ``fields``.

Fields other than those named above are ignored (SFT and preference files).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from rlhfkit.config import setting
from rlhfkit.data.checks import (
    Source,
    check_messages,
    check_text,
    fail,
    parse_ranks,
    require,
)
from rlhfkit.data.files import Row, read_rows, type_name
from rlhfkit.data.trajectories import TrajectoryRecord, trajectory_record
from rlhfkit.errors import ConfigError, DataError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

Prompt: TypeAlias = str | list[dict[str, str]]
Answer: TypeAlias = str | list[dict[str, str]]
T = TypeVar("T")


# --------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SFTRecord:
    prompt: Prompt
    completion: Answer
    source: Source
    answer_field: str = dataclasses.field(default="completion", compare=False)
    """The field the answer came from ("messages" for a conversation), for error messages."""

    @property
    def conversation(self) -> list[dict[str, str]] | None:
        """The whole conversation of a `messages` record (None for a prompt/completion record)."""
        if self.answer_field != "messages" or not isinstance(self.prompt, list):
            return None
        return [*self.prompt, *self.completion] if isinstance(self.completion, list) else None


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: Prompt
    chosen: Answer
    rejected: Answer
    margin: float
    source: Source


@dataclass(frozen=True)
class RankingRecord:
    prompt: Prompt
    completions: tuple[Answer, ...]
    ranks: tuple[int, ...]  # level of each completion: 0 = best, tied completions share a level
    source: Source

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs with different levels, ordered by better then worse."""
        n = len(self.ranks)
        return [(i, j) for i in range(n) for j in range(n) if self.ranks[i] < self.ranks[j]]


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    fields: dict[str, Any]  # every other field of the row, e.g. "answer" for a verifiable task
    source: Source


@dataclass
class DataSettings:
    """Which data a supervised stage (SFT, reward model, DPO) trains on and how it is cut to length: the
    `data` section of their configs (`--data FILE` sets `data.path`)."""

    path: str = ""
    """Training data (.jsonl/.json/.parquet/.csv or a datasets directory); `bundled:NAME` = shipped data."""
    eval_path: str | None = None
    """Held-out data; if unset, `eval_fraction` of `path` is held out."""
    eval_fraction: float = setting(0.05, ge=0, lt=1)
    """Fraction of the records of `path` held out for evaluation when `eval_path` is unset."""
    max_length: int = setting(512, ge=2)
    """Longest prompt + answer in tokens."""
    truncation: bool = False
    """Cut over-long answers instead of stopping with an error naming the record (records left with
    nothing to learn from are dropped)."""
    group_window: int = setting(16, ge=1)
    """Length grouping: sort examples within windows of this many batches (1 disables grouping)."""

    def split(self, load: Callable[[Path], list[T]], seed: int, what: str) -> tuple[list[T], list[T]]:
        """(train, eval) records: `eval_path`, or a seeded `eval_fraction` of `path`. `what` names the
        data in the error when `path` is unset ("demonstrations", "preferences")."""
        if not self.path:
            raise ConfigError(f"data.path is not set: give the {what} file with --data FILE")
        records = load(resolve_data_path(self.path))
        if self.eval_path:
            return records, load(resolve_data_path(self.eval_path))
        return split_holdout(records, self.eval_fraction, seed)


# Settings of the supervised stages that moved into their `data` section (old key -> new key); the old
# keys still work, with a deprecation message, until rlhfkit 0.3.
DATA_RENAMED = {
    "data": "data.path",
    "eval_data": "data.eval_path",
    "eval_fraction": "data.eval_fraction",
    "max_length": "data.max_length",
    "truncation": "data.truncation",
    "group_window": "data.group_window",
}


# ------------------------------------------------------------------------------------ validation


def _prompt(row: Row, src: Source) -> Prompt:
    value = require(row, "prompt", src)
    if isinstance(value, str):
        return check_text(value, "prompt", src)
    if not isinstance(value, list):
        fail(src, "prompt", f"must be a string or a list of messages, got {type_name(value)}")
    messages = check_messages(value, "prompt", src)
    last = messages[-1]["role"]
    if last not in ("user", "tool"):
        fail(src, "prompt", f"must end with a user or tool turn (last role is '{last}')")
    return messages


def _answer(value: Any, field: str, src: Source, prompt: Prompt) -> Answer:
    answer: Answer
    if isinstance(value, str):
        answer = check_text(value, field, src)
    elif isinstance(value, list):
        answer = check_messages(value, field, src)
        for i, message in enumerate(answer):
            if message["role"] != "assistant":
                fail(src, f"{field}[{i}].role", f"must be 'assistant' in an answer, got '{message['role']}'")
    else:
        fail(src, field, f"must be a string or a list of messages, got {type_name(value)}")
    if isinstance(answer, list) != isinstance(prompt, list):
        forms = f"is {_form(answer)} but 'prompt' is {_form(prompt)}"
        fail(src, field, f"{forms}; use the same form for both")
    return answer


def _form(value: Prompt) -> str:
    return "a list of messages" if isinstance(value, list) else "a string"


def _forbid(row: Row, keys: Sequence[str], src: Source, reason: str) -> None:
    for key in keys:
        if key in row:
            fail(src, key, reason)


def _sft_record(row: Row, src: Source) -> SFTRecord:
    if "messages" not in row:
        prompt = _prompt(row, src)
        completion = _answer(require(row, "completion", src), "completion", src, prompt)
        return SFTRecord(prompt, completion, src)
    _forbid(row, ("prompt", "completion"), src, "cannot be combined with 'messages'")
    value = row["messages"]
    if not isinstance(value, list):
        fail(src, "messages", f"must be a list of messages, got {type_name(value)}")
    messages = check_messages(value, "messages", src)
    last = messages[-1]["role"]
    if last != "assistant":
        fail(src, "messages", f"must end with an assistant turn (last role is '{last}')")
    if len(messages) < 2:
        fail(src, "messages", "needs at least one turn before the final assistant turn")
    before = messages[-2]["role"]
    if before not in ("user", "tool"):
        message = f"must have a user or tool turn before the final assistant turn (it is '{before}')"
        fail(src, "messages", message)
    return SFTRecord(messages[:-1], messages[-1:], src, answer_field="messages")


def _preference_record(row: Row, src: Source) -> PreferenceRecord | RankingRecord | TrajectoryRecord:
    if "episodes" in row:
        return trajectory_record(row, src)
    if "completions" in row:
        return _ranking_record(row, src)
    prompt = _prompt(row, src)
    chosen = _answer(require(row, "chosen", src), "chosen", src, prompt)
    rejected = _answer(require(row, "rejected", src), "rejected", src, prompt)
    if rejected == chosen:
        fail(src, "rejected", "is identical to 'chosen'")
    return PreferenceRecord(prompt, chosen, rejected, _margin(row, src), src)


def _margin(row: Row, src: Source) -> float:
    value = row.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(src, "margin", f"must be a number, got {type_name(value)}")
    try:
        margin = float(value)
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin):
        fail(src, "margin", f"must be a finite number, got {margin}")
    return margin


def _ranking_record(row: Row, src: Source) -> RankingRecord:
    _forbid(row, ("chosen", "rejected", "margin"), src, "cannot be combined with 'completions'")
    prompt = _prompt(row, src)
    value = row["completions"]
    if not isinstance(value, list):
        fail(src, "completions", f"must be a list of answers, got {type_name(value)}")
    if len(value) < 2:
        fail(src, "completions", f"needs at least 2 answers, got {len(value)}")
    completions: list[Answer] = []
    for i, item in enumerate(value):
        answer = _answer(item, f"completions[{i}]", src, prompt)
        if answer in completions:
            fail(src, f"completions[{i}]", f"is identical to 'completions[{completions.index(answer)}]'")
        completions.append(answer)
    ranks = parse_ranks(require(row, "ranking", src), len(completions), src)
    return RankingRecord(prompt, tuple(completions), ranks, src)


def _prompt_record(row: Row, src: Source) -> PromptRecord:
    prompt = _prompt(row, src)
    return PromptRecord(prompt, {key: value for key, value in row.items() if key != "prompt"}, src)


# ------------------------------------------------------------------------------------ public API


def _load(path: str | os.PathLike[str], build: Callable[[Row, Source], T]) -> list[T]:
    name = str(path)
    return [build(row, Source(name, line)) for line, row in read_rows(path)]


def load_sft(path: str | os.PathLike[str]) -> list[SFTRecord]:
    """Read and validate an SFT file (prompt/completion or conversational ``messages`` rows)."""
    return _load(path, _sft_record)


def load_preferences(
    path: str | os.PathLike[str],
) -> list[PreferenceRecord | RankingRecord | TrajectoryRecord]:
    """Read and validate a preference file: pairs, rankings (rows with ``completions``) and trajectory
    rankings (rows with ``episodes``, `rlhfkit.data.trajectories`)."""
    return _load(path, _preference_record)


def load_prompts(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Read and validate a prompt-only file (RL); other fields are kept in ``fields``."""
    return _load(path, _prompt_record)


def split_holdout(records: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split off ``round(fraction * n)`` records (at least 1 if ``fraction > 0``, never all).

    The held-out records are chosen by a shuffle seeded with ``seed``; both parts keep file order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(records)
    if fraction == 0.0 or n < 2:
        return list(records), []
    size = min(max(round(fraction * n), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def _assets_dir() -> Traversable:
    return resources.files("rlhfkit") / "assets"


def bundled_path(name: str) -> Path:
    """Path of a file shipped in the package's ``assets`` folder, e.g. ``bundled_path("tiny_sft.jsonl")``."""
    assets = _assets_dir()
    resource = assets / name
    if "/" in name or "\\" in name or name in ("", ".", "..") or not resource.is_file():
        available = sorted(e.name for e in assets.iterdir() if e.is_file()) if assets.is_dir() else []
        message = f"no such bundled file (available: {', '.join(available) or 'none'})"
        raise DataError(f"rlhfkit/assets/{name}", None, None, message)
    return Path(str(resource))


def resolve_data_path(spec: str) -> Path:
    """A data argument as a path: `bundled:NAME` names a file shipped with rlhfkit, anything else a path."""
    if spec.startswith("bundled:"):
        return bundled_path(spec.removeprefix("bundled:"))
    return Path(spec).expanduser()
