"""Labels out of the database, into the preference formats `rlhfkit rm` and `rlhfkit dpo` read.

* ``rankings``: one row per (item, annotator) ranking, ``{"prompt", "completions", "ranking"}`` exactly as
  ``rlhfkit.data.records`` reads a RankingRecord: completions in the item's stored order, the ranking best to
  worst with tied answers in a nested list (``[2, [0, 1]]``). Extra fields that the loader ignores keep
  the provenance: ``item``, ``annotator``, ``models`` (which model wrote each completion).
* ``pairs``: for every ranking, one ``{"prompt", "chosen", "rejected"}`` row per pair of answers at
  different levels (K-choose-2 at most); tied answers give no pair. Plus ``item`` and ``annotator``.

Several annotators of one item each contribute their own rows: where they agree the pair counts twice,
where they disagree the two rows pull against each other, which is what their labels say.

Left out of both: skips (no judgement), and "all bad" labels. "All bad" says every answer is unacceptable
but nothing about their order, so it makes no pair, and a ranking with a single level is not a valid
RankingRecord (nothing to learn). They stay in the database and are counted on the admin page and by
the export command, for whoever wants to use them (e.g. to drop prompts or as SFT negatives).

A prompt given as messages gets message answers (``[{"role": "assistant", "content": ...}]``), since the
data format wants prompt and answers in the same form. The file is written atomically.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rlhfkit.feedback.store import Item, Label, all_items, labels
from rlhfkit.fileio import write_atomic

Format = Literal["pairs", "rankings"]
FORMATS: tuple[Format, ...] = ("pairs", "rankings")


def ranking_json(levels: Sequence[int]) -> list[Any]:
    """Levels per answer -> the data format's best-to-worst list, ties nested: (1, 0, 1) -> [1, [0, 2]]."""
    out: list[Any] = []
    for level in sorted(set(levels)):
        group = [i for i, lv in enumerate(levels) if lv == level]
        out.append(group[0] if len(group) == 1 else group)
    return out


def _answer(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def ranking_row(item: Item, label: Label) -> dict[str, Any]:
    assert label.ranks is not None
    return {
        "prompt": item.prompt,
        "completions": [_answer(item.prompt, a.text) for a in item.answers],
        "ranking": ranking_json(label.ranks),
        "item": item.id,
        "annotator": label.user,
        "models": [a.model for a in item.answers],
    }


def pair_rows(item: Item, label: Label) -> list[dict[str, Any]]:
    """Every (better, worse) pair of one ranking, better first; ties make none."""
    ranks = label.ranks
    assert ranks is not None
    n = len(ranks)
    return [
        {
            "prompt": item.prompt,
            "chosen": _answer(item.prompt, item.answers[i].text),
            "rejected": _answer(item.prompt, item.answers[j].text),
            "item": item.id,
            "annotator": label.user,
        }
        for i in range(n)
        for j in range(n)
        if ranks[i] < ranks[j]
    ]


def export_rows(conn: sqlite3.Connection, fmt: Format) -> list[dict[str, Any]]:
    """The rows of an export, in item then annotator order."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (use {' or '.join(FORMATS)})")
    items = all_items(conn)
    rows: list[dict[str, Any]] = []
    for label in labels(conn, kinds=("rank",)):
        item = items[label.item_id]
        rows += [ranking_row(item, label)] if fmt == "rankings" else pair_rows(item, label)
    return rows


def to_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def export(conn: sqlite3.Connection, out: Path, fmt: Format) -> dict[str, int]:
    """Write the export to ``out``; returns the rows written and the labels left out, by kind."""
    rows = export_rows(conn, fmt)
    write_atomic(out, to_jsonl(rows))
    left_out = {kind: len(labels(conn, kinds=(kind,))) for kind in ("all_bad", "skip")}
    return {"rows": len(rows), **left_out}
