"""Read dataset files and validate every record before any training starts.

Nothing is tokenised here: each row becomes a typed, frozen record, and the first bad row stops
the load with a one-line ``DataError`` such as ``train.jsonl:3: field 'rejected': is identical to 'chosen'``.

File types (``read_rows``):

* ``.jsonl``: one JSON object per line; blank lines are skipped; "line" is the physical line.
* ``.json``: a top-level array of objects; "line" is the line where each object starts.
* ``.csv``: a header row, then one record per row; "line" is the physical line where the row
  starts (the header is line 1). Blank cells count as missing columns. A cell starting with
  ``[`` or ``{`` is read as JSON (so message lists and rankings fit in a cell); if it is not
  valid JSON it stays text (``[INST] ...``), unless it starts like JSON data (``[{``, ``{"``,
  ``[1``, ``[[``), which is an error. The ``margin`` column is read as a number.
* ``.parquet`` and directories written by ``datasets`` ``save_to_disk`` (a ``DatasetDict``
  must have a ``train`` split): "line" is the 1-based row number; null cells count as missing.

Record formats (TRL's conventions). A *prompt* is a non-empty string or a non-empty list of
messages ending with a user or tool turn. An *answer* is a non-empty string or a non-empty list
of assistant messages, in the same form as its prompt (both strings or both message lists).
A message is ``{"role": R, "content": S}`` with R one of system, user, assistant, tool and S a
string (non-empty for user and assistant); other keys are dropped.

* SFT: ``{"prompt": P, "completion": A}``, or ``{"messages": [...]}`` ending with an assistant
  turn, normalised to ``prompt = messages[:-1]`` and ``completion = [messages[-1]]``.
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
* Prompt-only (RL): ``{"prompt": P, ...}``; every other field is kept in ``fields``.

Fields other than those named above are ignored (SFT and preference files).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

from rlhfkit.errors import DataError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

Prompt: TypeAlias = str | list[dict[str, str]]
Answer: TypeAlias = str | list[dict[str, str]]
Row: TypeAlias = dict[str, Any]
T = TypeVar("T")

ROLES = ("system", "user", "assistant", "tool")
SUPPORTED = ".jsonl, .json, .parquet, .csv or a datasets directory"
_BOM = b"\xef\xbb\xbf"
_CSV_NUMERIC_COLUMNS = frozenset({"margin"})
_CSV_JSON_LIKE = re.compile(r'\[\s*[\[{"\d-]|\{\s*"')


# --------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Source:
    """Where a record came from: the file and its 1-based line (or row) number."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class SFTRecord:
    prompt: Prompt
    completion: Answer
    source: Source
    answer_field: str = dataclasses.field(default="completion", compare=False)
    """The field the answer came from ("messages" for a conversation), for error messages."""


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


# --------------------------------------------------------------------------------------- reading


def read_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, Row]]:
    """Yield ``(line, row)`` for each record of a data file; raises ``DataError`` on unreadable input.

    The path and file type are checked at once; the contents as the rows are consumed.
    """
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(name, None, None, "no such file")
    if p.is_dir():
        return _non_empty(_read_datasets_dir(p, name), name)
    suffix = p.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        kind = f"'{suffix}'" if suffix else "(no extension)"
        raise DataError(name, None, None, f"unsupported file type {kind} (use {SUPPORTED})")
    return _non_empty(reader(p, name), name)


def _non_empty(rows: Iterator[tuple[int, Row]], name: str) -> Iterator[tuple[int, Row]]:
    empty = True
    for item in rows:
        empty = False
        yield item
    if empty:
        raise DataError(name, None, None, "contains no records")


