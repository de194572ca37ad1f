"""Reading a final answer: the number it ends with, and which of a task's known values it names.

The bundled environments check answers with these few rules, so that the same answer text is read the same
way everywhere: a number is the last number in the text ("1,234.5", "$12", "-3", "12.50"), compared with a
relative tolerance; a name is matched case-insensitively as a whole phrase among the values the task knows
(a table's names, a folder's files), so "The largest file is a.txt." names a.txt and nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

# an optional minus that is not a hyphen between words or digits, an optional $, digits with thousands commas
NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None."""
    found = None
    for match in NUMBER.finditer(text):
        found = match
    if found is None:
        return None
    digits = found.group(1).replace(",", "") + (found.group(2) or "")
    value = float(digits)
    return -value if found.group(0).startswith("-") else value


def numbers_match(value: float | None, gold: float, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    return value is not None and math.isclose(value, gold, rel_tol=rel_tol, abs_tol=abs_tol)


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or final full stop."""
    text = " ".join(str(text).split()).lower()
    return text.strip().strip("'\"`").rstrip(".").strip()


def mentions(answer: str, value: str) -> bool:
    """`value` appears in `answer` as a whole phrase (case-insensitive; not inside a longer word)."""
    pattern = r"(?<![\w.])" + re.escape(normalize(value)) + r"(?![\w])"
    return re.search(pattern, " ".join(answer.split()).lower()) is not None


def named_values(answer: str, choices: Iterable[str]) -> set[str]:
    """The choices (normalised) that `answer` names; a choice inside a longer named choice does not count
    ("Ann" is not named by "Anna", nor "a.txt" by "data.txt")."""
    named = {normalize(c) for c in choices if mentions(answer, c)}
    return {c for c in named if not any(c != o and mentions(o, c) for o in named)}
