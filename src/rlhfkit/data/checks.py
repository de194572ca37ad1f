"""Checks every data format shares: a failing field stops the load with one line naming file, line and field
(`DataError`), messages are checked and copied, rankings with ties become a level per item.

Used by `rlhfkit.data.records` (answers) and `rlhfkit.data.trajectories` (agent episodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from rlhfkit.data.files import Row, type_name
from rlhfkit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Source:
    """Where a record came from: the file and its 1-based line (or row) number."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def fail(src: Source, field: str | None, message: str) -> NoReturn:
    raise DataError(src.path, src.line, field, message)


def require(row: Row, key: str, src: Source) -> Any:
    if key not in row:
        fail(src, key, "is missing")
    return row[key]


def check_text(value: str, field: str, src: Source) -> str:
    if not value.strip():
        fail(src, field, "is empty")
    return check_unicode(value, field, src)


def check_unicode(value: str, field: str, src: Source) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" from a JSON escape):
    tokenizers cannot encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        fail(
            src, field, f"is not valid Unicode: {exc.reason} ({value[exc.start]!r} at character {exc.start})"
        )
    return value


def check_messages(value: list[Any], field: str, src: Source) -> list[dict[str, str]]:
    """Check a list of messages and copy it as plain ``{"role", "content"}`` dicts."""
    if not value:
        fail(src, field, "is empty")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            fail(src, where, f"must be a message object, got {type_name(message)}")
        role = require_string(message, "role", where, src)
        if role not in ROLES:
            fail(src, f"{where}.role", f"role '{role}' is not one of {', '.join(ROLES)}")
        content = require_string(message, "content", where, src)
        if role in ("user", "assistant") and not content.strip():
            fail(src, f"{where}.content", "is empty")
        messages.append({"role": role, "content": content})
    return messages


def require_string(message: Row, key: str, where: str, src: Source) -> str:
    if key not in message:
        fail(src, f"{where}.{key}", "is missing")
    value = message[key]
    if not isinstance(value, str):
        fail(src, f"{where}.{key}", f"must be a string, got {type_name(value)}")
    return check_unicode(value, f"{where}.{key}", src)


def parse_ranks(value: Any, k: int, src: Source, noun: str = "completion") -> tuple[int, ...]:
    """Turn a best-to-worst ranking with nested-list ties into a level per item (`noun` names the items)."""
    if not isinstance(value, list):
        fail(src, "ranking", f"must be a list of {noun} indices, got {type_name(value)}")
    if not value:
        fail(src, "ranking", "is empty")
    level_of: dict[int, int] = {}
    for level, item in enumerate(value):
        tied = isinstance(item, list)
        if tied and not item:
            fail(src, f"ranking[{level}]", "is an empty tie group")
        for j, index in enumerate(item if tied else [item]):
            if isinstance(index, bool) or not isinstance(index, int):
                where = f"ranking[{level}][{j}]" if tied else f"ranking[{level}]"
                expected = f"a {noun} index" if tied else f"a {noun} index or a list of tied indices"
                fail(src, where, f"must be {expected}, got {type_name(index)}")
            if not 0 <= index < k:
                fail(src, "ranking", f"index {index} out of range for {k} {noun}s")
            if index in level_of:
                fail(src, "ranking", f"index {index} appears twice")
            level_of[index] = level
    missing = [str(i) for i in range(k) if i not in level_of]
    if missing:
        word = "index" if len(missing) == 1 else "indices"
        fail(src, "ranking", f"{word} {', '.join(missing)} missing")
    if len(value) == 1:
        fail(src, "ranking", f"ties all {k} {noun}s, so there is nothing to learn")
    return tuple(level_of[i] for i in range(k))