def _read_jsonl(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = _decode(raw.removeprefix(_BOM) if lineno == 1 else raw, name, lineno)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(name, lineno, None, _json_message(e)) from None
            yield lineno, _expect_object(value, name, lineno)


def _read_json(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    text = _decode(p.read_bytes().removeprefix(_BOM), name)
    if not text.strip():
        return
    try:
        value = json.loads(text)  # validates the whole file, so the walk below cannot fail
    except json.JSONDecodeError as e:
        raise DataError(name, e.lineno, None, _json_message(e)) from None
    if not isinstance(value, list):
        raise DataError(name, None, None, f"must hold a JSON array of records, got {_type_name(value)}")
    count = len(value)
    del value
    # Walk the array again with raw_decode to learn the offset (hence line) where each object starts.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted_to = 1, 0
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        item, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        yield line, _expect_object(item, name, line)
        pos = end


def _read_csv(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    text = _decode(p.read_bytes().removeprefix(_BOM), name)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1  # the next row starts on the line after the last one read
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(name, start, None, f"invalid CSV: {e}") from None
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            for i, column in enumerate(header):
                if column in header[:i]:
                    raise DataError(name, start, None, f"column '{column}' appears twice in the header")
            continue
        if len(cells) != len(header):
            message = f"has {len(cells)} cells but the header has {len(header)} columns"
            raise DataError(name, start, None, message)
        cells_by_column = zip(header, cells, strict=True)
        yield start, {col: _csv_cell(cell, col, name, start) for col, cell in cells_by_column if cell.strip()}


def _csv_cell(cell: str, column: str, name: str, line: int) -> Any:
    stripped = cell.strip()
    if column in _CSV_NUMERIC_COLUMNS:
        try:
            return float(stripped)
        except ValueError:
            return cell  # left as text, so validation reports "must be a number, got string"
    if stripped.startswith(("[", "{")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            if _CSV_JSON_LIKE.match(stripped):
                raise DataError(name, line, column, _json_message(e)) from None
    return cell


def _read_parquet(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(p)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(name, None, None, f"is not a readable Parquet file ({e})") from None
    row_number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, _drop_nulls(row)


def _read_datasets_dir(p: Path, name: str) -> Iterator[tuple[int, Row]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        message = "is a directory but not a dataset saved with datasets' save_to_disk"
        raise DataError(name, None, None, message) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(dataset) or "none"
            raise DataError(name, None, None, f"has no 'train' split (splits: {splits})")
        dataset = dataset["train"]
    for row_number, row in enumerate(dataset, 1):
        yield row_number, _drop_nulls(row)


_READERS: dict[str, Callable[[Path, str], Iterator[tuple[int, Row]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _decode(data: bytes, name: str, first_line: int = 1) -> str:
    """Decode UTF-8, naming the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        line_start = data.rfind(b"\n", 0, e.start) + 1
        column = len(data[line_start : e.start].decode("utf-8")) + 1
        message = f"is not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
        raise DataError(name, line, None, message) from None


def _json_message(e: json.JSONDecodeError) -> str:
    return f"invalid JSON: {e.msg} (column {e.colno})"


def _expect_object(value: Any, name: str, line: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(name, line, None, f"expected a JSON object, got {_type_name(value)}")
    return value


def _drop_nulls(row: Row) -> Row:
    return {key: value for key, value in row.items() if value is not None}


def _type_name(value: Any) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------ validation


def _fail(src: Source, field: str | None, message: str) -> NoReturn:
    raise DataError(src.path, src.line, field, message)


def _require(row: Row, key: str, src: Source) -> Any:
    if key not in row:
        _fail(src, key, "is missing")
    return row[key]


def _text(value: str, field: str, src: Source) -> str:
    if not value.strip():
        _fail(src, field, "is empty")
    return value


def _messages(value: list[Any], field: str, src: Source) -> list[dict[str, str]]:
    """Check a list of messages and copy it as plain ``{"role", "content"}`` dicts."""
    if not value:
        _fail(src, field, "is empty")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            _fail(src, where, f"must be a message object, got {_type_name(message)}")
        role = _require_string(message, "role", where, src)
        if role not in ROLES:
            _fail(src, f"{where}.role", f"role '{role}' is not one of {', '.join(ROLES)}")
        content = _require_string(message, "content", where, src)
        if role in ("user", "assistant") and not content.strip():
            _fail(src, f"{where}.content", "is empty")
        messages.append({"role": role, "content": content})
    return messages


def _require_string(message: Row, key: str, where: str, src: Source) -> str:
    if key not in message:
        _fail(src, f"{where}.{key}", "is missing")
    value = message[key]
    if not isinstance(value, str):
        _fail(src, f"{where}.{key}", f"must be a string, got {_type_name(value)}")
    return value


def _prompt(row: Row, src: Source) -> Prompt:
    value = _require(row, "prompt", src)
    if isinstance(value, str):
        return _text(value, "prompt", src)
    if not isinstance(value, list):
        _fail(src, "prompt", f"must be a string or a list of messages, got {_type_name(value)}")
    messages = _messages(value, "prompt", src)
    last = messages[-1]["role"]
    if last not in ("user", "tool"):
        _fail(src, "prompt", f"must end with a user or tool turn (last role is '{last}')")
    return messages


def _answer(value: Any, field: str, src: Source, prompt: Prompt) -> Answer:
    answer: Answer
    if isinstance(value, str):
        answer = _text(value, field, src)
    elif isinstance(value, list):
        answer = _messages(value, field, src)
        for i, message in enumerate(answer):
            if message["role"] != "assistant":
                _fail(src, f"{field}[{i}].role", f"must be 'assistant' in an answer, got '{message['role']}'")
    else:
        _fail(src, field, f"must be a string or a list of messages, got {_type_name(value)}")
    if isinstance(answer, list) != isinstance(prompt, list):
        forms = f"is {_form(answer)} but 'prompt' is {_form(prompt)}"
        _fail(src, field, f"{forms}; use the same form for both")
    return answer


def _form(value: Prompt) -> str:
    return "a list of messages" if isinstance(value, list) else "a string"


def _forbid(row: Row, keys: Sequence[str], src: Source, reason: str) -> None:
    for key in keys:
        if key in row:
            _fail(src, key, reason)


def _sft_record(row: Row, src: Source) -> SFTRecord:
    if "messages" not in row:
        prompt = _prompt(row, src)
        completion = _answer(_require(row, "completion", src), "completion", src, prompt)
        return SFTRecord(prompt, completion, src)
    _forbid(row, ("prompt", "completion"), src, "cannot be combined with 'messages'")
    value = row["messages"]
    if not isinstance(value, list):
        _fail(src, "messages", f"must be a list of messages, got {_type_name(value)}")
    messages = _messages(value, "messages", src)
    last = messages[-1]["role"]
    if last != "assistant":
        _fail(src, "messages", f"must end with an assistant turn (last role is '{last}')")
    if len(messages) < 2:
        _fail(src, "messages", "needs at least one turn before the final assistant turn")
    before = messages[-2]["role"]
    if before not in ("user", "tool"):
        message = f"must have a user or tool turn before the final assistant turn (it is '{before}')"
        _fail(src, "messages", message)
    return SFTRecord(messages[:-1], messages[-1:], src, answer_field="messages")


def _preference_record(row: Row, src: Source) -> PreferenceRecord | RankingRecord:
    if "completions" in row:
        return _ranking_record(row, src)
    prompt = _prompt(row, src)
    chosen = _answer(_require(row, "chosen", src), "chosen", src, prompt)
    rejected = _answer(_require(row, "rejected", src), "rejected", src, prompt)
    if rejected == chosen:
        _fail(src, "rejected", "is identical to 'chosen'")
    return PreferenceRecord(prompt, chosen, rejected, _margin(row, src), src)


def _margin(row: Row, src: Source) -> float:
    value = row.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(src, "margin", f"must be a number, got {_type_name(value)}")
    try:
        margin = float(value)
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin):
        _fail(src, "margin", f"must be a finite number, got {margin}")
    return margin


def _ranking_record(row: Row, src: Source) -> RankingRecord:
    _forbid(row, ("chosen", "rejected", "margin"), src, "cannot be combined with 'completions'")
    prompt = _prompt(row, src)
    value = row["completions"]
    if not isinstance(value, list):
        _fail(src, "completions", f"must be a list of answers, got {_type_name(value)}")
    if len(value) < 2:
        _fail(src, "completions", f"needs at least 2 answers, got {len(value)}")
    completions: list[Answer] = []
    for i, item in enumerate(value):
        answer = _answer(item, f"completions[{i}]", src, prompt)
        if answer in completions:
            _fail(src, f"completions[{i}]", f"is identical to 'completions[{completions.index(answer)}]'")
        completions.append(answer)
    ranks = _ranks(_require(row, "ranking", src), len(completions), src)
    return RankingRecord(prompt, tuple(completions), ranks, src)


def _ranks(value: Any, k: int, src: Source) -> tuple[int, ...]:
    """Turn a best-to-worst ranking with nested-list ties into a level per completion."""
    if not isinstance(value, list):
        _fail(src, "ranking", f"must be a list of completion indices, got {_type_name(value)}")
    if not value:
        _fail(src, "ranking", "is empty")
    level_of: dict[int, int] = {}
    for level, item in enumerate(value):
        tied = isinstance(item, list)
        if tied and not item:
            _fail(src, f"ranking[{level}]", "is an empty tie group")
        for j, index in enumerate(item if tied else [item]):
            if isinstance(index, bool) or not isinstance(index, int):
                where = f"ranking[{level}][{j}]" if tied else f"ranking[{level}]"
                expected = "a completion index" if tied else "a completion index or a list of tied indices"
                _fail(src, where, f"must be {expected}, got {_type_name(index)}")
            if not 0 <= index < k:
                _fail(src, "ranking", f"index {index} out of range for {k} completions")
            if index in level_of:
                _fail(src, "ranking", f"index {index} appears twice")
            level_of[index] = level
    missing = [str(i) for i in range(k) if i not in level_of]
    if missing:
        noun = "index" if len(missing) == 1 else "indices"
        _fail(src, "ranking", f"{noun} {', '.join(missing)} missing")
    if len(value) == 1:
        _fail(src, "ranking", f"ties all {k} completions, so there is nothing to learn")
    return tuple(level_of[i] for i in range(k))


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


def load_preferences(path: str | os.PathLike[str]) -> list[PreferenceRecord | RankingRecord]:
    """Read and validate a preference file: pairs, and rankings for rows with ``completions``."""
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
